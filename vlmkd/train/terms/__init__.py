"""The loss terms a recipe stage can name, one module each (see `base` for what a term declares).

Adding a term: a module here with a `Term` subclass (its name, options dataclass, payloads, probes,
checks and `loss`), one entry in `TERMS`, and its test. `ORDER` is the order a step computes and sums
the terms in (fixed, so that a run is bit-reproducible).
"""

from __future__ import annotations

import difflib

from vlmkd.errors import RecipeError
from vlmkd.train.terms.align import Align
from vlmkd.train.terms.attn import Attn
from vlmkd.train.terms.balance import Balance
from vlmkd.train.terms.base import CacheFacts, Setup, Step, Term, option_names, parse_options
from vlmkd.train.terms.ce import CE
from vlmkd.train.terms.contrast import Contrast
from vlmkd.train.terms.feat import Feat
from vlmkd.train.terms.pref import Pref
from vlmkd.train.terms.rel import Rel
from vlmkd.train.terms.res import Res
from vlmkd.train.terms.txt import Txt
from vlmkd.train.terms.uld import Uld
from vlmkd.train.terms.vis import Vis

ORDER = (Balance, CE, Res, Txt, Vis, Uld, Pref, Rel, Attn, Align, Feat, Contrast)
TERMS: dict[str, type[Term]] = {t.name: t for t in ORDER}
# options of the objective itself, not of one term: how ce / res / vis meet the LM head
STAGE_OPTIONS = {"logit_impl": ("auto", "full", "torch", "triton")}

__all__ = ["ORDER", "STAGE_OPTIONS", "TERMS", "CacheFacts", "Setup", "Step", "Term", "check_loss_args",
           "stage_options"]


def active_terms(stage) -> list[str]:
    return [k for k, w in stage.losses.items() if w]


def check_loss_args(stage, where: str) -> None:
    """Refuse an unknown term, an option no term knows, and an option only terms this stage does not
    use read (a typo or a leftover never falls back to a default silently); type-check the rest."""
    on = active_terms(stage)
    unknown = [t for t in stage.losses if t not in TERMS]
    if unknown:
        raise RecipeError(f"{where}: unknown loss term(s) {unknown}; known: {list(TERMS)}")
    readers: dict[str, list[str]] = {}
    for name, cls in TERMS.items():
        for key in option_names(cls.options):
            readers.setdefault(key, []).append(name)
    for key, val in stage.loss_args.items():
        if key in STAGE_OPTIONS:
            if val not in STAGE_OPTIONS[key]:
                raise RecipeError(f"{where}: loss_args.{key} {val!r}: choose one of {STAGE_OPTIONS[key]}")
            continue
        if key not in readers:
            known = sorted({*readers, *STAGE_OPTIONS})
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise RecipeError(f"{where}: unknown loss_args key {key!r}{hint}; known: {known}")
        if not set(readers[key]) & set(on):
            raise RecipeError(f"{where}: loss_args.{key} is read by the term(s) {readers[key]}, which this stage "
                              f"does not use (its terms: {on})")
    for name in on:
        parse_options(TERMS[name].options, stage.loss_args, where)


def stage_options(stage, name: str):
    return parse_options(TERMS[name].options, stage.loss_args, f"stage {stage.name}")
