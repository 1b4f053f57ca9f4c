"""Train the demo teacher from scratch: tokenizer from the data's texts, model from the recipe."""

from __future__ import annotations

from pathlib import Path

from vlmkd.data.items import load_items
from vlmkd.data.manifest import load_samples
from vlmkd.data.rejects import RejectLog
from vlmkd.errors import DataError
from vlmkd.models.build import build_model, data_tokenizer
from vlmkd.models.tokenizer import train_tokenizer
from vlmkd.progress import bar, console
from vlmkd.train.loop import ItemSource, TrainResult, train
from vlmkd.train.recipe import load_recipe


def _manifests(data: Path, val: Path | None) -> tuple[Path, Path]:
    train_m = data / "train.json" if data.is_dir() else data
    val_m = val or (train_m.parent / "val.json")
    for m in (train_m, val_m):
        if not m.is_file():
            raise DataError(f"manifest {m} does not exist (run `vlmkd data shapes --out {data}` first?)")
    return train_m, val_m


def train_teacher_run(data: Path, out: Path, recipe_path: Path, val: Path | None = None,
                      max_steps: int | None = None, seed: int | None = None, strict: bool = False,
                      run_dir: Path | None = None) -> TrainResult:
    recipe = load_recipe(recipe_path)
    if seed is not None:
        recipe.seed = seed
    train_m, val_m = _manifests(Path(data), val)
    samples, _ = load_samples(train_m)
    texts = [t.text.replace("<image>", "") for s in samples for t in s.turns]
    hf_tok = train_tokenizer(texts, image_position=recipe.model.get("image_position", "start"))
    model = build_model(recipe.model, hf_tok)
    tok, layout = data_tokenizer(model, hf_tok)
    run_dir = run_dir or out.parent / "runs" / out.name
    rejects = RejectLog(run_dir / "rejects.jsonl")
    train_items = load_items(train_m, tok, layout, rejects, strict)
    val_items = load_items(val_m, tok, layout, rejects, strict)
    with bar() as p:
        source = ItemSource(train_items, layout, tok.pad_id, recipe.seed)
        res = train(recipe, model, hf_tok, tok, layout, source, val_items, run_dir, max_steps=max_steps,
                    progress=p, model_out=out)
    console.print(rejects.summary())
    return res
