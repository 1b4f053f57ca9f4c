"""The logit terms' shared part: their options and the two ways a row set meets the LM head (the
model's full logits, or the fused chunked / Triton kernels on the final hidden states)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkd.errors import RecipeError
from vlmkd.kernels import linear_sparse_kd
from vlmkd.losses import LOSSES, SAMPLED_LOSSES, linear_temperature, logit_kd, sampled_kd
from vlmkd.train.terms.base import Setup, Step, Term


@dataclass
class LogitOptions:
    logit_loss: str = "fkl"  # fkl | rkl | jsd | skl | srkl | tvd
    temperature: float | dict = 1.0  # or {start, end}: linear over the stage
    beta: float = 0.5  # jsd's mixing weight
    alpha: float = 0.1  # the skew KLs' mixing weight

    def __post_init__(self):
        if self.logit_loss not in LOSSES:
            raise RecipeError(f"loss_args.logit_loss {self.logit_loss!r}: choose one of {LOSSES}")
        if isinstance(self.temperature, dict) and set(self.temperature) - {"start", "end"}:
            raise RecipeError(f"loss_args.temperature: a schedule has start and end, not {sorted(self.temperature)}")


class TeacherLogitTerm(Term):
    """Sparse-teacher logit distillation at one set of rows (`rows`: a batch mask key)."""

    options = LogitOptions
    rows = ""
    # (extraction setting, its flag, what it stores): a row set only caches built with it hold
    needs: tuple[str, str, str] | None = None

    def __init__(self, opts: LogitOptions, setup: Setup):
        super().__init__(opts, setup)
        self.payloads = (setup.cache.logits_payload,)
        self.stage_steps = setup.stage.steps
        self.sampled = setup.cache.sampled
        if self.sampled:
            where = setup.where
            if opts.logit_loss not in SAMPLED_LOSSES:
                raise RecipeError(f"{where}: logit_loss {opts.logit_loss!r} is biased on a sampled cache (it needs "
                                  f"p inside a log); sampled caches support {SAMPLED_LOSSES}, or build a --logits "
                                  "topk cache")
            if opts.temperature != 1.0:
                raise RecipeError(f"{where}: a distillation temperature needs the teacher's whole distribution to "
                                  "renormalise; a sampled cache supports temperature 1 only")
            self.full_logits = True  # the fused kernels take top-k targets
        if self.needs and not setup.cache.extraction.get(self.needs[0]):
            raise RecipeError(f"{setup.where}: loss '{self.name}' needs a cache built with {self.needs[1]} "
                              f"({self.needs[2]})")

    def temperature(self, step: int) -> float:
        t = self.opts.temperature
        if isinstance(t, dict):
            return linear_temperature(step, self.stage_steps, t.get("start", 5.0), t.get("end", 1.0))
        return float(t)

    def loss(self, s: Step) -> torch.Tensor:
        b = s.batch
        o = self.opts
        kd = dict(loss=o.logit_loss, temperature=self.temperature(s.step), beta=o.beta, alpha=o.alpha)
        if s.logits is not None and self.sampled:
            return sampled_kd(s.logits, b["t_ids"], b["t_w"], b[self.rows], b["t_lp"])
        if s.logits is not None:
            return logit_kd(s.logits, b["t_ids"], b["t_lp"], b[self.rows], teacher_tail=b["t_tail"], **kd)
        m = b[self.rows]
        return rows_kd(s.states, s.model.lm_head.weight, m, b["t_ids"][m], b["t_lp"][m], b["t_tail"][m], s.impl, **kd)


def rows_kd(states, head, mask, ids, lps, tail, impl, **kd_args) -> torch.Tensor:
    """Sparse-target KD of the LM head's distribution at the masked rows of `states` [B, T, D]; 0 (with a
    gradient path) where no row is masked, as `logit_kd` gives."""
    if not mask.any():
        return states.sum() * 0.0
    dev = states.device
    return linear_sparse_kd(states[mask], head, ids.to(dev), lps.to(dev, head.dtype), tail.to(dev, head.dtype),
                            impl=impl, **kd_args)
