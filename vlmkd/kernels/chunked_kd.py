"""LM head + sparse-target KD without full-vocabulary logits for all tokens at once.

Naive KD materialises the student's [N, V] logits, their log-softmax and their gradient. Per token the
loss needs only the log-sum-exp over V and the log-probs at the teacher's k ids, so the rows are
processed in chunks: logits of one chunk (float32), the loss on its k + 1 buckets (the same
`bucket_logprobs` / `divergence` as `vlmkd.losses.logit_kd`), and the gradients for the hidden states
and the LM-head weight, computed in the forward pass and scaled in the backward (the Liger-Kernel
pattern). Peak memory is one chunk's logits and their gradient instead of all of them.

This is the portable path (CPU, or GPUs without Triton). Its interface is the one the fused GPU
kernel keeps.
"""

from __future__ import annotations

import torch

from vlmkd.losses.logit import bucket_logprobs, divergence


def _chunk_rows(V: int, budget_elems: int = 1 << 21) -> int:
    return max(1, budget_elems // max(V, 1))


class ChunkedLinearSparseKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, logprobs, tail, loss, temperature, beta, alpha, chunk):
        N = hidden.shape[0]
        acc = torch.promote_types(weight.dtype, torch.float32)  # bf16 weights accumulate in fp32
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, N, chunk):
            h = hidden[s : s + chunk]
            # the chunk's logits, and the loss's gradient with respect to them only
            z = (h @ weight.T).to(acc).requires_grad_(True)
            with torch.enable_grad():
                lp, lq, _ = bucket_logprobs(z, ids[s : s + chunk], logprobs[s : s + chunk], tail[s : s + chunk],
                                            temperature)
                part = divergence(lp, lq, loss, beta, alpha).sum() * (temperature**2 / N)
            (gz,) = torch.autograd.grad(part, z)
            del z, lp, lq
            gz = gz.to(weight.dtype)
            grad_h[s : s + chunk] = gz @ weight
            grad_w.addmm_(gz.T.to(acc), h.to(acc))
            total += part.detach()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw = ctx.saved_tensors
        if not torch.equal(grad_out, torch.ones_like(grad_out)):  # in place: no second weight-sized copy
            gh.mul_(grad_out)
            gw.mul_(grad_out)
        return gh, gw.to(ctx.w_dtype), None, None, None, None, None, None, None, None


def linear_sparse_kd(hidden: torch.Tensor, weight: torch.Tensor, teacher_ids: torch.Tensor,
                     teacher_logprobs: torch.Tensor, teacher_tail: torch.Tensor, loss: str = "fkl",
                     temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                     chunk: int | None = None) -> torch.Tensor:
    """Mean over rows of the sparse-target divergence of softmax(hidden @ weight^T / tau).

    hidden [N, D] (the student's final hidden states at the scored rows only); weight [V, D] (the LM
    head); teacher_ids [N, k]; teacher_logprobs [N, k]; teacher_tail [N]. Equals
    `logit_kd(hidden @ weight.T, ...)` with every row masked in, token reduction.
    """
    chunk = chunk or _chunk_rows(weight.shape[0])
    return ChunkedLinearSparseKD.apply(hidden, weight, teacher_ids, teacher_logprobs, teacher_tail, loss,
                                       temperature, beta, alpha, chunk)
