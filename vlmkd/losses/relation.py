"""LLaVA-KD RDist (relation distillation): the student's visual tokens should relate to one another as
the teacher's do. R = Y_v Y_v^T over visual-token logits, L_rel = 1 - cos(vec R_s, vec R_t)
(Cai et al., "LLaVA-KD", 2024).

Full-vocabulary visual logits are never needed: Y = H W^T, so Y Y^T = H (W^T W) H^T = H G H^T with G the
LM head's Gram matrix, cached once for the teacher and formed from the live LM head for the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relation_matrix(feats: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """feats [B, N, D] -> R [B, N, N] = F F^T, or F G F^T when gram [D, D] is given."""
    if gram is None:
        return feats @ feats.transpose(1, 2)
    return feats @ gram.to(feats.dtype) @ feats.transpose(1, 2)


def relation_kd(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    mask: torch.Tensor | None = None,
    student_gram: torch.Tensor | None = None,
    teacher_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch mean of 1 - cos(vec R_s, vec R_t).

    student_feats [B, N, D_s], teacher_feats [B, N, D_t] (widths may differ: R is N x N either way);
    mask [B, N] bool selects each sample's tokens (pairs of two selected tokens enter R); optional
    Gram matrices turn hidden states into logit relations (R = H G H^T).
    """
    rs = relation_matrix(student_feats, student_gram)
    rt = relation_matrix(teacher_feats, teacher_gram).to(rs.dtype)
    if mask is not None:
        pair = (mask[:, :, None] & mask[:, None, :]).to(rs.dtype)
        rs, rt = rs * pair, rt * pair
    cos = F.cosine_similarity(rs.flatten(1), rt.flatten(1), dim=-1, eps=1e-12)
    return (1 - cos).mean()
