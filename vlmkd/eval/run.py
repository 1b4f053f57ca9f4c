"""`vlmkd eval`: a saved model on any LLaVA-format manifest."""

from __future__ import annotations

from pathlib import Path

from vlmkd.data.items import load_items
from vlmkd.data.rejects import RejectLog
from vlmkd.eval.score import greedy_answers, score
from vlmkd.models.build import data_tokenizer, load_model
from vlmkd.progress import bar, console


def evaluate_model(model_dir: Path, manifest: Path, limit: int | None = None, strict: bool = False,
                   rejects_path: Path | None = None, name: str | None = None) -> dict:
    model, hf_tok = load_model(model_dir)
    tok, layout = data_tokenizer(model, hf_tok)
    rejects = RejectLog(rejects_path)
    items = load_items(manifest, tok, layout, rejects, strict, limit=limit)
    with bar() as p:
        task = p.add_task(f"eval {name or Path(model_dir).name}", total=len(items), unit="samples")
        preds = greedy_answers(model, items, layout, tok, progress=lambda n: p.update(task, advance=n))
    res = score(items, preds)
    res["rejected"] = rejects.count
    res["model"] = str(model_dir)
    res["data"] = str(manifest)
    if rejects.count:
        console.print(rejects.summary())
    return res
