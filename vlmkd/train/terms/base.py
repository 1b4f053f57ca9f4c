"""What every loss term shares: typed options, the cache facts a term checks, and the step context.

A term is one module of `vlmkd.train.terms`: a `Term` subclass with a name, an options dataclass
(keys of a stage's `loss_args` it reads; unknown keys are refused by `check_loss_args`), what it
needs from the cache (payloads) and from the student's pass (attention layers, hidden points, full
logits), the learned maps it owns, and `loss(step)`. The objective (`vlmkd.train.objectives`) plans
each stage once from its terms and runs one student pass per step.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import torch

from vlmkd.errors import RecipeError


@dataclass
class NoOptions:
    pass


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__


def option_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def parse_options(cls, raw: dict, where: str):
    """An options dataclass from the keys of `raw` it declares, each type-checked (the others are
    checked by `check_loss_args`)."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        v = raw[f.name]
        if not _type_ok(v, hints[f.name]):
            raise RecipeError(f"{where}: loss_args.{f.name} = {v!r} is not {_type_name(hints[f.name])}")
        kw[f.name] = v
    try:
        return cls(**kw)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None


@dataclass
class CacheFacts:
    """What a term may check about the cache (its manifest), and the rebuild hint it names."""

    extraction: dict
    teacher: dict
    gram: Any = None  # callable -> np.ndarray: the teacher's LM-head Gram matrix (cache-level array)
    cross_tokenizer: bool = False  # the student's tokenizer is not the one the cache's ids are of

    @property
    def points(self) -> list[str]:
        return list(self.extraction.get("hidden_points") or [])

    @property
    def attn_layers(self) -> list[int]:
        return list(self.extraction.get("attn_layers") or [])

    @property
    def sampled(self) -> bool:
        return self.extraction.get("logits", "topk") == "sampled"

    @property
    def logits_payload(self) -> str:
        return "sampled" if self.sampled else "topk"

    @property
    def hidden_dim(self) -> int:
        return self.extraction.get("hidden_dim") or self.teacher["hidden_size"]

    def need_full_width(self, where: str) -> None:
        if self.extraction.get("hidden_dim"):
            raise RecipeError(f"{where} needs full-width teacher hidden states (a cache without hidden_dim)")

    def attn_indices(self, layers, key: str, where: str) -> list[int]:
        """Where the teacher layers `layers` (a recipe's `key`) sit among the cached attention maps; a layer
        the cache lacks is refused naming the rebuild."""
        cached = self.attn_layers
        gone = sorted(set(layers) - set(cached))
        if gone:
            raise RecipeError(f"{where}: {key} {gone} are not in the cache (it has {cached}): "
                              f"rebuild it with --attn-layers {','.join(map(str, sorted({*cached, *gone})))}")
        return [cached.index(li) for li in layers]

    def need_point(self, point: str, where: str) -> None:
        if point not in self.points:
            raise RecipeError(f"{where} needs the teacher's hidden states at {point!r}; the cache has {self.points}: "
                              f"rebuild it with --hidden-points {','.join(dict.fromkeys([*self.points, point]))}")


@dataclass
class Setup:
    """What a term is built from: its stage, the cache's facts, the student's shape, and the objective's
    shared learned maps (one module per key, kept across stages; creation order fixes their init)."""

    stage: Any  # vlmkd.train.recipe.Stage
    cache: CacheFacts
    student_dim: int
    student_layers: int
    maps: torch.nn.ModuleDict

    @property
    def where(self) -> str:
        return f"stage {self.stage.name}"

    def linear(self, key: str, identity_when_equal: bool = False) -> str:
        """The learned student-width -> teacher-width map named `key` (made on first use); a term keeps
        the key and finds the map in `Step.maps` (the objective owns it, so it is saved once)."""
        if key not in self.maps:
            s, t = self.student_dim, self.cache.hidden_dim
            self.maps[key] = (torch.nn.Identity() if identity_when_equal and s == t
                              else torch.nn.Linear(s, t, bias=False))
        return key


@dataclass
class Step:
    """One step's student pass, as every term of the stage reads it."""

    model: Any
    batch: dict
    step: int
    probe: Any  # vlmkd.models.probe.Probe: attention and hidden states the terms asked for
    logits: torch.Tensor | None = None  # [B, T, V] when the plan runs the full LM head
    states: torch.Tensor | None = None  # [B, T, D] final hidden states when the fused kernels apply the head
    impl: str = "full"
    router_logits: list = field(default_factory=list)
    maps: torch.nn.ModuleDict | None = None  # the objective's learned maps, by key (`Setup.linear`)

    @property
    def vis_rows(self) -> torch.Tensor:
        """Indices of the batch rows that have visual tokens (the rows the cache's visual payloads,
        t_attn and t_hidden, are stacked over); text-only rows are not among them."""
        return self.batch["image_mask"].any(1).nonzero()[:, 0]

    def zero(self) -> torch.Tensor:
        """0 with a gradient path through the pass: a visual term's loss on a batch without images."""
        out = self.logits if self.logits is not None else self.states
        return out.sum() * 0.0


class Term(torch.nn.Module):
    """One loss term of a recipe. Subclasses set `name`, `options` and override `loss`; the
    constructor checks the cache and fills what the term needs."""

    name: ClassVar[str] = ""
    options: ClassVar[type] = NoOptions
    visual: ClassVar[bool] = False  # reads visual tokens: text-only rows are skipped, 0 on a batch of them only
    # defined when the student's tokenizer differs from the teacher's (reads no teacher token id or position)
    cross_ok: ClassVar[bool] = False

    def __init__(self, opts, setup: Setup):
        super().__init__()
        self.opts = opts
        self.payloads: tuple[str, ...] = ()
        self.attn_layers: tuple[int, ...] = ()
        self.hidden_points: tuple[str, ...] = ()
        self.full_logits = False  # needs the model's whole logits (no fused LM-head path)

    def loss(self, s: Step) -> torch.Tensor:
        raise NotImplementedError


def defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}
