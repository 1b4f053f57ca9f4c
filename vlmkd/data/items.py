"""Manifest -> encoded items for a model, with rejects recorded and progress shown."""

from __future__ import annotations

from pathlib import Path

from vlmkd.data.dataset import Item, encode_samples
from vlmkd.data.layout import Layout
from vlmkd.data.manifest import describe, load_samples
from vlmkd.data.rejects import RejectLog
from vlmkd.data.template import Tokenizer
from vlmkd.errors import DataError
from vlmkd.progress import bar, console


def load_items(
    manifest: str | Path,
    tok: Tokenizer,
    layout: Layout,
    rejects: RejectLog,
    strict: bool = False,
    with_answer: bool = True,
    limit: int | None = None,
    show: bool = True,
) -> list[Item]:
    samples, bad = load_samples(manifest, strict=strict)
    for r in bad:
        rejects.add(r)
    if show:
        console.print(f"{Path(manifest).name}: {describe(samples, bad)}")
    if limit:
        samples = samples[:limit]
    if show:
        with bar() as p:
            task = p.add_task(f"reading {Path(manifest).name}", total=len(samples), unit="samples")
            items = encode_samples(samples, tok, layout, rejects, strict, with_answer,
                                   progress=lambda n: p.update(task, advance=n))
    else:
        items = encode_samples(samples, tok, layout, rejects, strict, with_answer)
    if not items:
        raise DataError(f"{manifest}: no usable sample ({rejects.summary()})")
    return items
