"""uld: cross-tokenizer logit KD on the aligned answer spans (`vlmkd.train.cross`): universal logit
distillation between sorted distributions, or with `uld_hybrid` (the default) the sparse KL where a
span is one token both vocabularies share (the GOLD hybrid). Works with any student tokenizer,
the teacher's own included; needs a top-k cache built with --keep-text."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkd.errors import RecipeError
from vlmkd.losses.cross import cross_kd
from vlmkd.train.terms.base import Setup, Step, Term


@dataclass
class UldOptions:
    uld_hybrid: bool = True  # exact-match KL on shared single-token spans, ULD on the others


class Uld(Term):
    name = "uld"
    options = UldOptions
    cross_ok = True

    def __init__(self, opts: UldOptions, setup: Setup):
        super().__init__(opts, setup)
        ext = setup.cache.extraction
        if setup.cache.sampled:
            raise RecipeError(f"{setup.where}: loss 'uld' compares sorted top-k distributions: it needs a --logits "
                              "topk cache")
        if not ext.get("keep_text"):
            raise RecipeError(f"{setup.where}: loss 'uld' aligns the student's tokens to the teacher's by text, and "
                              "this cache holds no text: rebuild it with `vlmkd cache-teacher ... --keep-text` (or "
                              "`keep_text: true` in the recipe's cache section)")
        self.payloads = ("topk", "text")
        self.full_logits = True  # ULD sorts the student's whole distribution at each span's first row

    def loss(self, s: Step) -> torch.Tensor:
        b = s.batch
        rows = s.logits.reshape(-1, s.logits.shape[-1])[b["x_rows"].to(s.logits.device)]
        dev = rows.device
        exact = b["x_exact"].to(dev) if self.opts.uld_hybrid else None
        return cross_kd(rows, b["x_lp"].to(dev), b["x_tail"].to(dev), exact, b["x_mids"].to(dev),
                        b["x_mlp"].to(dev), b["x_mtail"].to(dev))
