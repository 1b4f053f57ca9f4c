"""Preference distillation (LLaVA-MoD, Shu et al., 2024): DPO with the teacher as the reference model.

L = -log sigmoid(beta [(log q(y+) - log p(y+)) - (log q(y-) - log p(y-))])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preference_kd(student_chosen: torch.Tensor, student_rejected: torch.Tensor, teacher_chosen: torch.Tensor,
                  teacher_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Summed sequence log-probs [B] of chosen (y+) and rejected (y-) responses; returns the batch mean."""
    margin = (student_chosen - teacher_chosen.to(student_chosen.dtype)) - (
        student_rejected - teacher_rejected.to(student_rejected.dtype))
    return -F.logsigmoid(beta * margin).mean()
