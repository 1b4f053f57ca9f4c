"""Gemma 3: SigLIP tower -> `multi_modal_projector` (RMS-normed, average-pooled to `mm_tokens_per_image`
tokens per image: a fixed count) -> Gemma 3 language model. What vlmkd must know of it:
- its processor writes each image as `\\n\\n<start_of_image>` + N x `<image_soft_token>` +
  `<end_of_image>\\n\\n` where the chat template put `<start_of_image>`; ids and pixels come from it;
- the forward takes `token_type_ids` (1 on the image's soft tokens): the tokens of one image attend to
  each other both ways, and most layers attend within a sliding window; the attention probe reads the
  mask each layer itself receives, so its maps hold both rules as the model applies them;
- per-head q/k RMS norms before RoPE, local and global RoPE per layer type, `query_pre_attn_scalar`
  scaling (all read from the attention module by the probe); the embeddings are scaled inside the model.
"""

from __future__ import annotations

import torch

from vlmkd.data.layout import Layout
from vlmkd.models.families.base import (
    Family,
    TokenSpec,
    hub_vision_names,
    per_view,
    processor_layout,
    vit_config,
)

# Gemma 3's instruct chat template (a system turn is folded into the first user turn; roles alternate)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
NAMED = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
TOKENS = TokenSpec(special=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", *NAMED.values()),
                   pad="<pad>", eos="<end_of_turn>", bos="<bos>", chat_template=CHAT_TEMPLATE, named=NAMED,
                   words=("\n", "\n\n", "\n\n\n", "\n\n\n\n"))
HALF = (0.5, 0.5, 0.5)


def build(spec: dict, tok):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = spec["text"]
    heads = text["heads"]
    head_dim = text.get("head_dim", text["hidden"] // heads)
    layers = text["layers"]
    every = text.get("global_every", 6)  # Gemma 3: five sliding-window layers, then a global one
    types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)]
    if "full_attention" not in types:
        types[-1] = "full_attention"
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in NAMED.items()}
    grid = spec.get("image_size", 64) // spec["vision"]["patch"]
    tokens_side = spec.get("tokens_per_side", max(1, grid // 2))
    cfg = Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=text["hidden"], intermediate_size=text.get("intermediate", 4 * text["hidden"]),
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=text.get("kv_heads", heads),
                         head_dim=head_dim, query_pre_attn_scalar=head_dim, max_position_embeddings=spec.get("max_positions", 1024),
                         sliding_window=text.get("sliding_window", 512), layer_types=types,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=text.get("tie_embeddings", True)),
        vision_config={**vit_config({**spec, "image_size": spec.get("image_size", 64)}), "model_type": "siglip_vision_model"},
        mm_tokens_per_image=tokens_side * tokens_side, boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"], tie_word_embeddings=text.get("tie_embeddings", True))
    model = Gemma3ForConditionalGeneration(cfg)
    # transformers initialises the projector's weight to zeros (a checkpoint overwrites it): a model built
    # here would see every image as zeros, so it starts random, as the other families' connectors do
    w = model.model.multi_modal_projector.mm_input_projection_weight
    torch.nn.init.normal_(w, std=w.shape[0] ** -0.5)
    return model


def layout(config, tok, processor) -> Layout:
    return processor_layout(config, processor, config.image_token_index, per_view(config.mm_tokens_per_image),
                            token_types="token_type_ids")


def processor(config, tok):
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    size = config.vision_config.image_size
    ip = Gemma3ImageProcessorPil(size={"height": size, "width": size}, image_mean=list(HALF), image_std=list(HALF),
                                 do_pan_and_scan=False)
    return Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template,
                           image_seq_length=config.mm_tokens_per_image)


FAMILY = Family("gemma3", ("gemma3",), vision="vision_tower", connector="multi_modal_projector", text="language_model",
                build=build, layout=layout, processor=processor, own_processor=True, tokens=TOKENS,
                after_save=hub_vision_names)
