"""Contrastive alignment (InfoNCE, van den Oord et al., 2018; CLIP's symmetric form): across the batch,
each student representation must pick out its own sample's teacher representation among the others'.

Where feature alignment matches each vector to its teacher's value, InfoNCE only asks that the student
keep the teacher's geometry between samples: what tells this image (or prompt) from the rest. The
student side goes through a learned projection when the widths differ (`vlmkd.train.objectives`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.07,
             symmetric: bool = True) -> torch.Tensor:
    """student, teacher [B, D] (one pooled vector per sample, same D). Cosine similarities / tau as
    logits; the matching pair is the target. symmetric: the mean of the student->teacher and the
    teacher->student cross-entropies; else student->teacher only. B = 1 gives 0 (nothing to contrast)."""
    if temperature <= 0:
        raise ValueError(f"InfoNCE temperature must be > 0, not {temperature}")
    s = F.normalize(student, dim=-1, eps=1e-8)
    t = F.normalize(teacher.to(student.dtype), dim=-1, eps=1e-8)
    logits = s @ t.T / temperature
    target = torch.arange(len(s), device=s.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, D]: the mean of hidden [B, N, D] over each row's masked positions mask [B, N]."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
