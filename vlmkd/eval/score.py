"""Greedy decoding and the answer-matching rules of `vlmkd eval`.

Rules (`match`):
- `first_word`: the first word of the answer, lower-cased and stripped of punctuation, equals the
  reference's (the shapes rule, shared/DATASET.md "Scoring": one-word answers);
- `exact`: the stripped strings are equal;
- `normalised`: equal after lower-casing, removing punctuation and the articles a/an/the, and
  collapsing whitespace (the SQuAD / VQA normalisation, for free-form answers);
- `choice`: multiple choice: the option letter of the answer ("B", "(B)", "B.", "The answer is B")
  equals the reference's (ScienceQA's letter answers).
Every assistant turn of a conversation is one exchange, scored against its own prompt prefix. The
per-type table groups by a manifest field (`type_field`) when the rows have it.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from vlmkd.data.dataset import Item, collate, model_inputs
from vlmkd.data.layout import Layout
from vlmkd.errors import DataError

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LETTER = re.compile(r"^\s*(?:the\s+answer\s+is\s*:?\s*)?\(?([A-Z])(?:[).:,]|\s|$)", re.IGNORECASE)
MATCHES = ("first_word", "exact", "normalised", "choice")


def first_word(text: str) -> str:
    words = _PUNCT.sub(" ", text.lower()).split()
    return words[0] if words else ""


def normalised(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower())).split())


def choice_letter(text: str) -> str:
    m = _LETTER.match(text)
    return m.group(1).upper() if m else ""


def matches(prediction: str, reference: str, rule: str) -> bool:
    if rule == "first_word":
        return first_word(prediction) == first_word(reference)
    if rule == "exact":
        return prediction.strip() == reference.strip()
    if rule == "normalised":
        return normalised(prediction) == normalised(reference)
    if rule == "choice":
        ref = choice_letter(reference)
        if not ref:
            raise DataError(f"--match choice: the reference answer {reference[:60]!r} has no option letter")
        return choice_letter(prediction) == ref
    raise DataError(f"unknown --match {rule!r}; choose one of {MATCHES}")


@torch.no_grad()
def greedy_answers(
    model,
    items: Sequence[Item],
    layout: Layout,
    tokenizer,
    batch_size: int = 64,
    max_new_tokens: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations of each item's prompt. Prompts are grouped by length, so no padding."""
    model.eval()
    out: list[str] = [""] * len(items)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_len[it.enc.prompt_len].append(i)
    pad_id = tokenizer.pad_id
    device = next(model.parameters()).device
    for _, idxs in sorted(by_len.items()):
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s : s + batch_size]
            batch = collate([items[i] for i in chunk], layout, pad_id, prompt_only=True)
            gen = model.generate(
                **model_inputs(batch, device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eou_id,
                pad_token_id=pad_id,
            )
            new = gen[:, batch["input_ids"].shape[1] :]
            for i, row in zip(chunk, new.tolist(), strict=True):
                if tokenizer.eou_id in row:
                    row = row[: row.index(tokenizer.eou_id)]
                out[i] = tokenizer.decode(row).strip()
            if progress:
                progress(len(chunk))
    return out


def score(items: Sequence[Item], predictions: Sequence[str], references: Sequence[str] | None = None,
          match: str = "first_word", type_field: str | None = "question_type") -> dict:
    """{"accuracy", "n", "match", "per_type": {type: {"accuracy", "n"}}}; `references` default to each
    item's first answer (an item made by `exchanges` carries the answer of its own turn)."""
    refs = references if references is not None else [it.sample.answer for it in items]
    hits: dict[str, list[int]] = defaultdict(list)
    total = []
    for it, pred, ref in zip(items, predictions, refs, strict=True):
        ok = int(matches(pred, ref, match))
        if type_field and it.sample.extra.get(type_field) is not None:
            hits[str(it.sample.extra[type_field])].append(ok)
        total.append(ok)
    per_type = {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(hits.items())}
    return {"accuracy": sum(total) / len(total) if total else 0.0, "n": len(total), "match": match,
            "per_type": per_type}
