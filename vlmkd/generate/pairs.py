"""`vlmkd pairs`: LLaVA-MoD preference pairs from a model's own answers, ranked by the teacher.

Input: a `vlmkd generate` manifest with several answers per prompt (`--n`). Per prompt, the teacher
scores every distinct answer by its mean log-probability per response token (the end-of-turn marker
included; the mean, not the sum, so a short answer is not preferred for being short). Rules:
- `teacher`: chosen = the answer the teacher likes best, rejected = the one it likes least;
- `reference`: chosen = the data set's answer the generation replaced, rejected = the teacher's
  favourite among the answers that do not match it (`--match`): the hardest wrong answer.
Each pair is written as the prompt row with the chosen answer and a `rejected` field (what
`cache-teacher` scores into the `pref` payload), plus a `pair` field with the rule and the scores. A
prompt with no pair (all answers alike; no wrong answer; no reference) is recorded with the reason:
prompts = pairs + rejects.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from vlmkd.data.dataset import collate, encode_samples, model_inputs
from vlmkd.data.manifest import Reject, Turn, columns_for, read_rows
from vlmkd.errors import DataError
from vlmkd.eval.score import MATCHES, matches
from vlmkd.generate.rows import answered_row
from vlmkd.progress import bar, console
from vlmkd.teacher.hf_backend import response_logprobs

RULES = ("teacher", "reference")


@torch.no_grad()
def answer_scores(model, tok, layout, samples: list, batch_size: int = 32) -> list[float]:
    """The teacher's mean log-prob per response token of each sample's last answer."""
    items = encode_samples(samples, tok, layout, strict=True)
    out = []
    for s in range(0, len(items), batch_size):
        chunk = items[s: s + batch_size]
        logits = model(**model_inputs(collate(chunk, layout, tok.pad_id))).logits
        for b, it in enumerate(chunk):
            idx = np.flatnonzero(it.enc.labels_mask)
            # the last answer's tokens: the final run of response positions
            start = idx[np.r_[0, np.flatnonzero(np.diff(idx) > 1) + 1][-1]]
            last = np.zeros_like(it.enc.labels_mask)
            last[start:idx[-1] + 1] = True
            out.append(float(response_logprobs(logits[b], replace(it.enc, labels_mask=last)).mean()))
    return out


def make_pairs(teacher: Path, data: Path, out: Path, rule: str = "teacher", match: str = "first_word",
               batch_size: int = 32) -> dict:
    from vlmkd.models.build import data_tokenizer, load_model

    if rule not in RULES:
        raise DataError(f"--rule {rule!r}: choose one of {RULES}")
    if match not in MATCHES:
        raise DataError(f"--match {match!r}: choose one of {MATCHES}")
    out = Path(out)
    if out.suffix != ".jsonl":
        raise DataError(f"--out {out}: a .jsonl manifest")
    cols, src_root = columns_for(Path(data)), Path(data).parent
    groups: dict[tuple, list] = defaultdict(list)
    rejects = []
    for raw, sample in read_rows(data):
        gen = raw.get("generation") if isinstance(raw, dict) else None
        if isinstance(sample, Reject):
            rejects.append({"id": sample.sample_id, "source": sample.source, "reason": sample.reason})
        elif not isinstance(gen, dict) or "prompt_row" not in gen:
            rejects.append({"id": sample.id, "source": str(data), "reason": f"row {sample.id} has no `generation` "
                            "field: pairs are made from `vlmkd generate` answers (--n 2 or more)"})
        else:
            groups[(gen.get("prompt_file"), gen["prompt_row"])].append((raw, sample))
    model, hf_tok = load_model(teacher)
    model.eval()
    tok, layout = data_tokenizer(model, hf_tok)
    pairs = []
    with bar() as p:
        task = p.add_task("ranking answers", total=len(groups), unit="prompts")
        for (_, _), rows in groups.items():
            raw, first = rows[0]
            pid = raw["generation"]["prompt_id"]
            texts = list(dict.fromkeys(s.turns[-1].text for _, s in rows))
            reference = raw["generation"].get("replaced")
            cands = texts + ([reference] if rule == "reference" and reference and reference not in texts else [])
            try:
                scores = dict(zip(cands, answer_scores(
                    model, tok, layout, [replace(first, turns=first.turns[:-1] + (Turn("assistant", t),)) for t in cands],
                    batch_size), strict=True))
            except DataError as e:
                rejects.append({"id": pid, "source": str(data), "reason": str(e)})
                p.update(task, advance=1)
                continue
            chosen, rejected, why = _choose(rule, texts, scores, reference, match)
            if why:
                rejects.append({"id": pid, "source": str(data), "reason": f"prompt {pid}: {why}"})
            else:
                row = answered_row(raw, cols, chosen, f"{pid}-pair", src_root, out.parent)
                row.pop("generation", None)
                row["rejected"] = rejected
                row["pair"] = {"rule": rule, "teacher": str(Path(teacher).resolve()), "answers": len(rows),
                               "distinct": len(texts), "chosen_score": scores[chosen],
                               "rejected_score": scores[rejected], "from": [r["id"] for r, _ in rows]}
                pairs.append(row)
            p.update(task, advance=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs), encoding="utf-8")
    rej = out.with_name(out.stem + ".rejects.jsonl")
    rej.write_text("".join(json.dumps(r) + "\n" for r in rejects), encoding="utf-8")
    counts = {"prompts": len(groups), "pairs": len(pairs), "rejects": len(rejects)}
    console.print(f"{out}: {len(pairs)} pairs from {len(groups)} prompts ({rule} rule); {len(rejects)} rejected"
                  + (f" (see {rej})" if rejects else ""))
    return counts


def _choose(rule: str, texts: list[str], scores: dict[str, float], reference: str | None,
            match: str) -> tuple[str | None, str | None, str | None]:
    """(chosen, rejected, None), or (None, None, why there is no pair)."""
    if rule == "teacher":
        if len(texts) < 2:
            return None, None, f"all answers are the same ({texts[0][:40]!r}): no pair to rank"
        ranked = sorted(texts, key=lambda t: scores[t])
        return ranked[-1], ranked[0], None
    if not reference:
        return None, None, "the generation replaced no data-set answer: the reference rule needs one"
    wrong = [t for t in texts if not matches(t, reference, match)]
    if not wrong:
        return None, None, f"every answer matches the reference under --match {match}"
    return reference, max(wrong, key=lambda t: scores[t]), None
