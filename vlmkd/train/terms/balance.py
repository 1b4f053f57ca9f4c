"""balance: the MoE routers' load-balancing loss (LLaVA-MoD's sparse student); 0 while the LLM is
still dense (a stage before the upcycle)."""

from __future__ import annotations

import torch

from vlmkd.models.moe import is_moe, load_balance_loss
from vlmkd.train.terms.base import Step, Term


class Balance(Term):
    name = "balance"
    cross_ok = True

    def loss(self, s: Step) -> torch.Tensor:
        if not is_moe(s.model):
            return next(s.model.parameters()).sum() * 0.0
        top_k = s.model.config.text_config.num_experts_per_tok
        return load_balance_loss(s.router_logits, top_k, s.batch["attention_mask"].bool())
