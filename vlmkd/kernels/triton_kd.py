"""Triton kernels for LM-head + sparse-target KD: per chunk of logits, statistics out, then dL/dlogits in place.

Per row of a chunk's logits z [C, V] the loss needs only lse = logsumexp(z / tau) and z at the
teacher's k ids; its gradient is dense only through lse:

    dL/dz_v = g_lse * softmax(z / tau)_v / tau + sum_j g_j [v == id_j],  (g_lse, g_j) = dL/d(lse, z_ids)

Kernel 1 streams each row once (online max and sum over vocabulary blocks) and gathers the k logits;
the k + 1-bucket divergence and (g_lse, g_j) come from `vlmkd.losses.logit` on [N, k + 1] tensors (the
same formulas as every other path, autograd on a tiny graph, once for all rows); kernel 2 streams the
row again and overwrites z with dL/dz (dense part), then adds the k sparse terms. Two passes over the
chunks (`vlmkd.kernels.chunked_kd`): the chunk's logits are computed twice (4 matmuls, not 3), because
the small graph per chunk cost ~2 ms of host time on an H100, more than the chunk's GPU work. The
matmuls around it (z = h W^T, dL/dh = G W, dL/dW += G^T h) stay cuBLAS: a fully fused matmul cannot keep a [rows x hidden] gradient
accumulator on chip at hidden sizes of 896-2,048 (the Liger-Kernel design, for the same reason).

Runs on CUDA, and on the CPU under TRITON_INTERPRET=1 (the interpreter: tests only, slow).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmkd.losses.logit import bucket_logprobs_from_lse, divergence

# a finite stand-in for -inf in the running max, so that masked lanes never compute (-inf) - (-inf)
_NEG = tl.constexpr(-1.0e30)


@triton.jit
def _lse_gather_kernel(z_ptr, z_stride, ids_ptr, ids_stride, lse_ptr, zid_ptr, V, K, inv_tau_ptr,
                       BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * z_stride
    acc = lse_ptr.dtype.element_ty  # float32, or float64 for float64 logits (the tests' exact mode)
    inv_tau = tl.load(inv_tau_ptr)  # from memory: a Python float argument would arrive as float32
    m = tl.full([BLOCK_V], _NEG, acc)
    s = tl.zeros([BLOCK_V], acc)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(acc) * inv_tau
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    mx = tl.max(m, axis=0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
    tl.store(lse_ptr + row, lse)
    ko = tl.arange(0, BLOCK_K)
    km = ko < K
    ids = tl.load(ids_ptr + row * ids_stride + ko, mask=km, other=0)
    zi = tl.load(base + ids, mask=km, other=0.0).to(acc)
    tl.store(zid_ptr + row * K + ko, zi, mask=km)


@triton.jit
def _grad_kernel(z_ptr, z_stride, lse_ptr, glse_ptr, ids_ptr, ids_stride, gid_ptr, V, K, inv_tau_ptr,
                 BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * z_stride
    acc = lse_ptr.dtype.element_ty
    inv_tau = tl.load(inv_tau_ptr)
    lse = tl.load(lse_ptr + row)
    g = tl.load(glse_ptr + row) * inv_tau
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        msk = offs < V
        x = tl.load(base + offs, mask=msk, other=0.0).to(acc)
        gz = g * tl.exp(x * inv_tau - lse)
        tl.store(base + offs, gz.to(z_ptr.dtype.element_ty), mask=msk)
    tl.debug_barrier()  # the dense writes land before the sparse read-modify-write of the same row
    ko = tl.arange(0, BLOCK_K)
    km = ko < K
    ids = tl.load(ids_ptr + row * ids_stride + ko, mask=km, other=0)
    gi = tl.load(gid_ptr + row * K + ko, mask=km, other=0.0)
    # padding slots (gradient 0) may repeat a real id of the row: skipped, so that they cannot race
    # with that id's read-modify-write
    km = km & (gi != 0.0)
    cur = tl.load(base + ids, mask=km, other=0.0).to(acc)
    tl.store(base + ids, (cur + gi).to(z_ptr.dtype.element_ty), mask=km)


def interpreting() -> bool:
    """Whether this module's kernels were decorated under TRITON_INTERPRET=1 (read once, at import)."""
    return type(_lse_gather_kernel).__name__ == "InterpretedFunction"


def _blocks(V: int, K: int) -> tuple[int, int, int]:
    block_v = min(triton.next_power_of_2(V), 8192)
    return block_v, triton.next_power_of_2(max(K, 1)), 16 if block_v >= 8192 else 8


def _check(z: torch.Tensor) -> None:
    if not (z.is_cuda or interpreting()):
        raise RuntimeError("the Triton KD kernels need a CUDA tensor, or TRITON_INTERPRET=1 on the CPU")


def inverse_temperature(temperature: float, dtype: torch.dtype, device) -> torch.Tensor:
    """1 / tau as a one-element tensor for the kernels: a Python float argument would reach them as
    float32 on a GPU (the interpreter keeps float64), off by ~1e-8 relative in the float64 mode."""
    return torch.full((1,), 1.0 / temperature, dtype=dtype, device=device)


def lse_gather(z: torch.Tensor, ids: torch.Tensor, inv_tau: torch.Tensor, lse: torch.Tensor,
               z_ids: torch.Tensor) -> None:
    """Pass 1 on a chunk's logits z [C, V]: lse [C] = logsumexp(z / tau) and z_ids [C, k] = z at the
    teacher's ids, written into the given rows of the call's statistics."""
    _check(z)
    C, V = z.shape
    K = ids.shape[1]
    z, ids = z.contiguous(), ids.contiguous()
    block_v, block_k, warps = _blocks(V, K)
    _lse_gather_kernel[(C,)](z, z.stride(0), ids, ids.stride(0), lse, z_ids, V, K, inv_tau,
                             BLOCK_V=block_v, BLOCK_K=block_k, num_warps=warps)


def bucket_grads(lse: torch.Tensor, z_ids: torch.Tensor, lp: torch.Tensor, tail: torch.Tensor, V: int, loss: str,
                 temperature: float, beta: float, alpha: float, scale: float):
    """The (k+1)-bucket divergence of every row from its statistics, summed and scaled, and its
    gradients (g_lse [N], g_zid [N, k]): one small autograd graph per call, not per chunk (host time)."""
    with torch.enable_grad():
        lse_v = lse.detach().requires_grad_(True)
        zid_v = z_ids.detach().requires_grad_(True)
        lpb, lqb, _ = bucket_logprobs_from_lse(zid_v, lse_v, lp.to(lse.dtype), tail.to(lse.dtype), temperature,
                                               full_vocab=z_ids.shape[1] >= V)
        part = divergence(lpb, lqb, loss, beta, alpha).sum() * scale
    g_zid, g_lse = torch.autograd.grad(part, (zid_v, lse_v))
    return part.detach(), g_lse.contiguous(), g_zid.contiguous()


def grad_in_place(z: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, g_lse: torch.Tensor, g_zid: torch.Tensor,
                  inv_tau: torch.Tensor) -> torch.Tensor:
    """Pass 2 on a chunk's logits z [C, V] (contiguous): overwritten with dL/dz and returned."""
    _check(z)
    C, V = z.shape
    K = ids.shape[1]
    ids = ids.contiguous()
    block_v, block_k, warps = _blocks(V, K)
    _grad_kernel[(C,)](z, z.stride(0), lse, g_lse, ids, ids.stride(0), g_zid, V, K, inv_tau,
                       BLOCK_V=block_v, BLOCK_K=block_k, num_warps=warps)
    return z
