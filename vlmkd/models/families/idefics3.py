"""Idefics3 (SmolVLM's layout): SigLIP-style vision tower -> pixel-shuffle connector -> Llama. The
demo's layout, because vLLM's CPU build runs it. A demo model (saved with vlmkd's chat template) writes
each image as `<fake_token_around_image><global-img>` + N x `<image>` + `<fake_token_around_image>`, as
its processor does with image splitting off. A checkpoint with its own chat template (SmolVLM v1,
Idefics3) is tokenised by its own processor (`vlmkd.models.build.processor_path`), image splitting as
shipped: rows x cols tiles, each `<row_i_col_j>` + N x `<image>`, then the global view, fed as
`pixel_values` [1, sub-images, 3, S, S] with `pixel_attention_mask` (`split_layout`, SmolVLM2's too)."""

from __future__ import annotations

from transformers import Idefics3Config, Idefics3ForConditionalGeneration

from vlmkd.data.images import PixelSpec
from vlmkd.data.layout import Layout
from vlmkd.models import tokenizer as toks
from vlmkd.models.families.base import Family, llama_text_config, processor_layout, vit_config

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def build(spec: dict, tok):
    text_cfg = llama_text_config(spec["text"], tok, spec.get("max_positions", 256))
    cfg = Idefics3Config(
        vision_config=vit_config(spec),
        text_config=text_cfg.to_dict(),
        scale_factor=spec.get("scale_factor", 2),
        image_token_id=tok.convert_tokens_to_ids(toks.IMAGE),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=text_cfg.tie_word_embeddings,
    )
    return Idefics3ForConditionalGeneration(cfg)


def layout(config, tok, processor=None) -> Layout:
    if processor is not None:  # a checkpoint's own processor
        return split_layout(config, processor)
    v = config.vision_config
    grid = v.image_size // v.patch_size
    n = grid * grid // (config.scale_factor**2)
    img = config.image_token_id
    fake = tok.convert_tokens_to_ids(toks.FAKE_IMAGE)
    glob = tok.convert_tokens_to_ids(toks.GLOBAL_IMAGE)
    return Layout("idefics3", img, n, [fake, glob] + [img] * n + [fake], PixelSpec(v.image_size, SIGLIP_MEAN, SIGLIP_STD),
                  config.text_config.max_position_embeddings, grid // config.scale_factor)


def processor(config, tok):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    lay = layout(config, tok)
    ip = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": lay.pixels.size},
        max_image_size={"longest_edge": lay.pixels.size},
        do_image_splitting=False,
        image_mean=list(lay.pixels.mean),
        image_std=list(lay.pixels.std),
    )
    return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=lay.num_image_tokens,
                             chat_template=tok.chat_template)


def split_layout(config, processor) -> Layout:
    """The data path of an Idefics3-processor checkpoint: every sub-image (split tiles and the global
    view) makes `image_seq_len` visual tokens."""
    per = processor.image_seq_len

    def count(inputs: dict) -> int:  # [1, sub-images, 3, S, S]: one sample's
        return int(inputs["pixel_values"].shape[1]) * per

    return processor_layout(config, processor, config.image_token_id, count, ("pixel_values", "pixel_attention_mask"))


def checkpoint_processor(config, tok, tiles_per_side: int = 2):
    """The processor a SmolVLM (v1) checkpoint ships, sized to the config: image splitting on (images
    resized to `tiles_per_side` tiles on the longest edge; real checkpoints: 4 x 512 of 512), the
    tokenizer's chat template. The tests' stand-in for such a checkpoint."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    side = config.vision_config.image_size
    ip = Idefics3ImageProcessorPil(size={"longest_edge": tiles_per_side * side}, max_image_size={"longest_edge": side},
                                   do_image_splitting=True, image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD))
    grid = side // config.vision_config.patch_size
    return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=grid * grid // config.scale_factor**2,
                             chat_template=tok.chat_template)


FAMILY = Family("idefics3", ("idefics3",), vision="vision_model", connector="connector", text="text_model",
                build=build, layout=layout, processor=processor, demo_template=True)
