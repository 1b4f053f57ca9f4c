"""Attention-map distillation and Align-KD's text-focused alignment of projected visual tokens.

Align-KD (Feng et al., 2024) distils the first LLM layer's text-to-vision attention, where cross-modal
matching happens, and aligns the student's projected visual tokens with the teacher's, each token
weighted by how much the text attends to it (its "text focus").
"""

from __future__ import annotations

import torch


def attention_kd(student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor,
                 kind: str = "mse", eps: float = 1e-8, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Text-to-vision attention distillation.

    student_attn, teacher_attn [B, L, Q, N] (attention of Q text queries over N visual keys, heads
    averaged or matched); mask [B, Q] bool marks real queries; key_mask [B, N] bool, when rows have
    different visual-token counts, marks each row's real keys (padded keys must be 0 on both sides).
    mse: mean squared difference per entry over masked queries (each query's mean over its row's keys).
    kl: each query's attention renormalised over the visual keys, KL(teacher || student), mean over
    masked queries and layers.
    kl_raw: Align-KD's own (the authors' `get_vt_loss`): per entry (t + eps) log((t + eps) / (s + eps)),
    unnormalised, mean over the masked queries' real (query, key) entries and layers.
    """
    m = mask[:, None, :].expand(student_attn.shape[:3])
    if kind == "mse":
        d = (student_attn - teacher_attn.to(student_attn.dtype)) ** 2
        if key_mask is None:
            per = d.mean(-1)
        else:
            k = key_mask[:, None, None, :].to(d.dtype)
            per = (d * k).sum(-1) / k.sum(-1).clamp_min(1.0)
        return per[m].mean() if m.any() else student_attn.sum() * 0
    if kind == "kl":
        ps = student_attn / student_attn.sum(-1, keepdim=True).clamp_min(eps)
        pt = teacher_attn.to(ps.dtype)
        pt = pt / pt.sum(-1, keepdim=True).clamp_min(eps)
        kl = (pt * ((pt + eps).log() - (ps + eps).log())).sum(-1)
        return kl[m].mean() if m.any() else student_attn.sum() * 0
    if kind == "kl_raw":
        pt = teacher_attn.to(student_attn.dtype)
        d = (pt + eps) * ((pt + eps).log() - (student_attn + eps).log())
        k = torch.ones_like(d) if key_mask is None else key_mask[:, None, None, :].to(d.dtype).expand_as(d)
        w = k * m[..., None].to(d.dtype)
        return (d * w).sum() / w.sum() if m.any() else student_attn.sum() * 0
    raise ValueError(f"unknown attention loss {kind!r}; choose mse, kl or kl_raw")


def text_focus(teacher_attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, Q, N] attention, [B, Q] query mask -> [B, N] weights summing to one: the mean attention
    the text pays to each visual token (over layers and real queries), normalised."""
    m = mask[:, None, :, None].to(teacher_attn.dtype)
    focus = (teacher_attn * m).sum((1, 2))
    return focus / focus.sum(-1, keepdim=True).clamp_min(1e-12)


def focus_align(student_vis: torch.Tensor, teacher_vis: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Align-KD projection alignment: sum_j w_j ||s_j - t_j||^2 / D, mean over the batch.

    student_vis [B, N, D] (already mapped to the teacher's width by the learned projection),
    teacher_vis [B, N, D], weights [B, N] (text focus, rows sum to one).
    """
    d = ((student_vis - teacher_vis.to(student_vis.dtype)) ** 2).mean(-1)
    return (weights.to(d.dtype) * d).sum(-1).mean()


def top_focus_align(student_vis: torch.Tensor, teacher_vis: torch.Tensor, focus: torch.Tensor, top_k: int = 32,
                    top_weight: float = 0.1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Align-KD's projection alignment as its authors compute it (`get_v_loss`): the mean squared
    difference over every visual token, plus `top_weight` x the same over each row's `top_k` tokens
    the text attends to most (by `focus` [B, N]; a row with fewer real tokens takes all of them).

    student_vis, teacher_vis [B, N, D] at one width (the learned map already applied); mask [B, N] of
    real tokens when rows have different counts (padded tokens count nowhere).
    """
    d = ((student_vis - teacher_vis.to(student_vis.dtype)) ** 2).mean(-1)  # [B, N]
    real = torch.ones_like(d, dtype=torch.bool) if mask is None else mask
    plain = d[real].mean()
    k = min(top_k, d.shape[1])
    idx = focus.masked_fill(~real, float("-inf")).topk(k, dim=-1).indices
    picked = real.gather(1, idx)
    top = d.gather(1, idx)[picked].mean()
    return plain + top_weight * top