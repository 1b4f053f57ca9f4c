"""pref: LLaVA-MoD preference distillation, DPO with the teacher as the reference: the student scores
the chosen and the rejected answer of each cached pair (a second forward on the rejected one)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkd.data.dataset import IMAGE_INPUTS
from vlmkd.errors import CacheError
from vlmkd.losses import preference_kd
from vlmkd.train.terms.base import Setup, Step, Term


@dataclass
class PrefOptions:
    pref_beta: float = 0.1


class Pref(Term):
    name = "pref"
    options = PrefOptions

    def __init__(self, opts: PrefOptions, setup: Setup):
        super().__init__(opts, setup)
        self.payloads = ("pref",)
        self.full_logits = True  # whole answers scored from the model's logits

    def loss(self, s: Step) -> torch.Tensor:
        b = s.batch
        if "r_input_ids" not in b:
            raise CacheError("the pref term's batch has no preference pairs: its samples have no `rejected` answer in the "
                             "cache (build it from data with `rejected` answers, and select them with the stage's `data`)")
        chosen = sequence_logprob(s.logits, b["input_ids"], b["labels_mask"])
        images = {k: b[k] for k in IMAGE_INPUTS if k in b}
        r_logits = s.model(input_ids=b["r_input_ids"], attention_mask=b["r_attention_mask"], **images).logits
        rejected = sequence_logprob(r_logits, b["r_input_ids"], b["r_labels_mask"])
        return preference_kd(chosen, rejected, b["t_pref_chosen"], b["t_pref_rejected"], beta=self.opts.pref_beta)


def sequence_logprob(logits: torch.Tensor, input_ids: torch.Tensor, labels_mask: torch.Tensor) -> torch.Tensor:
    """[B]: the summed log-prob of each row's response tokens (position t predicted at t - 1)."""
    z = logits[:, :-1]
    lp = torch.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)), -1).gather(-1, input_ids[:, 1:, None])
    return (lp[..., 0] * labels_mask[:, 1:]).sum(-1)
