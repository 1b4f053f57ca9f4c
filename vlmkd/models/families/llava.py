"""LLaVA-1.5: CLIP vision tower -> MLP projector -> Llama; N x `<image>` per image. Saved under the
hub checkpoints' weight names (`vision_tower.vision_model.*`, `vlmkd.models.build`)."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from vlmkd.data.images import PixelSpec
from vlmkd.data.layout import Layout
from vlmkd.models import tokenizer as toks
from vlmkd.models.families.base import Family, hub_vision_names, llama_text_config, vit_config

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build(spec: dict, tok):
    text_cfg = llama_text_config(spec["text"], tok, spec.get("max_positions", 256))
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**vit_config(spec), projection_dim=spec["vision"]["hidden"]).to_dict(),
        text_config=text_cfg.to_dict(),
        image_token_index=tok.convert_tokens_to_ids(toks.IMAGE),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=text_cfg.tie_word_embeddings,
    )
    return LlavaForConditionalGeneration(cfg)


def layout(config, tok, processor=None) -> Layout:
    v = config.vision_config
    grid = v.image_size // v.patch_size
    img = config.image_token_index
    return Layout("llava", img, grid * grid, [img] * grid * grid, PixelSpec(v.image_size, CLIP_MEAN, CLIP_STD),
                  config.text_config.max_position_embeddings, grid)


def processor(config, tok):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    lay = layout(config, tok)
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": lay.pixels.size},
        crop_size={"height": lay.pixels.size, "width": lay.pixels.size},
        image_mean=list(lay.pixels.mean),
        image_std=list(lay.pixels.std),
    )
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=config.vision_config.patch_size,
                          vision_feature_select_strategy="default", chat_template=tok.chat_template,
                          num_additional_image_tokens=1)


FAMILY = Family("llava", ("llava",), vision="vision_tower", connector="multi_modal_projector", text="language_model",
                build=build, layout=layout, processor=processor, after_save=hub_vision_names)
