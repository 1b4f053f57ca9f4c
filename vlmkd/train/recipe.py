"""Pipeline recipes: one YAML file says what a run is (model, stages, losses, schedule).

A recipe adds no code path of its own, only a choice of components; unknown keys are refused so a
typo never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from vlmkd.errors import RecipeError

PARTS = ("vision", "projector", "llm")


@dataclass
class Stage:
    name: str
    steps: int
    lr: float = 1e-3
    warmup: int = 50
    min_lr_ratio: float = 0.05
    batch_size: int = 32
    grad_accum: int = 1
    clip: float = 1.0
    weight_decay: float = 0.01
    trainable: list[str] = field(default_factory=lambda: list(PARTS))
    data: str = "all"  # which samples: all, or those whose manifest field `data_field` has this value
    data_field: str = "kind"  # (the shapes set writes kind: questions | captions; vlmkd.data.select)
    prompt_regex: str | None = None  # and, if set, only samples whose first prompt matches it
    # this stage's own teacher cache (e.g. one built from LLaVA's pre-training file while the run's
    # --cache holds the instruction data); a path relative to the recipe's folder, or absolute
    cache: str | None = None
    losses: dict[str, float] = field(default_factory=lambda: {"ce": 1.0})
    loss_args: dict = field(default_factory=dict)
    # LLaVA-MoD: turn the dense LLM into a mixture of experts when this stage starts:
    # {experts: 4, top_k: 2, aux_coef: 0.01, seed: 0} (vlmkd.models.moe.upcycle)
    upcycle: dict | None = None
    # quantisation-aware training from this stage on: {bits: 4 or 8, group_size: 32 or null (per
    # channel)}: the LLM's linear layers compute with fake-quantised weights; the final student is
    # also exported with real integer weights (vlmkd.models.quant)
    qat: dict | None = None


@dataclass
class Recipe:
    name: str
    model: dict
    stages: list[Stage]
    seed: int = 0
    dtype: str = "float32"  # or bfloat16 (autocast)
    eval_every: int = 250
    eval_samples: int = 256
    save_every: int = 250
    log_every: int = 10
    parallel: str = "ddp"  # under torchrun: ddp (full replicas) or fsdp (FSDP2: parameters, gradients and
    # optimizer state sharded across ranks, for students that do not fit one device)
    data: dict = field(default_factory=dict)
    # on-policy rounds (`vlmkd on-policy`, vlmkd.generate.rounds.OnPolicy): {rounds, fraction, temperature, ...}
    on_policy: dict | None = None
    source: str = ""


def _build(cls, raw: dict, where: str):
    names = {f.name for f in fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    return cls(**raw)


def parse_recipe(raw: dict, source: str = "<dict>") -> Recipe:
    if not isinstance(raw, dict) or "stages" not in raw or "model" not in raw:
        raise RecipeError(f"{source}: a recipe needs 'model' and 'stages'")
    stages = []
    for i, st in enumerate(raw["stages"]):
        stage = _build(Stage, st, f"{source} stage {i}")
        bad = set(stage.trainable) - set(PARTS)
        if bad:
            raise RecipeError(f"{source} stage {stage.name}: unknown trainable part(s) {sorted(bad)}; use {PARTS}")
        if stage.upcycle is not None:
            bad = set(stage.upcycle) - {"experts", "top_k", "aux_coef", "seed"}
            if bad:
                raise RecipeError(f"{source} stage {stage.name}: unknown upcycle key(s) {sorted(bad)}; "
                                  "use experts, top_k, aux_coef, seed")
        if stage.qat is not None:
            from vlmkd.models.quant import QuantSpec

            QuantSpec.parse(stage.qat)
        from vlmkd.train.terms import (
            check_loss_args,  # (terms import the losses; recipes stay light otherwise)
        )

        check_loss_args(stage, f"{source} stage {stage.name}")
        if not isinstance(stage.data, str) or not stage.data or not isinstance(stage.data_field, str):
            raise RecipeError(f"{source} stage {stage.name}: data is `all` or a value of the samples' "
                              f"{stage.data_field!r} field (a string), not {stage.data!r}")
        if stage.cache is not None:
            if not isinstance(stage.cache, str) or not stage.cache:
                raise RecipeError(f"{source} stage {stage.name}: cache is a path (a teacher cache folder)")
            if "://" not in stage.cache and not Path(stage.cache).is_absolute() and Path(source).is_file():
                stage.cache = str((Path(source).parent / stage.cache).resolve())
        stages.append(stage)
    rest = {k: v for k, v in raw.items() if k != "stages"}
    model = rest["model"]
    if isinstance(model, str) or (isinstance(model, dict) and "file" in model):
        # a shared model file, relative to the recipe; `{file: F, key: value, ...}` overrides its keys
        name, over = (model, {}) if isinstance(model, str) else (model["file"], {k: v for k, v in model.items()
                                                                                   if k != "file"})
        mpath = Path(source).parent / name
        if not mpath.is_file():
            raise RecipeError(f"{source}: model file {mpath} does not exist")
        rest["model"] = {**yaml.safe_load(mpath.read_text()), **over}
    rest.setdefault("name", Path(source).stem)
    if rest.get("parallel", "ddp") not in ("ddp", "fsdp"):
        raise RecipeError(f"{source}: parallel must be ddp or fsdp, not {rest['parallel']!r}")
    if rest.get("on_policy") is not None:
        from vlmkd.generate.rounds import OnPolicy

        OnPolicy.parse(rest["on_policy"], source)
    return _build(Recipe, {**rest, "stages": stages, "source": source}, source)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist (see pipelines/ for the shipped ones)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from e
    return parse_recipe(raw, str(path))
