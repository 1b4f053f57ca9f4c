"""`vlmkd train-student`: a student from a recipe, trained from a teacher cache (shards only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from vlmkd.cache.join import TeacherMix
from vlmkd.cache.manifest import tokenizer_fingerprint
from vlmkd.cache.reader import CacheReader
from vlmkd.cache.store import Store
from vlmkd.data.items import load_items
from vlmkd.data.layout import Layout
from vlmkd.data.rejects import RejectLog
from vlmkd.data.template import Tokenizer
from vlmkd.errors import RecipeError
from vlmkd.models.build import (
    attach_processor,
    build_model,
    data_tokenizer,
    load_model,
    processor_path,
    saved_processor,
)
from vlmkd.models.lora import LoraSpec, add_lora
from vlmkd.progress import bar
from vlmkd.train.cross import Retokenizer, vocab_map
from vlmkd.train.dist import init_from_env
from vlmkd.train.kd_data import CacheSource
from vlmkd.train.loop import TrainResult, train
from vlmkd.train.objectives import KDObjective, cache_facts
from vlmkd.train.recipe import Recipe, load_recipe


def teacher_files(cache: Path, manifest: dict) -> Path:
    """The folder the student's tokenizer (and the teacher's vision tower) come from: the cache's own
    copy (CACHE/teacher/); for a cache written before caches carried it, the teacher folder it names."""
    held = manifest.get("teacher_files")
    if held:
        return Store(cache).local_dir(held["dir"])
    teacher = Path(manifest.get("teacher_path") or "")
    if not (teacher / "config.json").is_file():
        raise RecipeError(f"{cache} does not hold the teacher's tokenizer (a cache from before caches carried it) and "
                          f"its teacher folder {str(teacher)!r} is not here: rebuild the cache, or set the recipe's "
                          "model `tokenizer: DIR` (and `vision_from: DIR`)")
    return teacher


def validation_manifest(cache: Path, manifest: dict) -> Path:
    """The validation data when none is named: the cache's own copy (`cache-teacher --val`); for a cache
    without one, val.json beside the data manifest it was built from, if that is still there."""
    held = manifest.get("validation")
    if held:
        return Store(cache).local_dir(str(Path(held["manifest"]).parent)) / Path(held["manifest"]).name
    beside = Path(manifest["data"]["manifest"]).with_name("val.json")
    if beside.is_absolute() and beside.is_file():
        return beside
    raise RecipeError(f"{cache} holds no validation data and none was named: pass --val MANIFEST (or rebuild the cache "
                      "with cache-teacher --val MANIFEST)")


def _student(recipe, cache: Path, manifest: dict):
    """A student built from the recipe's `model:` (with the teacher's tokenizer, which the cache
    stores ids of) or loaded from `model: {path: DIR}`; with `lora:`, PEFT adapters in its LLM."""
    spec = dict(recipe.model)
    lora = spec.pop("lora", None)
    if "path" in spec:
        model, hf_tok = load_model(spec["path"])
    else:
        teacher = None
        if not spec.get("tokenizer") or spec.get("vision_from") == "teacher":
            teacher = teacher_files(cache, manifest)
        tok_dir = spec.get("tokenizer") or teacher
        hf_tok = AutoTokenizer.from_pretrained(str(tok_dir))
        if spec.get("vision_from") == "teacher":
            spec = {**spec, "vision_from": teacher}
        model = build_model(spec, hf_tok)
        if processor_path(model.config, hf_tok):  # the teacher's processor: the same visual tokens
            same_family = ((Path(tok_dir) / "config.json").is_file()
                           and AutoConfig.from_pretrained(str(tok_dir)).model_type == model.config.model_type)
            proc = saved_processor(tok_dir) if same_family else None
            if proc is not None:
                attach_processor(model, proc)
    if lora is not None:
        if any(st.qat for st in recipe.stages) or any(st.upcycle for st in recipe.stages):
            raise RecipeError("model.lora trains adapters on a dense float LLM: not with qat or upcycle stages")
        add_lora(model, LoraSpec.parse(lora))
    return model, hf_tok


def check_cross(head: CacheReader, others: list, own: dict) -> None:
    """What a student with another tokenizer than the cache's needs: one cache, with its text."""
    if others or own:
        raise RecipeError("a student with another tokenizer than the teacher's trains from one cache (no several "
                          "teachers, no stage caches yet): give the student the teacher's tokenizer, or use one cache")
    if not head.manifest["extraction"].get("keep_text"):
        raise RecipeError(f"the student's tokenizer is not the teacher's ({head.manifest['tokenizer_sha256'][:16]}...), "
                          f"so it re-tokenises each sample's text, and cache {head.root} holds none: rebuild it with "
                          "`vlmkd cache-teacher ... --keep-text` (recipe cache section: keep_text: true), or give the "
                          "student the teacher's tokenizer")


@dataclass
class StudentRun:
    """Everything a student's training needs, built once the same way for vlmkd's own loop and for
    the transformers Trainer (`vlmkd.hf_trainer`): same model init, same learned maps, same batches."""

    recipe: Recipe
    model: torch.nn.Module
    hf_tok: object
    tok: Tokenizer
    layout: Layout
    objective: KDObjective
    source: CacheSource
    val_path: Path


def prepare_student(recipe_path: Path, cache: Path | list[Path], val: Path | None = None, seed: int | None = None,
                    verify: bool = True, shuffle_buffer: int = 256, teacher_weights: list[float] | None = None,
                    teacher_mix: str = "average", allow_partial: bool = False, data_workers: int | str = "auto",
                    rejects: RejectLog | None = None) -> StudentRun:
    """The student, its objective and its batch source from a recipe and a cache (or several)."""
    # folders or URLs, as given (a Path would fold a URL's '//'); every reader takes both
    caches = list(cache) if isinstance(cache, list | tuple) else [cache]
    cache, others = caches[0], caches[1:]
    recipe = load_recipe(recipe_path)
    if recipe.on_policy is not None:
        raise RecipeError(f"{recipe_path} has an on_policy section: its rounds (the student answers, the teacher "
                          "scores, the student trains) run with `vlmkd on-policy --recipe ... --teacher ... --cache ...`")
    if seed is not None:
        recipe.seed = seed
        recipe.model = {**recipe.model, "init_seed": seed}
    head = CacheReader(cache, payloads=(), verify=verify)
    model, hf_tok = _student(recipe, cache, head.manifest)
    tok, layout = data_tokenizer(model, hf_tok)
    own = {st.name: st.cache for st in recipe.stages if st.cache}
    student_sha = tokenizer_fingerprint(hf_tok)
    cross = head.manifest["tokenizer_sha256"] != student_sha
    if cross:
        check_cross(head, others, own)
    heads = {}
    for name, path in own.items():  # a stage's own cache: the student's tokenizer must be its teacher's
        heads[name] = CacheReader(path, payloads=(), verify=verify)
        heads[name].check_tokenizer(student_sha, f"student (stage {name}'s cache {path})")
    # the terms check the caches and say which payloads the run decodes
    objective = KDObjective(model, cache_facts(head, cross), recipe.stages, {n: cache_facts(h) for n, h in heads.items()})
    retokenize = None
    payloads = objective.payloads
    if cross or "text" in payloads:  # the student reads the answers' text and aligns its own tokens
        teacher_tok = AutoTokenizer.from_pretrained(str(teacher_files(cache, head.manifest)))
        retokenize = Retokenizer(tok, vocab_map(teacher_tok, hf_tok))
        payloads = tuple(dict.fromkeys([*payloads, "text"]))
    # one global stream on every rank (rank=0, world=1): CacheSource deals each global batch out by rank
    reader = CacheReader(cache, payloads=payloads, verify=verify, shuffle_buffer=shuffle_buffer,
                         seed=recipe.seed, rank=0, world=1)
    stage_readers = {name: CacheReader(path, payloads=objective.payloads_of([name]), verify=verify,
                                       shuffle_buffer=shuffle_buffer, seed=recipe.seed, rank=0, world=1)
                     for name, path in own.items()}
    mix = None
    if others:
        mix = TeacherMix(reader, [CacheReader(c, payloads=("tokens", "topk"), verify=verify) for c in others],
                         teacher_weights, teacher_mix, allow_partial, rejects or RejectLog(None))
    source = CacheSource(reader, layout, tok.pad_id, mix, data_workers, stage_readers=stage_readers,
                         retokenize=retokenize)
    return StudentRun(recipe, model, hf_tok, tok, layout, objective, source,
                      val or validation_manifest(cache, reader.manifest))


def train_student_run(recipe_path: Path, cache: Path | list[Path], out: Path, val: Path | None = None,
                      max_steps: int | None = None, seed: int | None = None, verify: bool = True,
                      shuffle_buffer: int = 256, stop_after: int | None = None,
                      teacher_weights: list[float] | None = None, teacher_mix: str = "average",
                      allow_partial: bool = False, data_workers: int | str = "auto") -> TrainResult:
    """`cache`: one teacher cache, or several (different teachers over the same data: the first one
    streams, the others' top-k targets join by sample id; `vlmkd.cache.join`). `data_workers`: 1 decodes
    the cache in a DataLoader worker process ahead of the step, 0 on the trainer's thread (same batches),
    auto: 1 on a GPU, 0 on the CPU."""
    init_from_env()  # under torchrun: join the process group
    out = Path(out)
    rejects = RejectLog(out / "rejects.jsonl")
    run = prepare_student(recipe_path, cache, val, seed, verify, shuffle_buffer, teacher_weights, teacher_mix,
                          allow_partial, data_workers, rejects)
    val_items = load_items(run.val_path, run.tok, run.layout, rejects)
    with bar() as p:
        return train(run.recipe, run.model, run.hf_tok, run.tok, run.layout, run.source, val_items, out,
                     objective=run.objective, max_steps=max_steps, progress=p, stop_after=stop_after)
