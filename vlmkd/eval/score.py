"""Greedy decoding and the shapes scoring rule (shared/DATASET.md "Scoring").

The first word of the answer, lower-cased and stripped of punctuation, must equal the reference.
Question types are inferred from the text, since other people's manifests carry no type field.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from vlmkd.data.dataset import Item, collate, model_inputs
from vlmkd.data.layout import Layout
from vlmkd.data.shapes import infer_question_type

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def first_word(text: str) -> str:
    words = _PUNCT.sub(" ", text.lower()).split()
    return words[0] if words else ""


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


def score(items: Sequence[Item], predictions: Sequence[str]) -> dict:
    """{"accuracy", "n", "per_type": {type: {"accuracy", "n"}}} over items with a reference answer."""
    hits: dict[str, list[int]] = defaultdict(list)
    total = []
    for it, pred in zip(items, predictions, strict=True):
        ok = int(first_word(pred) == first_word(it.sample.answer))
        hits[infer_question_type(it.sample.question)].append(ok)
        total.append(ok)
    per_type = {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(hits.items())}
    return {"accuracy": sum(total) / len(total) if total else 0.0, "n": len(total), "per_type": per_type}
