"""rel: relation KD on the visual tokens (LLaVA-KD RDist): R = H G H^T with each side's LM-head Gram
matrix, from the cache's final visual hidden states and its Gram array."""

from __future__ import annotations

import torch

from vlmkd.losses import relation_kd
from vlmkd.models.probe import visual_rows
from vlmkd.train.terms.base import Setup, Step, Term


class Rel(Term):
    name = "rel"
    cross_ok = True
    visual = True

    def __init__(self, opts, setup: Setup):
        super().__init__(opts, setup)
        setup.cache.need_full_width(f"{setup.where}: loss 'rel'")
        setup.cache.need_point("final", f"{setup.where}: loss 'rel'")
        self.payloads = ("hidden",)
        self.hidden_points = ("final",)
        self.point_index = setup.cache.points.index("final")
        # a buffer, so that it follows the objective to the training device (not saved: the cache has it)
        self.register_buffer("gram_t", torch.from_numpy(setup.cache.gram()), persistent=False)

    def loss(self, s: Step) -> torch.Tensor:
        h_s, mask = visual_rows(s.probe, "final", s.batch["image_mask"])  # mask: rows of mixed counts
        h_t = s.batch["t_hidden"][:, self.point_index]
        w_s = s.model.lm_head.weight
        return relation_kd(h_s, h_t, mask, student_gram=w_s.T @ w_s, teacher_gram=self.gram_t)
