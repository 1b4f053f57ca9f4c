"""Cross-tokenizer logit distillation on aligned spans (teacher and student with different vocabularies).

Universal logit distillation (Boizard et al., 2024, "Towards cross-tokenizer distillation: the
universal logit distillation loss for LLMs"): the Wasserstein-1 distance between the two next-token
distributions with their ids forgotten, which for the 0/1 cost between ranks is the L1 distance
between the probability vectors sorted in descending order. The cache holds the teacher's top-k and
the tail mass, not the rest of its vector; here the comparison is exact on what is known: ranks
1..n (n = the row's kept ids) one by one, and everything below rank n as one bin on both sides,

    ULD(p, q) = sum_{i <= n} |q_(i) - p_(i)| + |(1 - sum_{i <= n} q_(i)) - tail_p|,

the W1 distance between the two distributions coarsened to those n + 1 rank bins (a lower bound of
the uncoarsened one, equal to it when the tail is empty).

The GOLD hybrid (TRL's GOLD trainer): where an aligned span is one token on both sides and that
token's string is in both vocabularies, the ids do mean the same, so the ordinary sparse KL applies,
with the teacher's top-k ids mapped into the student vocabulary (ids with no counterpart join the tail).
"""

from __future__ import annotations

import torch

from vlmkd.losses.logit import bucket_logprobs, divergence


def uld_rows(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_tail: torch.Tensor) -> torch.Tensor:
    """Per-row ULD [G] between the student's distributions (logits [G, V]) and the teacher's cached top-k
    (log-probs [G, k], -inf on padding slots, any order) with its log tail mass [G] (-inf: empty)."""
    z = student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits
    q = torch.softmax(z, dim=-1)
    k = teacher_logprobs.shape[-1]
    p = torch.sort(teacher_logprobs.to(q.dtype).exp(), dim=-1, descending=True).values  # padding (-inf) -> 0, last
    n = torch.isfinite(teacher_logprobs).sum(-1)
    kk = min(k, q.shape[-1])
    q_top = torch.topk(q, kk, dim=-1).values
    if kk < k:  # a teacher row wider than the student's vocabulary: the missing ranks hold 0
        q_top = torch.cat([q_top, q_top.new_zeros(q_top.shape[:-1] + (k - kk,))], dim=-1)
    ranked = torch.arange(k, device=q.device) < n.unsqueeze(-1)
    q_in = q_top * ranked
    q_rest = (1.0 - q_in.sum(-1)).clamp_min(0.0)
    p_rest = teacher_tail.to(q.dtype).exp()
    return ((q_in - p * ranked).abs().sum(-1)) + (q_rest - p_rest).abs()


def exact_rows(student_logits: torch.Tensor, mapped_ids: torch.Tensor, mapped_logprobs: torch.Tensor,
               mapped_tail: torch.Tensor, loss: str = "fkl") -> torch.Tensor:
    """Per-row sparse divergence [G] at rows whose teacher ids were mapped into the student vocabulary
    (mapped_ids [G, k]; log-probs -inf where an id has no counterpart; its mass is in mapped_tail [G])."""
    lp, lq, _ = bucket_logprobs(student_logits, mapped_ids, mapped_logprobs, mapped_tail, 1.0)
    return divergence(lp, lq, loss)


def cross_kd(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_tail: torch.Tensor,
             exact: torch.Tensor | None = None, mapped_ids: torch.Tensor | None = None,
             mapped_logprobs: torch.Tensor | None = None, mapped_tail: torch.Tensor | None = None,
             loss: str = "fkl") -> torch.Tensor:
    """Mean over the G aligned spans of ULD, or (hybrid: `exact` [G] bool given) the sparse KL on the
    spans where the token is shared; student_logits [G, V] are the rows at each span's first token."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    per = uld_rows(student_logits, teacher_logprobs, teacher_tail)
    if exact is not None and bool(exact.any()):
        kl = exact_rows(student_logits[exact], mapped_ids[exact], mapped_logprobs[exact], mapped_tail[exact], loss)
        per = torch.where(exact, torch.zeros_like(per).masked_scatter(exact, kl.to(per.dtype)), per)
    return per.mean()
