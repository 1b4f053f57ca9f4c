"""Image loading and the model's pixel transform.

One place turns a file into the tensor a model sees. For 96x96 demo images the transform is a rescale
and normalisation only; other sizes are resized as the model's HF image processor would. A test checks
this against the saved HF processor, so the trainer, the teacher cache and vLLM see the same pixels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmkd.errors import DataError


@dataclass(frozen=True)
class PixelSpec:
    size: int  # square side the vision tower takes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb limit (~89.5 MP), kept: a larger image is refused


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB as a person sees the file: EXIF orientation applied; 16- and 32-bit greys scaled to 8 bits by
    their bit depth (PIL's own convert clips them, turning a 16-bit photo white); transparency
    composited on white; palettes, CMYK, LA and the rest through PIL's conversions."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            a = a / 65535.0
        elif im.mode == "I":  # 32-bit ints: a 16-bit PNG opens as I; scale by the range the data uses
            a = a / (65535.0 if a.max(initial=0) <= 65535 else 2.0**32 - 1)
        a = np.clip(a, 0.0, 1.0)
        grey = np.round(a * 255.0).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: Path, sample_id: str) -> Image.Image:
    """Open and fully decode an image as RGB (`to_rgb`); a missing, unreadable or oversized file names
    the sample and the file."""
    if not path.is_file():
        raise DataError(f"sample {sample_id}: image {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"sample {sample_id}: image {path} is larger than the decompression-bomb limit of "
                        f"{MAX_PIXELS:,} pixels ({e}); downscale it") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
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
