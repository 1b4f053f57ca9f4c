"""Samples -> model-ready tensors: tokenised once, images decoded once, batches padded with masks.

Text-only and image samples batch together in any mix: `pixel_values` holds the images of the rows
that have one, in row order, and the model places them at those rows' image tokens (both layouts
scatter visual features into the image-token positions in order). A sample that cannot be used
(missing or broken image, too long, more images than the model takes) is recorded in the rejects log
and left out; `strict=True` raises on the first one instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlmkd.data.images import load_image, normalize, to_uint8
from vlmkd.data.layout import Layout
from vlmkd.data.manifest import Reject, Sample
from vlmkd.data.rejects import RejectLog
from vlmkd.data.template import Encoded, Tokenizer
from vlmkd.errors import DataError


@dataclass
class Item:
    sample: Sample
    enc: Encoded
    # [3, S, S] uint8 for a fixed-block family; a processor family's image inputs (`VisualInputs`);
    # None for a text-only sample
    pixels: np.ndarray | dict | None


def one_image(sample: Sample, layout: Layout) -> None:
    """Refuse a sample with several images for a fixed-block family (vlmkd's template writes one image
    block); a processor family's processor places any number."""
    if len(sample.images) > 1:
        raise DataError(f"sample {sample.id}: {len(sample.images)} images; a {layout.arch} model on vlmkd's template "
                        "takes one image per sample (the processor families take several: README's matrix)")


def encode_samples(
    samples: Sequence[Sample],
    tokenizer: Tokenizer,
    layout: Layout,
    rejects: RejectLog | None = None,
    strict: bool = False,
    with_answer: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[Item]:
    items = []
    for s in samples:
        try:
            if getattr(tokenizer, "reads_images", False):  # the processor makes ids and pixels together
                enc, pixels = tokenizer.encode_item(s, with_answer=with_answer)
            else:
                one_image(s, layout)
                enc = tokenizer.encode(s, with_answer=with_answer)
                pixels = to_uint8(load_image(s.image, s.id), layout.pixels) if s.image is not None else None
            items.append(Item(s, enc, pixels))
        except DataError as e:
            if strict:
                raise
            if rejects is not None:
                rejects.add(Reject(s.id, str(s.image) if s.image else "", str(e)))
        if progress:
            progress(1)
    return items


def collate(items: Sequence[Item], layout: Layout, pad_id: int, prompt_only: bool = False) -> dict:
    """Right-padded batch. `prompt_only` cuts each row at its prompt (for generation).

    Returns input_ids [B, T], attention_mask [B, T], labels_mask [B, T] (response positions),
    image_mask [B, T] (visual positions), pixel_values in the layout the model expects.
    """
    rows = [it.enc.input_ids[: it.enc.prompt_len] if prompt_only else it.enc.input_ids for it in items]
    T = max(len(r) for r in rows)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    lab = torch.zeros((B, T), dtype=torch.bool)
    img = torch.zeros((B, T), dtype=torch.bool)
    for i, (it, r) in enumerate(zip(items, rows, strict=True)):
        n = len(r)
        ids[i, :n] = torch.from_numpy(r)
        attn[i, :n] = 1
        if not prompt_only:
            lab[i, :n] = torch.from_numpy(it.enc.labels_mask)
        img[i, :n] = torch.from_numpy(it.enc.image_mask[:n])
    batch = {"input_ids": ids, "attention_mask": attn, "labels_mask": lab, "image_mask": img}
    batch.update(image_inputs([it.pixels for it in items], layout))
    return with_token_types(batch, layout)


def with_token_types(batch: dict, layout: Layout) -> dict:
    """The token types a family's forward takes, under its name for them (`Layout.token_types`): 1 on
    image tokens, 0 elsewhere; or for a prefix-LM (`Layout.prefix_lm`: PaliGemma) 1 on the answer (the
    suffix, attended causally), 0 on the prefix (image and prompt, attended both ways)."""
    if layout.token_types:
        batch[layout.token_types] = (batch["labels_mask"] if layout.prefix_lm else batch["image_mask"]).long()
    return batch


def image_inputs(pixels: Sequence, layout: Layout) -> dict:
    """The forward's image inputs for the rows that have an image, in row order: `pixel_values` (and, for a
    processor family, its other image inputs, e.g. `image_grid_thw`); empty when no row has one."""
    if layout.visual is not None:
        return layout.visual.batch(pixels) or {}
    px = pixel_batch(pixels, layout)
    return {} if px is None else {"pixel_values": px}


def pixel_batch(pixels: Sequence[np.ndarray | None], layout: Layout) -> torch.Tensor | None:
    """The normalised images of the rows that have one, in row order ([N, 1, 3, S, S] for idefics3,
    [N, 3, S, S] for llava); None when no row has an image (then the model runs text-only)."""
    real = [p for p in pixels if p is not None]
    if not real:
        return None
    px = normalize(torch.from_numpy(np.stack(real)), layout.pixels)
    return px.unsqueeze(1) if layout.arch == "idefics3" else px


# every image input a family's forward takes (a batch holds those of its model's family)
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "mm_token_type_ids",
                "token_type_ids", "batch_num_images")


def model_inputs(batch: dict, device: torch.device | None = None) -> dict:
    """The keys of a batch that the HF model's forward takes (moved to `device` when given)."""
    keys = ("input_ids", "attention_mask", *IMAGE_INPUTS)
    return {k: batch[k] if device is None else batch[k].to(device) for k in keys if k in batch}


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of a batch on `device` (a no-op on the CPU)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
