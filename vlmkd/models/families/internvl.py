"""InternVL (transformers' native `internvl` class: InternVL2.5 / InternVL3 "-hf" checkpoints): an
InternViT tower (a CLS token, dropped) -> pixel shuffle (each 2 x 2 patch group to one token at
`downsample_ratio` 0.5) -> `multi_modal_projector` (LayerNorm + MLP) -> a Qwen2 language model. What
vlmkd must know of it:
- its processor tiles each image (`crop_to_patches`: the image resized to the grid of `size` tiles
  closest to its aspect ratio, 1 to `max_patches` of them, plus a thumbnail when there are several), so
  an image costs tiles x `image_seq_length` `<IMG_CONTEXT>` tokens between `<img>` and `</img>`, where
  the chat template writes `<IMG_CONTEXT>\\n`: the count depends on the image's shape; the tiling is the
  processor's call default, which the student's pixels take too (`VisualInputs.encode`);
- the tokenizer names its image tokens (`start_image_token`, `context_image_token`, ...), which the
  processor reads; the forward takes only `pixel_values` (every tile of every image, in order);
- the language model is Qwen2 (plain RoPE, no q/k norms): the attention probe's default math.
"""

from __future__ import annotations

from vlmkd.data.layout import Layout
from vlmkd.models.families.base import (
    Family,
    TokenSpec,
    need_torchvision,
    per_view,
    processor_layout,
    qwen2_text_config,
)

# InternVL3-hf's chat template (as transformers' conversion script writes it)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
         "video_token": "<video>"}
TOKENS = TokenSpec(special=("<|endoftext|>", "<|im_start|>", "<|im_end|>", *NAMED.values()),
                   pad="<|endoftext|>", eos="<|im_end|>", chat_template=CHAT_TEMPLATE, named=NAMED)
MEAN = (0.485, 0.456, 0.406)  # InternVL's ImageNet statistics
STD = (0.229, 0.224, 0.225)


def build(spec: dict, tok):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    v, text = spec["vision"], spec["text"]
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=v["hidden"], num_hidden_layers=v["layers"], num_attention_heads=v["heads"],
                           intermediate_size=v.get("intermediate", 4 * v["hidden"]),
                           image_size=spec.get("image_size", 64), patch_size=v.get("patch", 14)),
        text_config=qwen2_text_config(spec, tok),
        image_token_id=tok.convert_tokens_to_ids(NAMED["context_image_token"]),
        image_seq_length=_tokens_per_tile(spec.get("image_size", 64), v.get("patch", 14)),
        tie_word_embeddings=text.get("tie_embeddings", False))
    return InternVLForConditionalGeneration(cfg)


def _tokens_per_tile(image_size: int, patch: int, ratio: float = 0.5) -> int:
    return int((image_size // patch) ** 2 * ratio**2)


def layout(config, tok, processor) -> Layout:
    return processor_layout(config, processor, config.image_token_id, per_view(processor.image_seq_length))


def processor(config, tok, max_patches: int = 4):
    """The processor a saved model ships: tiles of the tower's input size, 1 to `max_patches` per image
    (real checkpoints: 12) plus the thumbnail."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor, InternVLVideoProcessor

    need_torchvision("internvl")
    size = config.vision_config.image_size
    size = {"height": size[0], "width": size[1]}
    ip = GotOcr2ImageProcessorPil(size=size, crop_to_patches=True, min_patches=1, max_patches=max_patches,
                                  image_mean=list(MEAN), image_std=list(STD))
    vp = InternVLVideoProcessor(size=size, image_mean=list(MEAN), image_std=list(STD))  # (vlmkd reads no video)
    return InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                             image_seq_length=config.image_seq_length, chat_template=tok.chat_template)


FAMILY = Family("internvl", ("internvl",), vision="vision_tower", connector="multi_modal_projector",
                text="language_model", build=build, layout=layout, processor=processor, own_processor=True,
                tokens=TOKENS, needs_torchvision=True)
