"""`vlmkd eval`: a saved model on any manifest vlmkd reads, every assistant turn scored against its
own prompt prefix; rejects written beside the scores."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from vlmkd.data.dataset import encode_samples
from vlmkd.data.manifest import Sample, describe, load_samples
from vlmkd.data.rejects import RejectLog
from vlmkd.errors import DataError
from vlmkd.eval.score import MATCHES, greedy_answers, score
from vlmkd.models.build import data_tokenizer, load_model
from vlmkd.progress import bar, console

DEFAULT_NEW_TOKENS = {"first_word": 4, "choice": 8, "exact": 64, "normalised": 64}


def exchanges(samples: list[Sample]) -> tuple[list[Sample], list[str]]:
    """One prompt per assistant turn (the conversation before it) and that turn's reference answer.
    The first exchange keeps the sample's id; later ones are `id#k`."""
    prompts, refs = [], []
    for s in samples:
        for k, (i, ref) in enumerate(s.exchanges()):
            prompts.append(replace(s, id=s.id if k == 0 else f"{s.id}#{k}", turns=s.turns[:i]))
            refs.append(ref)
    return prompts, refs


def evaluate_model(model_dir: Path, manifest: Path, limit: int | None = None, strict: bool = False,
                   rejects_path: Path | None = None, name: str | None = None, match: str = "first_word",
                   max_new_tokens: int | None = None, type_field: str | None = "question_type") -> dict:
    if match not in MATCHES:
        raise DataError(f"unknown --match {match!r}; choose one of {MATCHES}")
    model, hf_tok = load_model(model_dir)
    tok, layout = data_tokenizer(model, hf_tok)
    rejects = RejectLog(rejects_path)
    samples, bad = load_samples(manifest, strict=strict)
    for r in bad:
        rejects.add(r)
    rows = len(samples) + len(bad)
    if limit:
        samples = samples[:limit]
    prompts, refs = exchanges(samples)
    with bar() as p:
        task = p.add_task(f"reading {Path(manifest).name}", total=len(prompts), unit="prompts")
        items = encode_samples(prompts, tok, layout, rejects, strict, with_answer=False,
                               progress=lambda n: p.update(task, advance=n))
    kept = {it.sample.id for it in items}
    refs = [r for s, r in zip(prompts, refs, strict=True) if s.id in kept]
    if not items:
        raise DataError(f"{manifest}: no usable sample ({describe(samples, bad)}; {rejects.summary()})")
    with bar() as p:
        task = p.add_task(f"eval {name or Path(model_dir).name}", total=len(items), unit="prompts")
        preds = greedy_answers(model, items, layout, tok, progress=lambda n: p.update(task, advance=n),
                               max_new_tokens=max_new_tokens or DEFAULT_NEW_TOKENS[match])
    res = score(items, preds, refs, match, type_field)
    res.update(rows=rows, samples=len(samples), exchanges=len(prompts), rejected=rejects.count,
               rejected_rows=len(bad), rejected_exchanges=rejects.count - len(bad), limit=limit,
               model=str(model_dir), data=str(manifest))
    if rejects.count:
        console.print(rejects.summary())
    return res
