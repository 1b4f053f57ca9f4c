"""Intermediate-feature alignment (FitNets-style): student features, mapped to the teacher's width by
a learned linear layer when the widths differ, matched by MSE or cosine."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_kd(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
               kind: str = "mse") -> torch.Tensor:
    """student, teacher [B, N, D] (same D: project first); mask [B, N]. mse: mean over entries of masked
    tokens; cosine: mean over masked tokens of 1 - cos(s, t)."""
    t = teacher.to(student.dtype)
    if kind == "mse":
        per = ((student - t) ** 2).mean(-1)
    elif kind == "cosine":
        per = 1 - F.cosine_similarity(student, t, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"unknown feature loss {kind!r}; choose mse or cosine")
    if mask is None:
        return per.mean()
    return per[mask].mean() if mask.any() else per.sum() * 0
