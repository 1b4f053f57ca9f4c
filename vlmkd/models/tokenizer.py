"""A byte-level BPE tokenizer trained locally on a data set's texts, saved in Hugging Face format.

No hub: the demo's teacher and student share one tokenizer trained here. Special tokens follow the
Idefics3 (SmolVLM) processor, which looks them up by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlmkd.data.template import BOS, EOU, chat_template

PAD = "<pad>"
UNK = "<unk>"
IMAGE = "<image>"
FAKE_IMAGE = "<fake_token_around_image>"
GLOBAL_IMAGE = "<global-img>"
# Idefics3's processor resolves these names even when it never splits an image.
ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
SPECIAL_TOKENS = [PAD, UNK, BOS, EOU, IMAGE, FAKE_IMAGE, GLOBAL_IMAGE, *ROW_COL]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, image_position: str = "start") -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts`; the role words of the chat template are in every corpus."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["User: Assistant: System:\n", *texts]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOU,
        additional_special_tokens=[EOU, IMAGE, FAKE_IMAGE, GLOBAL_IMAGE],
        model_max_length=4096,
    )
    fast.chat_template = chat_template(image_position)
    fast.init_kwargs["image_position"] = image_position  # read by vlmkd.data.template.Tokenizer
    return fast


def train_family_tokenizer(texts: Iterable[str], tokens, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts` with a model family's special tokens and chat template (`TokenSpec`):
    a tokenizer that stands in for a checkpoint's (tiny test models, from-scratch students of the family)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(tokens.special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["user assistant system\n", *texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=tokens.pad, eos_token=tokens.eos,
                                   bos_token=tokens.bos, additional_special_tokens=list(tokens.special),
                                   model_max_length=32768, extra_special_tokens=dict(tokens.named or {}))
    if tokens.words:
        fast.add_tokens(list(tokens.words))
    fast.chat_template = tokens.chat_template
    return fast


def save_tokenizer(tok: PreTrainedTokenizerFast, out: str | Path) -> None:
    tok.save_pretrained(str(out))
