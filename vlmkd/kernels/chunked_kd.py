"""LM head + sparse-target KD without full-vocabulary logits for all tokens at once.

Naive KD materialises the student's [N, V] logits, their log-softmax and their gradient. Per token the
loss needs only the log-sum-exp over V and the log-probs at the teacher's k ids, so the rows are
processed in chunks: logits of one chunk, the loss on its k + 1 buckets (the formulas of
`vlmkd.losses.logit`), and the gradients for the hidden states and the LM-head weight, computed in the
forward pass and scaled in the backward (the Liger-Kernel pattern). Peak memory is one chunk's logits
(overwritten by their gradient) instead of all of them.

Two ways to turn a chunk's logits into (loss, dL/dlogits), one loop around them:
- "torch": autograd over the chunk's float32 log-softmax (CPU, or GPUs without Triton);
- "triton": `vlmkd.kernels.triton_kd`, in the matmul's dtype (bf16 on GPUs): a first pass over the
  chunks keeps only each row's log-sum-exp and teacher-id logits, the bucket divergence and its
  gradient run once for all rows, and a second pass recomputes each chunk's logits and overwrites them
  with dL/dz (host time per chunk: a few launches, not a small autograd graph).
"""

from __future__ import annotations

import torch

from vlmkd.losses.logit import bucket_logprobs, divergence

IMPLS = ("torch", "triton")


def default_chunk(N: int, V: int, D: int, cuda: bool) -> int:
    """Rows per chunk. CPU: ~2M logits per chunk (8 MB of float32, cache-sized). GPU: every chunk
    costs about 1 ms of host time (the launches of the small (k+1)-bucket graph), so a chunk holds at
    least 2^26 logits (128 MB in bf16) and at least Liger-Kernel's rule (logits the size of the hidden
    states), in a power of two of rows: still 1/30 or less of the full logits once N x V passes 2^31
    (measured on an H100: docs/PERFORMANCE.md)."""
    if not cuda:
        return max(1, (1 << 21) // max(V, 1))
    per = -(-V // max(D, 1))
    rows = max(-(-N // per), -(-(1 << 26) // max(V, 1)))
    return max(1, min(N, 1 << (rows - 1).bit_length()))


def _torch_chunk(z, ids, lp, tail, loss, temperature, beta, alpha, scale):
    acc = torch.promote_types(z.dtype, torch.float32)
    z = z.to(acc).requires_grad_(True)
    with torch.enable_grad():
        lpb, lqb, _ = bucket_logprobs(z, ids, lp, tail, temperature)
        part = divergence(lpb, lqb, loss, beta, alpha).sum() * scale
    (gz,) = torch.autograd.grad(part, z)
    return part.detach(), gz


def _accumulate(gz, h, weight, grad_h_rows, grad_w) -> None:
    grad_h_rows.copy_(gz @ weight)
    grad_w.addmm_(gz.T.to(grad_w.dtype), h.to(grad_w.dtype))


def _triton_passes(hidden, weight, ids, logprobs, tail, loss, temperature, beta, alpha, chunk, scale, grad_h, grad_w):
    """Pass 1: each chunk's logits to (lse, z at the teacher's ids); the bucket divergence and its
    gradient for all rows at once; pass 2: each chunk's logits again, overwritten with dL/dz."""
    from vlmkd.kernels import triton_kd as tk

    N, V = hidden.shape[0], weight.shape[0]
    stat = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    lse = torch.empty(N, dtype=stat, device=hidden.device)
    z_ids = torch.empty(N, ids.shape[1], dtype=stat, device=hidden.device)
    ids = ids.contiguous()
    inv_tau = tk.inverse_temperature(temperature, stat, hidden.device)
    for s in range(0, N, chunk):
        tk.lse_gather(hidden[s : s + chunk] @ weight.T, ids[s : s + chunk], inv_tau, lse[s : s + chunk],
                      z_ids[s : s + chunk])
    total, g_lse, g_zid = tk.bucket_grads(lse, z_ids, logprobs, tail, V, loss, temperature, beta, alpha, scale)
    for s in range(0, N, chunk):
        h = hidden[s : s + chunk]
        gz = tk.grad_in_place((h @ weight.T).contiguous(), ids[s : s + chunk], lse[s : s + chunk],
                              g_lse[s : s + chunk], g_zid[s : s + chunk], inv_tau)
        _accumulate(gz, h, weight, grad_h[s : s + chunk], grad_w)
    return total


class LinearSparseKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, logprobs, tail, loss, temperature, beta, alpha, chunk, impl, grad_w_dtype):
        N = hidden.shape[0]
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=grad_w_dtype, device=weight.device)
        scale = temperature**2 / N
        if impl == "triton":
            total = _triton_passes(hidden, weight, ids, logprobs, tail, loss, temperature, beta, alpha, chunk, scale,
                                   grad_h, grad_w)
        else:
            total = torch.zeros((), dtype=torch.promote_types(weight.dtype, torch.float32), device=hidden.device)
            for s in range(0, N, chunk):
                h = hidden[s : s + chunk]
                z = h @ weight.T  # the chunk's logits: the only [rows x V] buffer
                part, gz = _torch_chunk(z, ids[s : s + chunk], logprobs[s : s + chunk], tail[s : s + chunk], loss,
                                        temperature, beta, alpha, scale)
                del z
                _accumulate(gz.to(weight.dtype), h, weight, grad_h[s : s + chunk], grad_w)
                total += part
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw = ctx.saved_tensors
        if not torch.equal(grad_out, torch.ones_like(grad_out)):  # in place: no second weight-sized copy
            gh.mul_(grad_out)
            gw.mul_(grad_out)
        return gh, gw.to(ctx.w_dtype), *([None] * 10)


def linear_sparse_kd(hidden: torch.Tensor, weight: torch.Tensor, teacher_ids: torch.Tensor,
                     teacher_logprobs: torch.Tensor, teacher_tail: torch.Tensor, loss: str = "fkl",
                     temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                     chunk: int | None = None, impl: str = "torch",
                     grad_w_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean over rows of the sparse-target divergence of softmax(hidden @ weight^T / tau), times tau^2.

    hidden [N, D] (the student's final hidden states at the scored rows only); weight [V, D] (the LM
    head); teacher_ids [N, k]; teacher_logprobs [N, k]; teacher_tail [N]. Equals
    `logit_kd(hidden @ weight.T, ...)` with every row masked in, token reduction.
    `grad_w_dtype`: the LM-head gradient's accumulator across chunks: float32 by default for "torch";
    the weight's own dtype for "triton" (as Liger-Kernel does: a float32 copy of a 152k x 2,048 head
    alone is 1.2 GB, more than the fused path's whole memory goal), float32 on request.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose one of {IMPLS}")
    chunk = chunk or default_chunk(hidden.shape[0], weight.shape[0], weight.shape[1], hidden.is_cuda)
    if grad_w_dtype is None:
        grad_w_dtype = weight.dtype if impl == "triton" else torch.promote_types(weight.dtype, torch.float32)
    return LinearSparseKD.apply(hidden, weight, teacher_ids, teacher_logprobs, teacher_tail, loss,
                                temperature, beta, alpha, chunk, impl, grad_w_dtype)
