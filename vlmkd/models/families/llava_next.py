"""LLaVA-NeXT (LLaVA-1.6) and LLaVA-OneVision: LLaVA's tower -> MLP projector -> language model, with
"anyres" images. What vlmkd must know of them:
- the processor cuts each image into the tiles of the `image_grid_pinpoints` resolution that fits it
  best, plus a base view of the whole image ([images, tiles, 3, H, W], padded to the call's most tiles,
  with `image_sizes`); the model projects every tile, drops the padding the resize added ("unpad"),
  appends the learned `image_newline` after each row of tokens and puts the base view's tokens first:
  an image costs a count that depends on its size and shape, every one of them an `<image>` token
  (newlines included). So the visual tokens as the language model receives them are not the
  projector's output in order: the `projector` hidden point reads the language model's input
  embeddings at the image tokens (`vlmkd.models.probe`), which holds for every family;
- LLaVA-OneVision takes several images per sample as base views only (one newline each), which its
  processor tells from single images by the per-sample nesting and the forward by `batch_num_images`;
- saved under the hub checkpoints' tower names (`vision_tower.vision_model.*`), as LLaVA's;
- LLaVA-NeXT: CLIP tower, the CLS token dropped, features from the second-last layer, a Llama (or
  Mistral) LM; LLaVA-OneVision: SigLIP tower, all tokens, the last layer, a Qwen2 LM.
The test models are saved with OneVision's ChatML template (`<image>\\n` first in each turn), which
LLaVA-NeXT checkpoints on a ChatML LM (llava-next-72b/110b) ship too.
"""

from __future__ import annotations

from vlmkd.data.layout import Layout
from vlmkd.models.families.base import (
    Family,
    TokenSpec,
    hub_vision_names,
    llama_text_config,
    need_torchvision,
    processor_layout,
    qwen2_text_config,
    vit_config,
)

# LLaVA-OneVision-hf's chat template (as transformers' conversion script writes it)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOKENS = TokenSpec(special=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"),
                   pad="<|endoftext|>", eos="<|im_end|>", chat_template=CHAT_TEMPLATE)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP's


def _pinpoints(size: int, most: int) -> list[list[int]]:
    """Tile grids of up to `most` tiles per side (real checkpoints: up to 6 x 6 of 384)."""
    return [[h * size, w * size] for h in range(1, most + 1) for w in range(1, most + 1)]


def _ids(tok) -> dict:
    return {"image_token_index": tok.convert_tokens_to_ids("<image>")}


def build_next(spec: dict, tok):
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    text_cfg = llama_text_config(spec["text"], tok, spec.get("max_positions", 1024))
    text_cfg.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    size = spec.get("image_size", 32)
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vit_config({**spec, "image_size": size}),
                                       projection_dim=spec["vision"]["hidden"]).to_dict(),
        text_config=text_cfg.to_dict(), vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_grid_pinpoints=_pinpoints(size, spec.get("tiles_per_side", 2)),
        tie_word_embeddings=text_cfg.tie_word_embeddings, **_ids(tok))
    return LlavaNextForConditionalGeneration(cfg)


def build_onevision(spec: dict, tok):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    text = spec["text"]
    size = spec.get("image_size", 32)
    cfg = LlavaOnevisionConfig(
        vision_config={**vit_config({**spec, "image_size": size}), "model_type": "siglip_vision_model"},
        text_config=qwen2_text_config(spec, tok),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=_pinpoints(size, spec.get("tiles_per_side", 2)),
        video_token_index=tok.convert_tokens_to_ids("<video>"), tie_word_embeddings=text.get("tie_embeddings", False),
        **_ids(tok))
    return LlavaOnevisionForConditionalGeneration(cfg)


def layout(config, tok, processor) -> Layout:
    """`count`: the `<image>` tokens the model fills, from each image's size by the processor's own rule
    (`_get_number_of_features`), which the encoder holds to the ids the processor wrote."""
    keys = ("pixel_values", "image_sizes") + (("batch_num_images",) if config.model_type == "llava_onevision" else ())

    def count(inputs: dict) -> int:
        return sum(_image_tokens(config, processor, inputs, i) for i in range(len(inputs["image_sizes"])))

    return processor_layout(config, processor, config.image_token_index, count, keys)


def _image_tokens(config, processor, inputs: dict, i: int) -> int:
    """Visual tokens of image i: the processor's count for its size (several images of one
    LLaVA-OneVision sample: the base view and one newline)."""
    if "batch_num_images" in inputs and int(inputs["batch_num_images"].sum()) > 1:
        n = processor.num_image_tokens + 1
    else:
        h, w = (int(x) for x in inputs["image_sizes"][i])
        side = config.vision_config.image_size
        n = processor._get_number_of_features(h, w, side, side)
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


def processor_next(config, tok):
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    size = config.vision_config.image_size
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                    image_grid_pinpoints=config.image_grid_pinpoints, image_mean=list(CLIP_MEAN),
                                    image_std=list(CLIP_STD))
    return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=config.vision_config.patch_size,
                              vision_feature_select_strategy=config.vision_feature_select_strategy,
                              num_additional_image_tokens=1, chat_template=tok.chat_template)


def processor_onevision(config, tok):
    from transformers import (
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    need_torchvision("llava_onevision")
    size = config.vision_config.image_size
    ip = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size},
                                         image_grid_pinpoints=config.image_grid_pinpoints, image_mean=list(HALF),
                                         image_std=list(HALF))
    vp = LlavaOnevisionVideoProcessor(size={"height": size, "width": size}, image_mean=list(HALF),
                                      image_std=list(HALF))  # (vlmkd reads no video)
    grid = size // config.vision_config.patch_size
    return LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, num_image_tokens=grid * grid,
                                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                                   vision_aspect_ratio=config.vision_aspect_ratio, chat_template=tok.chat_template)


LLAVA_NEXT = Family("llava_next", ("llava_next",), vision="vision_tower", connector="multi_modal_projector",
                    text="language_model", build=build_next, layout=layout, processor=processor_next,
                    own_processor=True, tokens=TOKENS, connector_params=("image_newline",), after_save=hub_vision_names)
LLAVA_ONEVISION = Family("llava_onevision", ("llava_onevision",), vision="vision_tower",
                         connector="multi_modal_projector", text="language_model", build=build_onevision,
                         layout=layout, processor=processor_onevision, own_processor=True, tokens=TOKENS,
                         connector_params=("image_newline",), after_save=hub_vision_names, needs_torchvision=True)
