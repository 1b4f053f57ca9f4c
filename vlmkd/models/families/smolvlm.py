"""SmolVLM2 (`smolvlm`): Idefics3's layout (SigLIP tower -> pixel-shuffle connector -> Llama) with the
checkpoint's own processor. What vlmkd must know of it:
- its processor splits each image (`do_image_splitting`): resized to the processor's `size`, cut into a
  grid of `max_image_size` tiles, each written `<fake_token_around_image><row_i_col_j>` + N x `<image>`,
  then the whole image once more as `<global-img>` + N x `<image>`: an image costs
  (rows x cols + 1) x `image_seq_len` tokens, by its size and shape;
- the forward takes `pixel_values` [samples, sub-images, 3, S, S] and `pixel_attention_mask`, padded
  per call with all-zero sub-images, which the model drops (so rows of a batch pad to the most);
- its tokenizer names `<fake_token_around_image>`, `<global-img>`, `<end_of_utterance>`; the processor
  needs num2words and (its video slot) torchvision.
"""

from __future__ import annotations

from vlmkd.data.layout import Layout
from vlmkd.models.families.base import (
    Family,
    TokenSpec,
    llama_text_config,
    need_torchvision,
    vit_config,
)
from vlmkd.models.families.idefics3 import split_layout

GRID = 4  # row/col tokens a tokenizer of the family has (real checkpoints: 6 x 6)
NAMED = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>", "global_image_token": "<global-img>",
         "end_of_utterance_token": "<end_of_utterance>", "video_token": "<video>"}


def _chat_template() -> str:
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    return DEFAULT_CHAT_TEMPLATE  # SmolVLM2-Instruct's


def tokens() -> TokenSpec:
    rows = tuple(f"<row_{i}_col_{j}>" for i in range(1, GRID + 1) for j in range(1, GRID + 1))
    return TokenSpec(special=("<|endoftext|>", "<|im_start|>", *NAMED.values(), *rows), pad="<|endoftext|>",
                     eos="<end_of_utterance>", chat_template=_chat_template(), named=NAMED)


SIGLIP = (0.5, 0.5, 0.5)


def build(spec: dict, tok):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    text_cfg = llama_text_config(spec["text"], tok, spec.get("max_positions", 1024))
    size = spec.get("image_size", 32)
    cfg = SmolVLMConfig(vision_config=vit_config({**spec, "image_size": size}), text_config=text_cfg.to_dict(),
                        scale_factor=spec.get("scale_factor", 2), image_token_id=tok.convert_tokens_to_ids("<image>"),
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=text_cfg.tie_word_embeddings)
    return SmolVLMForConditionalGeneration(cfg)


def layout(config, tok, processor) -> Layout:
    return split_layout(config, processor)


def processor(config, tok, tiles_per_side: int = 2):
    """The processor a saved model ships: images resized to `tiles_per_side` tiles of the tower's input
    on the longest edge (real checkpoints: 4 x 512 of 512), split, plus the global view."""
    from transformers import SmolVLMImageProcessorPil, SmolVLMProcessor, SmolVLMVideoProcessor

    need_torchvision("smolvlm")
    side = config.vision_config.image_size
    ip = SmolVLMImageProcessorPil(size={"longest_edge": tiles_per_side * side}, max_image_size={"longest_edge": side},
                                  do_image_splitting=True, image_mean=list(SIGLIP), image_std=list(SIGLIP))
    vp = SmolVLMVideoProcessor(size={"longest_edge": side}, max_image_size={"longest_edge": side},
                               image_mean=list(SIGLIP), image_std=list(SIGLIP))  # (vlmkd reads no video)
    grid = side // config.vision_config.patch_size
    return SmolVLMProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                            image_seq_len=grid * grid // config.scale_factor**2, chat_template=tok.chat_template)


FAMILY = Family("smolvlm", ("smolvlm",), vision="vision_model", connector="connector", text="text_model",
                build=build, layout=layout, processor=processor, own_processor=True, tokens=tokens(),
                needs_torchvision=True)
