"""ce: cross-entropy on the response tokens (LLaVA-KD L_reg / L_PT); no teacher payload."""

from __future__ import annotations

import torch

from vlmkd.losses.sft import response_ce
from vlmkd.train.terms.base import Step, Term
from vlmkd.train.terms.logits import rows_kd


class CE(Term):
    name = "ce"
    cross_ok = True

    def loss(self, s: Step) -> torch.Tensor:
        b = s.batch
        if s.logits is not None:
            return response_ce(s.logits, b["input_ids"], b["labels_mask"])
        # fused path: cross-entropy = forward KL to a one-hot teacher (k = 1, log-prob 0, no tail)
        mask = b["labels_mask"][:, 1:]
        targets = b["input_ids"][:, 1:][mask][:, None]
        return rows_kd(s.states[:, :-1], s.model.lm_head.weight, mask, targets, torch.zeros(targets.shape),
                       torch.full(targets.shape[:1], float("-inf")), s.impl, loss="fkl")
