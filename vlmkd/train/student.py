"""`vlmkd train-student`: a student from a recipe, trained from a teacher cache (shards only)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from vlmkd.cache.manifest import tokenizer_fingerprint
from vlmkd.cache.reader import CacheReader
from vlmkd.data.rejects import RejectLog
from vlmkd.errors import RecipeError
from vlmkd.models.build import build_model, data_tokenizer, load_model
from vlmkd.progress import bar
from vlmkd.train.dist import init_from_env
from vlmkd.train.kd_data import CacheSource, needed_payloads
from vlmkd.train.loop import TrainResult, train
from vlmkd.train.objectives import KDObjective
from vlmkd.train.prepare import load_items
from vlmkd.train.recipe import load_recipe
from vlmkd.train.teachers import TeacherMix


def _student(recipe, manifest: dict):
    """A student built from the recipe's `model:` (with the teacher's tokenizer, which the cache
    stores ids of) or loaded from `model: {path: DIR}`."""
    spec = recipe.model
    if "path" in spec:
        return load_model(spec["path"])
    teacher = manifest.get("teacher_path")
    tok_dir = spec.get("tokenizer") or teacher
    if not tok_dir:
        raise RecipeError("the recipe's model needs `tokenizer: DIR` (the cache does not record the teacher's path)")
    hf_tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if spec.get("vision_from") == "teacher":
        spec = {**spec, "vision_from": teacher}
    return build_model(spec, hf_tok), hf_tok


def train_student_run(recipe_path: Path, cache: Path | list[Path], out: Path, val: Path | None = None,
                      max_steps: int | None = None, seed: int | None = None, verify: bool = True,
                      shuffle_buffer: int = 256, stop_after: int | None = None,
                      teacher_weights: list[float] | None = None, teacher_mix: str = "average",
                      allow_partial: bool = False) -> TrainResult:
    """`cache`: one teacher cache, or several (different teachers over the same data: the first one
    streams, the others' top-k targets join by sample id; `vlmkd.train.teachers`)."""
    init_from_env()  # under torchrun: join the process group
    caches = [Path(c) for c in cache] if isinstance(cache, list | tuple) else [Path(cache)]
    cache, others = caches[0], caches[1:]
    recipe = load_recipe(recipe_path)
    if seed is not None:
        recipe.seed = seed
        recipe.model = {**recipe.model, "init_seed": seed}
    manifest = CacheReader(cache, payloads=()).manifest
    model, hf_tok = _student(recipe, manifest)
    tok, layout = data_tokenizer(model, hf_tok)
    # one global stream on every rank (rank=0, world=1): CacheSource deals each global batch out by rank
    mode = manifest["extraction"].get("logits", "topk")
    reader = CacheReader(cache, payloads=needed_payloads(recipe.stages, mode), verify=verify,
                         shuffle_buffer=shuffle_buffer, seed=recipe.seed, rank=0, world=1)
    reader.check_tokenizer(tokenizer_fingerprint(hf_tok), "student")
    objective = KDObjective(model, reader, recipe.stages)
    val_path = val or Path(reader.manifest["data"]["manifest"]).with_name("val.json")
    out = Path(out)
    rejects = RejectLog(out / "rejects.jsonl")
    mix = None
    if others:
        mix = TeacherMix(reader, [CacheReader(c, payloads=("tokens", "topk"), verify=verify) for c in others],
                         teacher_weights, teacher_mix, allow_partial, rejects)
    val_items = load_items(val_path, tok, layout, rejects)
    with bar() as p:
        return train(recipe, model, hf_tok, tok, layout, CacheSource(reader, layout, tok.pad_id, mix), val_items, out,
                     objective=objective, max_steps=max_steps, progress=p, stop_after=stop_after)
