"""Logit distillation on a sparse teacher: top-k ids + one tail bucket (the rest of the mass).

Both distributions are compared over the same k + 1 buckets: the teacher's k ids, and a tail bucket
holding everything else (teacher: log(1 - sum p_topk), from the cache; student: the log-sum-exp of its
logits over the complement, computed as log(1 - sum q_topk) without a second vocabulary-sized tensor).
With k = V the tail is empty and every divergence equals its full-vocabulary value.

Temperature tau: the student's logits are divided by tau; the teacher's bucket log-probs are divided by
tau and renormalised over the k + 1 buckets (exact for k = V; for k < V the tail is tempered as one
bucket). Losses are multiplied by tau^2 (Hinton et al., 2015) so gradients keep their scale.

Divergences, p = teacher, q = student (JSD convention of DistiLLM / the issue, mixture m = beta p +
(1 - beta) q):
- "fkl": KL(p || q)                            (LLaVA-KD MDist, Align-KD logit term)
- "rkl": KL(q || p)
- "jsd": beta KL(p || m) + (1 - beta) KL(q || m)
- "skl": KL(p || alpha p + (1 - alpha) q)       (DistiLLM skew KL)
- "srkl": KL(q || (1 - alpha) p + alpha q)      (DistiLLM skew reverse KL)
- "tvd": 1/2 sum |p - q|
"""

from __future__ import annotations

import math

import torch

LOSSES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")
REDUCTIONS = ("token", "sequence", "batch")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler, 2012)."""
    x = x.clamp(max=0.0)
    small = x > -math.log(2)
    a = torch.log(-torch.expm1(torch.where(small, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(small, torch.full_like(x, -1.0), x)))
    return torch.where(small, a, b)


def bucket_logprobs(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log P, log Q, tail_valid): [..., k + 1] log-probs of teacher and student over the buckets.

    `tail_valid` [...] is False where the teacher's top-k holds all its mass (tail = -inf, k = V): there
    the tail bucket is dropped from both sides.
    """
    z = student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits
    lse = torch.logsumexp(z / temperature, dim=-1)
    return bucket_logprobs_from_lse(z.gather(-1, teacher_ids), lse, teacher_logprobs, teacher_tail, temperature,
                                    full_vocab=teacher_ids.shape[-1] >= student_logits.shape[-1])


def bucket_logprobs_from_lse(
    z_ids: torch.Tensor, lse: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_tail: torch.Tensor | None,
    temperature: float, full_vocab: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`bucket_logprobs` from what the student's side needs per row: its logits at the teacher's ids
    z_ids [..., k] (before the temperature) and lse [...] = logsumexp(z / tau) over the vocabulary.
    The fused kernels compute only these two, never the row's full log-softmax."""
    lq_top = z_ids / temperature - lse.unsqueeze(-1)
    lp_top = teacher_logprobs.to(lq_top.dtype)
    # a slot whose teacher log-prob is -inf is padding (several teachers' id unions differ in size per
    # row), equivalently an id the teacher gives no mass: left out on both sides, its student mass
    # stays in the student's tail bucket
    slot = torch.isfinite(lp_top)
    if teacher_tail is None:
        teacher_tail = log1mexp(torch.logsumexp(lp_top, dim=-1))
    tail = teacher_tail.to(lq_top.dtype)
    # no tail bucket where the teacher's top-k holds all its mass, or the k ids are the whole vocabulary
    valid = torch.isfinite(tail) & ~(slot.all(-1) & full_vocab)
    # the student's tail, log(1 - sum q_topk), only where it is a bucket and not numerically empty: the
    # log of 0 elsewhere would turn the masked-out gradient into 0 * inf = nan
    top = torch.logsumexp(lq_top.masked_fill(~slot, float("-inf")), dim=-1)
    ok = valid & (top < 0)
    floor = math.log(torch.finfo(lq_top.dtype).tiny)
    lq_tail = torch.where(ok, log1mexp(torch.where(ok, top, torch.full_like(top, -1.0))),
                          torch.full_like(top, floor))
    lp = torch.cat([lp_top, tail.unsqueeze(-1)], dim=-1)
    lq = torch.cat([lq_top, lq_tail.unsqueeze(-1)], dim=-1)
    neg_inf = torch.finfo(lp.dtype).min
    drop = torch.cat([~slot, (~valid).unsqueeze(-1)], dim=-1)
    lp = lp.masked_fill(drop, neg_inf)
    lq = lq.masked_fill(drop, neg_inf)
    if temperature != 1.0:
        lp = torch.log_softmax(lp / temperature, dim=-1).masked_fill(drop, neg_inf)
    return lp, lq, valid


def _kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """sum a (log a - log b) over the last dim, with 0 log 0 = 0."""
    a = la.exp()
    return torch.where(a > 0, a * (la - lb), torch.zeros_like(a)).sum(-1)


def divergence(lp: torch.Tensor, lq: torch.Tensor, loss: str, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Per-position divergence between bucket distributions given as log-probs [..., K]."""
    if loss == "fkl":
        return _kl(lp, lq)
    if loss == "rkl":
        return _kl(lq, lp)
    if loss == "jsd":
        if beta <= 0.0:
            return _kl(lq, lq)  # m = q: KL(q||q) = 0 by the convention's definition
        if beta >= 1.0:
            return _kl(lp, lp)
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta))
        return beta * _kl(lp, lm) + (1 - beta) * _kl(lq, lm)
    if loss == "skl":
        lm = torch.logaddexp(lp + math.log(alpha), lq + math.log1p(-alpha)) if 0 < alpha < 1 else (lp if alpha >= 1 else lq)
        return _kl(lp, lm)
    if loss == "srkl":
        lm = torch.logaddexp(lp + math.log1p(-alpha), lq + math.log(alpha)) if 0 < alpha < 1 else (lq if alpha >= 1 else lp)
        return _kl(lq, lm)
    if loss == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    raise ValueError(f"unknown logit loss {loss!r}; choose one of {LOSSES}")


def reduce(per_pos: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """per_pos, mask [B, T]. token: mean over masked positions; sequence: mean of per-sequence means
    (sequences with no masked position left out); batch: sum over masked positions / B."""
    m = mask.to(per_pos.dtype)
    x = torch.where(mask, per_pos, torch.zeros_like(per_pos))
    if reduction == "token":
        return x.sum() / m.sum().clamp_min(1.0)
    if reduction == "sequence":
        n = m.sum(-1)
        has = n > 0
        seq = x.sum(-1) / n.clamp_min(1.0)
        return (seq * has).sum() / has.sum().clamp_min(1)
    if reduction == "batch":
        return x.sum() / per_pos.shape[0]
    raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")


def logit_kd(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    loss: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    teacher_tail: torch.Tensor | None = None,
    reduction: str = "token",
) -> torch.Tensor:
    """Sparse-teacher logit distillation.

    student_logits [B, T, V]; teacher_ids [B, T, k] int64; teacher_logprobs [B, T, k] (at tau = 1, -inf
    for a padding slot; the tail mass is 1 - sum exp unless `teacher_tail` [B, T] gives its log
    exactly); mask [B, T] bool.
    Returns tau^2 x the divergence reduced over masked positions (`reduction`: token, sequence, batch).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown logit loss {loss!r}; choose one of {LOSSES}")
    mask = mask.bool()
    # only the masked rows are computed: padding never reaches a log or an exp
    tail = teacher_tail[mask] if teacher_tail is not None else None
    lp, lq, _ = bucket_logprobs(student_logits[mask], teacher_ids[mask], teacher_logprobs[mask], tail, temperature)
    rows = divergence(lp, lq, loss, beta, alpha)
    per_pos = torch.zeros(mask.shape, dtype=rows.dtype, device=rows.device).masked_scatter(mask, rows)
    return temperature**2 * reduce(per_pos, mask, reduction)


SAMPLED_LOSSES = ("fkl",)


def sampled_kd(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_weights: torch.Tensor,
    mask: torch.Tensor,
    teacher_logprobs: torch.Tensor | None = None,
    reduction: str = "token",
) -> torch.Tensor:
    """Random-Sampling KD (Anshumann et al., 2025, arXiv 2503.16870): forward KL to a teacher known
    through sampled ids with unbiased weights (E[w_v] = p_v, from the cache's counts and importance
    weights). Per position sum_j w_j (log p_j - log q_j): an unbiased estimate of KL(p || q), and of
    its gradient. Without the teacher's log-probs it is the cross-entropy form -sum_j w_j log q_j
    (KL + H(p) in expectation, the same gradient).

    student_logits [B, T, V]; teacher_ids, teacher_weights [B, T, m] (weight 0 = padding); mask [B, T].
    Only forward KL is linear in p: reverse KL, JSD, skew KLs and TVD need p inside a log or an
    absolute value, where a sampled estimate is biased; they are refused where a recipe asks for them.
    """
    mask = mask.bool()
    z = student_logits[mask]
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    lq = torch.log_softmax(z, dim=-1).gather(-1, teacher_ids[mask])
    w = teacher_weights[mask].to(lq.dtype)
    rows = -(w * lq).sum(-1)
    if teacher_logprobs is not None:
        lp = teacher_logprobs[mask].to(lq.dtype)
        rows = rows + torch.where(w > 0, w * lp, torch.zeros_like(w)).sum(-1)
    per_pos = torch.zeros(mask.shape, dtype=rows.dtype, device=rows.device).masked_scatter(mask, rows)
    return reduce(per_pos, mask, reduction)
