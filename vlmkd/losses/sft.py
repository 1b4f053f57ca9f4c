"""The plain supervised loss: next-token cross-entropy on response tokens (LLaVA's L_reg / L_PT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def response_ce(logits: torch.Tensor, input_ids: torch.Tensor, labels_mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens of -log q(x_t | x_<t).

    logits [B, T, V] predict the token after each position; labels_mask [B, T] marks the tokens to
    predict, so position t's target is input_ids[t] and its prediction sits at logits[t - 1].
    """
    pred = logits[:, :-1]
    target = input_ids[:, 1:]
    mask = labels_mask[:, 1:]
    if not mask.any():
        return pred.sum() * 0.0
    return F.cross_entropy(pred[mask].float(), target[mask])
