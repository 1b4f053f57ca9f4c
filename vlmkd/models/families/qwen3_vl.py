"""Qwen3-VL: Qwen2.5-VL's data path (dynamic resolution, `<|image_pad|>` runs between
`<|vision_start|>` / `<|vision_end|>`, `image_grid_thw`, `mm_token_type_ids` for M-RoPE) with three
differences vlmkd must know: the language model is Qwen3 (per-head q/k RMS norms before RoPE, which
the attention probe applies; interleaved M-RoPE, composed by transformers before the attention); the
tower has a learned position grid (`num_position_embeddings`, a square) and, besides its `merger`,
DeepStack mergers (`deepstack_merger_list`) whose tokens are added to the first decoder layers'
outputs at the visual positions, so they are connectors too (their output width is the language
model's: trained with the projector, left out of a copied tower); its chat template writes no default
system turn. The "projector" hidden point is the main merger's tokens as the first layer receives them.
"""

from __future__ import annotations

from vlmkd.models.families.base import Family, TokenSpec
from vlmkd.models.families.qwen2_vl import TOKENS as QWEN2_TOKENS
from vlmkd.models.families.qwen2_vl import ids_of, layout, processor_for

# the Qwen3-VL-Instruct chat template's text-and-image part (no tools, no reasoning blocks)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENS = TokenSpec(special=QWEN2_TOKENS.special, pad=QWEN2_TOKENS.pad, eos=QWEN2_TOKENS.eos, chat_template=CHAT_TEMPLATE)
HALF = (0.5, 0.5, 0.5)  # Qwen3-VL's image mean and std


def _text_config(spec: dict, tok) -> dict:
    text = spec["text"]
    heads = text["heads"]
    head_dim = text.get("head_dim", text["hidden"] // heads)
    half = head_dim // 2
    # interleaved M-RoPE over (time, height, width), as Qwen3-VL's 24/20/20 of 64
    hw = (half * 5) // 16
    return dict(vocab_size=len(tok), hidden_size=text["hidden"], intermediate_size=text.get("intermediate", 4 * text["hidden"]),
                num_hidden_layers=text["layers"], num_attention_heads=heads, head_dim=head_dim,
                num_key_value_heads=text.get("kv_heads", heads), max_position_embeddings=spec.get("max_positions", 1024),
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                    "mrope_section": [half - 2 * hw, hw, hw], "mrope_interleaved": True},
                pad_token_id=tok.pad_token_id)


def build(spec: dict, tok):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    v = spec["vision"]
    depth = v["layers"]
    grid = v.get("position_grid", 8)  # the learned position grid's side (real checkpoints: 48)
    cfg = Qwen3VLConfig(
        vision_config=dict(depth=depth, hidden_size=v["hidden"], intermediate_size=v.get("intermediate", 4 * v["hidden"]),
                           num_heads=v["heads"], out_hidden_size=spec["text"]["hidden"], patch_size=v.get("patch", 16),
                           spatial_merge_size=v.get("merge", 2), temporal_patch_size=2,
                           num_position_embeddings=grid * grid,
                           deepstack_visual_indexes=v.get("deepstack", list(range(min(depth, 3))))),
        text_config=_text_config(spec, tok), tie_word_embeddings=spec["text"].get("tie_embeddings", False), **ids_of(tok))
    return Qwen3VLForConditionalGeneration(cfg)


FAMILY = Family("qwen3_vl", ("qwen3_vl",), vision="visual", connector="visual.merger", text="language_model",
                build=build, layout=layout,
                processor=processor_for("Qwen3VLProcessor", HALF, HALF, "Qwen3VLVideoProcessor"),
                own_processor=True, tokens=TOKENS, connector_in_vision=True, needs_torchvision=True,
                more_connectors=("visual.deepstack_merger_list",))
