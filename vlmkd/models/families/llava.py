"""LLaVA-1.5: CLIP vision tower -> MLP projector -> Llama; N x `<image>` per image. Saved under the
hub checkpoints' weight names (`vision_tower.vision_model.*`, `vlmkd.models.build`). A demo model uses
vlmkd's template; a checkpoint with its own (LLaVA-1.5-hf's) is tokenised by its processor, pixels by
CLIP's shortest-edge resize and centre crop, as it was trained."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from vlmkd.data.images import PixelSpec
from vlmkd.data.layout import Layout
from vlmkd.models import tokenizer as toks
from vlmkd.models.families.base import (
    Family,
    TokenSpec,
    hub_vision_names,
    llama_text_config,
    per_view,
    processor_layout,
    vit_config,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# LLaVA-1.5-hf's chat template (llava-hf/llava-1.5-*-hf): images first in each turn, no end-of-turn
# marker (an answer ends with a space, which is not learnt), no system line
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# what a LLaVA-1.5 checkpoint's tokenizer has (its processor is `processor` below: CLIP's resize and
# centre crop); a model saved with it takes the checkpoint's processor path (`build.processor_path`)
CHECKPOINT_TOKENS = TokenSpec(special=("<unk>", "<s>", "</s>", "<pad>", toks.IMAGE), pad="<pad>", eos="</s>", bos="<s>",
                              chat_template=CHAT_TEMPLATE)


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
    if processor is not None:  # a checkpoint's own processor (LLaVA-1.5's centre crop): a count per image
        per = (v.image_size // v.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")
        return processor_layout(config, processor, config.image_token_index, per_view(per))
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
                build=build, layout=layout, processor=processor, after_save=hub_vision_names,
                demo_template=True)
