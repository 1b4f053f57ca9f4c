"""Mistral 3 (Mistral-Small-3.1 and later: `mistral3`): a Pixtral tower (2-D RoPE over patches, any
image size) -> `multi_modal_projector` (RMS norm, a 2 x 2 patch merger, MLP) -> a Mistral language
model. What vlmkd must know of it:
- its processor (`PixtralProcessor`) resizes each image to fit the tower's longest edge in patch
  multiples and writes it row by row: per row of merged patches, that many `[IMG]` tokens and an
  `[IMG_BREAK]`, the last break an `[IMG_END]`; only `[IMG]` positions hold visual tokens, so an image
  costs (height / (patch x merge)) x (width / (patch x merge)) of them, by its own size;
- the forward takes `image_sizes` beside `pixel_values` (padded per call to the call's largest image;
  the tower crops each image back to its size);
- the chat template writes the BOS itself and each answer ends with `</s>`.
The test models' template is Mistral-Small-3.1's without its default system prompt (which holds the
current date, so the prompt would change from day to day).
"""

from __future__ import annotations

from vlmkd.data.layout import Layout
from vlmkd.models.families.base import Family, TokenSpec, processor_layout

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}{%- endif %}"
    "{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)
TOKENS = TokenSpec(special=("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                            "[IMG]", "[IMG_BREAK]", "[IMG_END]"),
                   pad="<pad>", eos="</s>", bos="<s>", chat_template=CHAT_TEMPLATE)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build(spec: dict, tok):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    v, text = spec["vision"], spec["text"]
    heads = text["heads"]
    cfg = Mistral3Config(
        vision_config=dict(model_type="pixtral", hidden_size=v["hidden"], intermediate_size=v.get("intermediate", 4 * v["hidden"]),
                           num_hidden_layers=v["layers"], num_attention_heads=v["heads"],
                           head_dim=v["hidden"] // v["heads"], image_size=spec.get("image_size", 64),
                           patch_size=v.get("patch", 14)),
        text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=text["hidden"],
                         intermediate_size=text.get("intermediate", 4 * text["hidden"]),
                         num_hidden_layers=text["layers"], num_attention_heads=heads,
                         num_key_value_heads=text.get("kv_heads", heads), head_dim=text["hidden"] // heads,
                         max_position_embeddings=spec.get("max_positions", 1024), sliding_window=None,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=text.get("tie_embeddings", False)),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=v.get("merge", 2),
        tie_word_embeddings=text.get("tie_embeddings", False))
    return Mistral3ForConditionalGeneration(cfg)


def layout(config, tok, processor) -> Layout:
    step = processor.patch_size * processor.spatial_merge_size

    def count(inputs: dict) -> int:
        return int(sum((int(h) // step) * (int(w) // step) for h, w in inputs["image_sizes"]))

    return processor_layout(config, processor, config.image_token_index, count, ("pixel_values", "image_sizes"))


def processor(config, tok):
    from transformers import PixtralImageProcessorPil, PixtralProcessor

    v = config.vision_config
    ip = PixtralImageProcessorPil(size={"longest_edge": v.image_size},
                                  patch_size={"height": v.patch_size, "width": v.patch_size},
                                  image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return PixtralProcessor(image_processor=ip, tokenizer=tok, patch_size=v.patch_size,
                            spatial_merge_size=config.spatial_merge_size, chat_template=tok.chat_template)


FAMILY = Family("mistral3", ("mistral3",), vision="vision_tower", connector="multi_modal_projector",
                text="language_model", build=build, layout=layout, processor=processor, own_processor=True,
                tokens=TOKENS)
