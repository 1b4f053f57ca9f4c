"""Idefics3 (SmolVLM's layout): SigLIP-style vision tower -> pixel-shuffle connector -> Llama. The
demo's layout, because vLLM's CPU build runs it. Each image is `<fake_token_around_image><global-img>`
+ N x `<image>` + `<fake_token_around_image>`, as its processor writes it (image splitting off)."""

from __future__ import annotations

from transformers import Idefics3Config, Idefics3ForConditionalGeneration

from vlmkd.data.images import PixelSpec
from vlmkd.data.layout import Layout
from vlmkd.models import tokenizer as toks
from vlmkd.models.families.base import Family, llama_text_config, vit_config

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


FAMILY = Family("idefics3", ("idefics3",), vision="vision_model", connector="connector", text="text_model",
                build=build, layout=layout, processor=processor)
