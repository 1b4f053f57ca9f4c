"""What the data path needs to know of a model: its image block, token count and pixels. The model
family layer (`vlmkd.models.families`) makes one from a config; data code only reads it."""

from __future__ import annotations

from dataclasses import dataclass

from vlmkd.data.images import PixelSpec


@dataclass(frozen=True)
class Layout:
    """A fixed-block family (vlmkd's template: Idefics3, LLaVA) has `image_block`, `num_image_tokens`,
    `pixels` and `patch_grid`; a processor family (the checkpoint's own processor decides the visual
    tokens, any number per image) has those None and `visual` (its image inputs) and `processor` set."""

    arch: str
    image_token_id: int
    num_image_tokens: int | None
    image_block: list[int] | None
    pixels: PixelSpec | None
    max_length: int
    patch_grid: int | None  # visual tokens per side (the 2-D grid the image tokens come from)
    visual: object | None = None  # vlmkd.data.processor.VisualInputs
    processor: object | None = None
    # the name under which the forward takes 1 on image tokens, 0 elsewhere, if it does: Qwen's M-RoPE finds
    # the images by `mm_token_type_ids`, Gemma 3's bidirectional image attention by `token_type_ids`
    token_types: str | None = None
    # a prefix-LM without a chat template (PaliGemma): one prompt and one answer per sample, through the
    # processor's `suffix` (`vlmkd.data.processor.PrefixEncoder`); its token types mark the answer
    prefix_lm: bool = False
