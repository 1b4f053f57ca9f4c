"""PaliGemma (1 and 2): SigLIP tower -> a linear `multi_modal_projector` -> Gemma (2), a prefix-LM
with no chat template. What vlmkd must know of it:
- a sample is one prompt and one answer: `processor(text=prompt, images=..., suffix=answer)` writes
  `image_seq_length` `<image>` tokens per image, BOS, the prompt and a newline (the prefix), then the
  answer and EOS (the suffix, the tokens learnt); `vlmkd.data.processor.PrefixEncoder` is its data
  path, and a multi-turn, system-turn or text-only sample is refused saying so;
- the forward takes `token_type_ids`, 1 on the suffix: the prefix (images and prompt) attends both
  ways, the answer causally; the attention probe reads the mask each layer receives, so its maps hold
  that rule as the model applies it;
- the image features are divided by sqrt(hidden) before they replace the image tokens (Gemma scales
  every embedding by sqrt(hidden) inside its language model): the `projector` hidden point is them so
  divided, as the language model receives them;
- its processor adds PaliGemma's 1024 `<locNNNN>` and 128 `<segNNN>` tokens to the tokenizer, so a
  tokenizer of the family has them.
"""

from __future__ import annotations

from vlmkd.data.layout import Layout
from vlmkd.models.families.base import (
    Family,
    TokenSpec,
    hub_vision_names,
    per_view,
    processor_layout,
    vit_config,
)

HALF = (0.5, 0.5, 0.5)


def tokens() -> TokenSpec:
    from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS

    return TokenSpec(special=("<pad>", "<eos>", "<bos>", "<image>", *EXTRA_TOKENS), pad="<pad>", eos="<eos>",
                     bos="<bos>", chat_template="", named={"image_token": "<image>"})


def build(spec: dict, tok):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    text = spec["text"]
    heads = text["heads"]
    size = spec.get("image_size", 64)
    grid = size // spec["vision"]["patch"]
    cfg = PaliGemmaConfig(
        vision_config={**vit_config({**spec, "image_size": size}), "model_type": "siglip_vision_model",
                       "num_image_tokens": grid * grid, "projection_dim": text["hidden"]},
        text_config=dict(model_type="gemma", vocab_size=len(tok), hidden_size=text["hidden"],
                         intermediate_size=text.get("intermediate", 4 * text["hidden"]), num_hidden_layers=text["layers"],
                         num_attention_heads=heads, num_key_value_heads=text.get("kv_heads", heads),
                         head_dim=text.get("head_dim", text["hidden"] // heads),
                         max_position_embeddings=spec.get("max_positions", 1024), pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=text["hidden"],
        hidden_size=text["hidden"], vocab_size=len(tok))
    return PaliGemmaForConditionalGeneration(cfg)


def layout(config, tok, processor) -> Layout:
    return processor_layout(config, processor, config.image_token_index, per_view(processor.image_seq_length),
                            token_types="token_type_ids", prefix_lm=True)


def processor(config, tok):
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    size = config.vision_config.image_size
    ip = SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=list(HALF), image_std=list(HALF))
    ip.image_seq_length = config.vision_config.num_image_tokens  # (saved in its config, as the checkpoints have it)
    return PaliGemmaProcessor(image_processor=ip, tokenizer=tok)


FAMILY = Family("paligemma", ("paligemma",), vision="vision_tower", connector="multi_modal_projector",
                text="language_model", build=build, layout=layout, processor=processor, own_processor=True,
                tokens=tokens(), after_save=hub_vision_names)
