"""The chunked LM-head + sparse KD path against logit_kd and the float64 reference, gradients included."""

from __future__ import annotations

import os

import pytest
import torch
from reference import sparse_kd_ref

from vlmkd.kernels.chunked_kd import linear_sparse_kd
from vlmkd.losses import LOSSES, logit_kd

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
