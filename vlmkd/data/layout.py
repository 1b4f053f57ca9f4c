"""What the data path needs to know of a model: its image block, token count and pixels. The model
layer (`vlmkd.models.build.layout_of`) makes one from a config; data code only reads it."""

from __future__ import annotations

from dataclasses import dataclass

from vlmkd.data.images import PixelSpec


@dataclass(frozen=True)
class Layout:
    """What the data path needs to know of a model: its image block, token count and pixels."""

    arch: str
    image_token_id: int
    num_image_tokens: int
    image_block: list[int]
    pixels: PixelSpec
    max_length: int
    patch_grid: int  # visual tokens per side (the 2-D grid the image tokens come from)
