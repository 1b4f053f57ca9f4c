"""The chunked LM-head + sparse KD paths (PyTorch, and the Triton kernels under the interpreter on the
CPU or compiled on a GPU) against logit_kd and the float64 reference, gradients included."""

from __future__ import annotations

import os

import pytest
import torch
from reference import sparse_kd_ref

from vlmkd.kernels import best_impl, linear_sparse_kd, triton_usable
from vlmkd.losses import LOSSES, logit_kd

# without a GPU, conftest imported the Triton kernels under TRITON_INTERPRET=1: they run on CPU tensors
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_usable(), reason="triton is not installed")

SEED = int.from_bytes(os.urandom(4), "little")


def _case(seed, N=13, D=6, V=29, k=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype) * 0.7
    t = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
    lps, ids = t.topk(k, -1)
    tail = torch.logsumexp(t.scatter(-1, ids, float("-inf")), -1)
    return h, w, ids, lps.to(dtype), tail.to(dtype)


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd", "skl", "srkl", "tvd"])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_chunked_equals_naive_and_reference(loss, chunk):
    h, w, ids, lps, tail = _case(SEED)
    h.requires_grad_(True)
    w.requires_grad_(True)
    got = linear_sparse_kd(h, w, ids, lps, tail, loss=loss, temperature=1.7, beta=0.3, alpha=0.2, chunk=chunk)
    gh, gw = torch.autograd.grad(got, (h, w))
    z = h @ w.T
    mask = torch.ones(1, len(h), dtype=torch.bool)
    naive = logit_kd(z[None], ids[None], lps[None], mask, loss=loss, temperature=1.7, beta=0.3, alpha=0.2,
                     teacher_tail=tail[None])
    nh, nw = torch.autograd.grad(naive, (h, w))
    ref = sparse_kd_ref(z.detach()[None], ids[None], lps[None], mask, loss, 1.7, 0.3, 0.2, tail=tail[None])
    assert float(got) == pytest.approx(ref, rel=1e-6)
    assert torch.allclose(gh, nh, rtol=1e-6, atol=1e-9) and torch.allclose(gw, nw, rtol=1e-6, atol=1e-9)


def test_chunked_float32_within_tolerance_and_gradcheck():
    h, w, ids, lps, tail = _case(SEED + 1)
    ref = sparse_kd_ref((h @ w.T)[None], ids[None], lps[None], torch.ones(1, 13, dtype=torch.bool), "fkl",
                        tail=tail[None])
    got = linear_sparse_kd(h.float(), w.float(), ids, lps.float(), tail.float(), chunk=5)
    assert float(got) == pytest.approx(ref, rel=1e-4)
    h.requires_grad_(True)
    w.requires_grad_(True)
    for loss in LOSSES:
        assert torch.autograd.gradcheck(lambda a, b: linear_sparse_kd(a, b, ids, lps, tail, loss=loss, chunk=4),
                                        (h, w), eps=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", [(13, 6, 29, 5, 4), (7, 3, 300, 1, 7), (9, 5, 37, 37, 4)])
def test_triton_equals_float64_reference(loss, shape):
    """float64 end to end (the interpreter computes in the logits' dtype): exact to rounding, odd shapes,
    k = 1, and k = V (no tail bucket)."""
    N, D, V, k, chunk = shape
    h, w, ids, lps, tail = _case(SEED + V, N, D, V, k)
    h, w = h.to(TRITON_DEVICE).requires_grad_(True), w.to(TRITON_DEVICE).requires_grad_(True)
    ids, lps, tail = ids.to(TRITON_DEVICE), lps.to(TRITON_DEVICE), tail.to(TRITON_DEVICE)
    got = linear_sparse_kd(h, w, ids, lps, tail, loss=loss, temperature=1.3, beta=0.4, alpha=0.2, chunk=chunk,
                           impl="triton")
    gh, gw = torch.autograd.grad(got, (h, w))
    mask = torch.ones(1, N, dtype=torch.bool)
    z = (h @ w.T).detach().cpu()
    ref = sparse_kd_ref(z[None], ids.cpu()[None], lps.cpu()[None], mask, loss, 1.3, 0.4, 0.2, tail=tail.cpu()[None])
    assert float(got) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    ref_h, ref_w = (x.detach().cpu().requires_grad_(True) for x in (h, w))
    naive = logit_kd((ref_h @ ref_w.T)[None], ids.cpu()[None], lps.cpu()[None], mask, loss=loss, temperature=1.3,
                     beta=0.4, alpha=0.2, teacher_tail=tail.cpu()[None])
    nh, nw = torch.autograd.grad(naive, (ref_h, ref_w))
    assert torch.allclose(gh.cpu(), nh, rtol=1e-9, atol=1e-12) and torch.allclose(gw.cpu(), nw, rtol=1e-9, atol=1e-12)


@needs_triton
def test_triton_gradcheck_and_float32():
    h, w, ids, lps, tail = _case(SEED + 2)
    h, w = h.to(TRITON_DEVICE).requires_grad_(True), w.to(TRITON_DEVICE).requires_grad_(True)
    ids, lps, tail = ids.to(TRITON_DEVICE), lps.to(TRITON_DEVICE), tail.to(TRITON_DEVICE)
    for loss in ("fkl", "rkl", "jsd"):
        assert torch.autograd.gradcheck(
            lambda a, b: linear_sparse_kd(a, b, ids, lps, tail, loss=loss, temperature=0.8, chunk=4, impl="triton"),
            (h, w), eps=1e-6, atol=1e-6)
    ref = sparse_kd_ref((h @ w.T).detach().cpu()[None], ids.cpu()[None], lps.cpu()[None],
                        torch.ones(1, 13, dtype=torch.bool), "fkl", tail=tail.cpu()[None])
    got = linear_sparse_kd(h.float(), w.float(), ids, lps.float(), tail.float(), chunk=5, impl="triton")
    assert float(got) == pytest.approx(ref, rel=1e-5)


def test_best_impl_picks_triton_only_on_cuda():
    assert best_impl(torch.device("cpu")) == "torch"
    if torch.cuda.is_available() and triton_usable():
        assert best_impl(torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="unknown implementation"):
        linear_sparse_kd(*_case(SEED)[:5], impl="cuda")


def test_default_chunk_rules():
    from vlmkd.kernels.chunked_kd import default_chunk

    assert default_chunk(4096, 32000, 896, cuda=False) == (1 << 21) // 32000
    for N, V, D in [(16384, 151936, 896), (4096, 32000, 2048), (100, 440, 64), (1, 262144, 4096)]:
        rows = default_chunk(N, V, D, cuda=True)
        assert rows == N or (rows * V >= 1 << 26 and rows & (rows - 1) == 0), (N, V, D, rows)
        assert 1 <= rows <= N
