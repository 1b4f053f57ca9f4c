"""Qwen2-VL and Qwen2.5-VL: a ViT over 2-D patches (dynamic resolution: any image size, resized to a
multiple of patch x merge within the processor's min/max pixels) whose `merger` (inside the tower's
module) maps each 2 x 2 patch group to one visual token, then a Qwen2 language model with M-RoPE
(positions over time, height and width; transformers composes them before the attention, so vlmkd's
attention probe applies them as any RoPE). Images cost a variable number of `<|image_pad|>` tokens
between `<|vision_start|>` and `<|vision_end|>`; the forward takes `image_grid_thw` beside the
flattened patches. Ids and pixels come from the checkpoint's processor and chat template.
"""

from __future__ import annotations

from vlmkd.data.layout import Layout
from vlmkd.models.families.base import Family, TokenSpec, need_torchvision, processor_layout

# the Qwen2-VL-Instruct chat template (text and images; the same for Qwen2.5-VL)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENS = TokenSpec(
    special=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
             "<|image_pad|>", "<|video_pad|>"),
    pad="<|endoftext|>", eos="<|im_end|>", chat_template=CHAT_TEMPLATE)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _text_config(spec: dict, tok) -> dict:
    text = spec["text"]
    heads = text["heads"]
    half = text["hidden"] // heads // 2
    # M-RoPE splits each head's rotary half over (time, height, width), as Qwen's 16/24/24 of 64
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    return dict(vocab_size=len(tok), hidden_size=text["hidden"], intermediate_size=text.get("intermediate", 4 * text["hidden"]),
                num_hidden_layers=text["layers"], num_attention_heads=heads,
                num_key_value_heads=text.get("kv_heads", heads), max_position_embeddings=spec.get("max_positions", 1024),
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                    "mrope_section": section},
                bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)


def ids_of(tok) -> dict:
    return {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}


def build_qwen2_vl(spec: dict, tok):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    v = spec["vision"]
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=v["layers"], embed_dim=v["hidden"], hidden_size=spec["text"]["hidden"],
                           num_heads=v["heads"], mlp_ratio=v.get("intermediate", 4 * v["hidden"]) // v["hidden"],
                           patch_size=v.get("patch", 14), spatial_merge_size=v.get("merge", 2), temporal_patch_size=2),
        text_config=_text_config(spec, tok), tie_word_embeddings=spec["text"].get("tie_embeddings", False), **ids_of(tok))
    return Qwen2VLForConditionalGeneration(cfg)


def build_qwen2_5_vl(spec: dict, tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    v = spec["vision"]
    depth = v["layers"]
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=depth, hidden_size=v["hidden"], intermediate_size=v.get("intermediate", 4 * v["hidden"]),
                           num_heads=v["heads"], out_hidden_size=spec["text"]["hidden"], patch_size=v.get("patch", 14),
                           spatial_merge_size=v.get("merge", 2), temporal_patch_size=2,
                           window_size=v.get("window", 2 * v.get("patch", 14) * v.get("merge", 2)),
                           fullatt_block_indexes=v.get("full_attention_blocks", [depth - 1])),
        text_config=_text_config(spec, tok), tie_word_embeddings=spec["text"].get("tie_embeddings", False), **ids_of(tok))
    return Qwen2_5_VLForConditionalGeneration(cfg)


def layout(config, tok, processor) -> Layout:
    merge = processor.image_processor.merge_size

    def count(inputs: dict) -> int:
        return int(inputs["image_grid_thw"].prod(-1).sum()) // merge**2

    return processor_layout(config, processor, config.image_token_id, count, ("pixel_values", "image_grid_thw"),
                            token_types="mm_token_type_ids")


def processor_for(cls_name: str, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD, video_cls: str = "Qwen2VLVideoProcessor"):
    """The processor a saved model of the family ships: the image processor sized to the config's
    patches (min/max pixels: 4 to 64 merged tokens by default, for the tiny test and demo models)."""

    def processor(config, tok, min_pixels: int | None = None, max_pixels: int | None = None):
        import transformers
        from transformers import Qwen2VLImageProcessorPil

        need_torchvision(cls_name)

        v = config.vision_config
        factor = v.patch_size * v.spatial_merge_size
        ip = Qwen2VLImageProcessorPil(min_pixels=min_pixels or 4 * factor * factor,
                                      max_pixels=max_pixels or 64 * factor * factor, patch_size=v.patch_size,
                                      merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                                      image_mean=list(mean), image_std=list(std))
        # (vlmkd reads no video; the processor needs one)
        vp = getattr(transformers, video_cls)(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                              temporal_patch_size=v.temporal_patch_size, image_mean=list(mean),
                                              image_std=list(std))
        return getattr(transformers, cls_name)(image_processor=ip, tokenizer=tok, video_processor=vp,
                                               chat_template=tok.chat_template)

    return processor


QWEN2_VL = Family("qwen2_vl", ("qwen2_vl",), vision="visual", connector="visual.merger", text="language_model",
                  build=build_qwen2_vl, layout=layout, processor=processor_for("Qwen2VLProcessor"), own_processor=True,
                  tokens=TOKENS, connector_in_vision=True, needs_torchvision=True)
QWEN2_5_VL = Family("qwen2_5_vl", ("qwen2_5_vl",), vision="visual", connector="visual.merger", text="language_model",
                    build=build_qwen2_5_vl, layout=layout, processor=processor_for("Qwen2_5_VLProcessor"),
                    own_processor=True, tokens=TOKENS, connector_in_vision=True, needs_torchvision=True)
