"""Image loading and the model's pixel transform.

One place turns a file into the tensor a model sees. For 96x96 demo images the transform is a rescale
and normalisation only; other sizes are resized as the model's HF image processor would. A test checks
this against the saved HF processor, so the trainer, the teacher cache and vLLM see the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlmkd.errors import DataError


@dataclass(frozen=True)
class PixelSpec:
    size: int  # square side the vision tower takes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_image(path: Path, sample_id: str) -> Image.Image:
    """Open and fully decode an image as RGB; a missing or unreadable file names the sample."""
    if not path.is_file():
        raise DataError(f"sample {sample_id}: image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"sample {sample_id}: image {path} cannot be decoded ({e})") from e


def to_uint8(img: Image.Image, spec: PixelSpec) -> np.ndarray:
    """[3, S, S] uint8: the image resized to the model's square input (no-op at the native size)."""
    if img.size != (spec.size, spec.size):
        img = img.resize((spec.size, spec.size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def normalize(pixels_u8: torch.Tensor, spec: PixelSpec) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float32 normalised pixels, as the HF image processor computes them."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return (pixels_u8.to(torch.float32) / 255.0 - mean) / std
