"""Every loss against its independent float64 reference (tests/reference.py), on fresh random inputs:
several seeds, odd shapes, masks and padding; gradients by gradcheck."""

from __future__ import annotations

import math
import os

import pytest
import torch
from reference import full_vocab_ref, preference_ref, relation_ref, sparse_kd_ref

from vlmkd.losses import (
    LOSSES,
    attention_kd,
    feature_kd,
    focus_align,
    linear_temperature,
    logit_kd,
    preference_kd,
    relation_kd,
    text_focus,
    top_focus_align,
)

SEED = int.from_bytes(os.urandom(4), "little")


def _case(seed, B, T, V, k, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    tz = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    full = torch.log_softmax(tz, -1)
    lps, ids = full.topk(k, dim=-1)
    rest = full.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, -1)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 0] = True
    mask[-1, -1] = False  # padding
    return z, tz, ids, lps, tail, mask


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", [(2, 3, 11, 4), (3, 5, 17, 7), (1, 4, 9, 9)])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_logit_kd_matches_reference(loss, shape, tau):
    for seed in (SEED, SEED + 1):
        z, _, ids, lps, tail, mask = _case(seed, *shape)
        got = logit_kd(z, ids, lps, mask, loss=loss, temperature=tau, beta=0.3, alpha=0.2, teacher_tail=tail)
        ref = sparse_kd_ref(z, ids, lps, mask, loss, tau, 0.3, 0.2, tail=tail)
        assert float(got) == pytest.approx(ref, rel=1e-6, abs=1e-9)
        # float32 path
        got32 = logit_kd(z.float(), ids, lps.float(), mask, loss=loss, temperature=tau, beta=0.3, alpha=0.2,
                         teacher_tail=tail.float())
        assert float(got32) == pytest.approx(ref, rel=1e-4, abs=1e-6)
        # tail implied as 1 - sum exp when not given
        implied = logit_kd(z, ids, lps, mask, loss=loss, temperature=tau, beta=0.3, alpha=0.2)
        ref_implied = sparse_kd_ref(z, ids, lps, mask, loss, tau, 0.3, 0.2)
        assert float(implied) == pytest.approx(ref_implied, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("reduction", ["token", "sequence", "batch"])
def test_reductions(reduction):
    z, _, ids, lps, tail, mask = _case(SEED, 3, 4, 13, 5)
    got = logit_kd(z, ids, lps, mask, teacher_tail=tail, reduction=reduction)
    assert float(got) == pytest.approx(sparse_kd_ref(z, ids, lps, mask, "fkl", tail=tail, reduction=reduction), rel=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_k_equals_v_is_the_full_vocabulary_divergence(loss):
    z, tz, ids, lps, tail, mask = _case(SEED + 7, 2, 3, 10, 10)
    got = logit_kd(z, ids, lps, mask, loss=loss, beta=0.3, alpha=0.2, teacher_tail=tail)
    assert float(got) == pytest.approx(full_vocab_ref(z, tz, mask, loss, 0.3, 0.2), rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("loss", LOSSES)
def test_logit_kd_gradcheck(loss):
    z, _, ids, lps, tail, mask = _case(SEED + 3, 2, 3, 7, 3)
    z.requires_grad_(True)

    def f(x):
        return logit_kd(x, ids, lps, mask, loss=loss, temperature=1.5, beta=0.4, alpha=0.3, teacher_tail=tail)

    if loss == "tvd":  # |p - q| is not differentiable at 0; random inputs keep away from it
        assert torch.autograd.gradcheck(f, (z,), eps=1e-7, atol=1e-6)
    else:
        assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_sparse_gap_shrinks_with_k():
    """The top-k + tail approximation of the full forward KL, measured as k grows."""
    gaps = []
    for k in (2, 8, 32, 64):
        z, tz, ids, lps, tail, mask = _case(SEED + 11, 2, 4, 64, k)
        sparse = float(logit_kd(z, ids, lps, mask, teacher_tail=tail))
        gaps.append(abs(sparse - full_vocab_ref(z, tz, mask, "fkl")))
    assert gaps[-1] < 1e-9 and gaps[0] > gaps[1] > gaps[-1]


def test_relation_kd_matches_reference_and_gradcheck():
    g = torch.Generator().manual_seed(SEED)
    fs = torch.randn(3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(3, 6, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 6, generator=g) < 0.7
    mask[:, 0] = True
    gs = torch.randn(5, 5, generator=g, dtype=torch.float64)
    gs = gs @ gs.T
    gt = torch.randn(8, 8, generator=g, dtype=torch.float64)
    gt = gt @ gt.T
    assert float(relation_kd(fs, ft, mask)) == pytest.approx(relation_ref(fs, ft, mask), rel=1e-6)
    assert float(relation_kd(fs, ft, mask, gs, gt)) == pytest.approx(relation_ref(fs, ft, mask, gs, gt), rel=1e-6)
    assert float(relation_kd(fs.float(), ft.float(), mask)) == pytest.approx(relation_ref(fs, ft, mask), rel=1e-4)
    assert torch.autograd.gradcheck(lambda x: relation_kd(x, ft, mask, gs, gt), (fs,))


def test_gram_trick_equals_full_logit_relations():
    g = torch.Generator().manual_seed(SEED + 5)
    H = torch.randn(2, 9, 16, generator=g, dtype=torch.float64)
    W = torch.randn(300, 16, generator=g, dtype=torch.float64)
    Y = H @ W.T
    a = relation_kd(H, H * 1.1 + 0.05, teacher_gram=W.T @ W, student_gram=W.T @ W)
    b = relation_kd(Y, (H * 1.1 + 0.05) @ W.T)
    assert float(a) == pytest.approx(float(b), rel=1e-9, abs=1e-12)


def test_preference_kd_matches_reference_and_gradcheck():
    g = torch.Generator().manual_seed(SEED)
    sc, sr, tc, tr = (torch.randn(7, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    assert float(preference_kd(sc, sr, tc, tr, 0.3)) == pytest.approx(preference_ref(sc, sr, tc, tr, 0.3), rel=1e-6)
    sc.requires_grad_(True)
    sr.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: preference_kd(a, b, tc, tr, 0.3), (sc, sr))


def test_attention_losses_against_reference():
    g = torch.Generator().manual_seed(SEED)
    B, L, Q, N = 2, 2, 5, 9
    s = torch.softmax(torch.randn(B, L, Q, N, generator=g, dtype=torch.float64), -1) * 0.6
    t = torch.softmax(torch.randn(B, L, Q, N, generator=g, dtype=torch.float64), -1) * 0.4
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mse_ref, kl_ref, n = 0.0, 0.0, 0
    for b in range(B):
        for layer in range(L):
            for q in range(Q):
                if not mask[b, q]:
                    continue
                n += 1
                mse_ref += float(((s[b, layer, q] - t[b, layer, q]) ** 2).mean())
                ps, pt = s[b, layer, q] / s[b, layer, q].sum(), t[b, layer, q] / t[b, layer, q].sum()
                kl_ref += float((pt * (pt.log() - ps.log())).sum())
    assert float(attention_kd(s, t, mask, "mse")) == pytest.approx(mse_ref / n, rel=1e-6)
    assert float(attention_kd(s, t, mask, "kl")) == pytest.approx(kl_ref / n, rel=1e-6)
    s.requires_grad_(True)
    for kind in ("mse", "kl"):
        assert torch.autograd.gradcheck(lambda x: attention_kd(x, t, mask, kind), (s,))


def test_attention_losses_with_per_row_key_counts_against_reference():
    """Rows of different visual-token counts, zero-padded to the largest: each query's loss over its own
    row's keys only (mse: mean over those keys; kl: renormalised over them), as a one-row batch of that
    row's true width gives; gradients by gradcheck."""
    g = torch.Generator().manual_seed(SEED)
    B, L, Q, N = 3, 2, 4, 7
    counts = [7, 3, 5]
    keys = torch.arange(N)[None, :] < torch.tensor(counts)[:, None]
    s = torch.softmax(torch.randn(B, L, Q, N, generator=g, dtype=torch.float64), -1) * 0.6 * keys[:, None, None]
    t = torch.softmax(torch.randn(B, L, Q, N, generator=g, dtype=torch.float64), -1) * 0.4 * keys[:, None, None]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    mse_ref, kl_ref, n = 0.0, 0.0, 0
    for b in range(B):
        c = counts[b]
        for layer in range(L):
            for q in range(Q):
                if not mask[b, q]:
                    continue
                n += 1
                sv, tv = s[b, layer, q, :c], t[b, layer, q, :c]
                mse_ref += float(((sv - tv) ** 2).mean())
                ps, pt = sv / sv.sum(), tv / tv.sum()
                kl_ref += float((pt * (pt.log() - ps.log())).sum())
    assert float(attention_kd(s, t, mask, "mse", key_mask=keys)) == pytest.approx(mse_ref / n, rel=1e-6)
    assert float(attention_kd(s, t, mask, "kl", key_mask=keys)) == pytest.approx(kl_ref / n, rel=1e-6)
    s.requires_grad_(True)
    for kind in ("mse", "kl"):
        assert torch.autograd.gradcheck(lambda x: attention_kd(x * keys[:, None, None], t, mask, kind, key_mask=keys), (s,))


def test_text_focus_and_focus_align():
    g = torch.Generator().manual_seed(SEED)
    att = torch.rand(2, 1, 4, 9, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    w = text_focus(att, mask)
    ref0 = att[0, 0, :2].sum(0) / att[0, 0, :2].sum()
    assert torch.allclose(w[0], ref0) and torch.allclose(w.sum(-1), torch.ones(2, dtype=torch.float64))
    s = torch.randn(2, 9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    ref = sum(float(w[b, j] * ((s[b, j] - t[b, j]) ** 2).mean()) for b in range(2) for j in range(9)) / 2
    assert float(focus_align(s, t, w)) == pytest.approx(ref, rel=1e-6)
    assert torch.autograd.gradcheck(lambda x: focus_align(x, t, w), (s,))


def test_align_kd_authors_losses_against_reference():
    """Align-KD as its authors compute it: the unnormalised per-entry attention KL (`kl_raw`) over each
    row's real queries and keys, and the plain visual MSE plus 0.1 x the MSE over the most-attended
    tokens (`top_focus_align`), rows of different visual-token counts included; gradients by gradcheck."""
    g = torch.Generator().manual_seed(SEED)
    B, L, Q, N, D, K = 3, 2, 4, 7, 5, 3
    counts = [7, 2, 5]
    keys = torch.arange(N)[None, :] < torch.tensor(counts)[:, None]
    s = torch.softmax(torch.randn(B, L, Q, N, generator=g, dtype=torch.float64), -1) * keys[:, None, None]
    t = torch.softmax(torch.randn(B, L, Q, N, generator=g, dtype=torch.float64), -1) * keys[:, None, None]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    eps, tot, n = 1e-8, 0.0, 0
    for b in range(B):
        for layer in range(L):
            for q in range(Q):
                for j in range(counts[b]):
                    if mask[b, q]:
                        tv, sv = float(t[b, layer, q, j]) + eps, float(s[b, layer, q, j]) + eps
                        tot += tv * math.log(tv / sv)
                        n += 1
    assert float(attention_kd(s, t, mask, "kl_raw", key_mask=keys)) == pytest.approx(tot / n, rel=1e-6)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: attention_kd(x * keys[:, None, None], t, mask, "kl_raw", key_mask=keys), (s,))
    sv = torch.randn(B, N, D, generator=g, dtype=torch.float64, requires_grad=True)
    tv = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    focus = torch.rand(B, N, generator=g, dtype=torch.float64) * keys
    plain, m_all = 0.0, 0
    top, m_top = 0.0, 0
    for b in range(B):
        per = [float(((sv[b, j] - tv[b, j]) ** 2).mean()) for j in range(counts[b])]
        plain += sum(per)
        m_all += counts[b]
        best = sorted(range(counts[b]), key=lambda j: -float(focus[b, j]))[:K]
        top += sum(per[j] for j in best)
        m_top += len(best)
    want = plain / m_all + 0.1 * top / m_top
    assert float(top_focus_align(sv, tv, focus, K, 0.1, keys)) == pytest.approx(want, rel=1e-6)
    assert torch.autograd.gradcheck(lambda x: top_focus_align(x, tv, focus, K, 0.1, keys), (sv,))


def test_feature_kd_against_reference():
    g = torch.Generator().manual_seed(SEED)
    s = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 0, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    idx = [(b, i) for b in range(2) for i in range(5) if mask[b, i]]
    mse = sum(float(((s[b, i] - t[b, i]) ** 2).mean()) for b, i in idx) / len(idx)
    cos = sum(1 - float((s[b, i] @ t[b, i]) / (s[b, i].norm() * t[b, i].norm())) for b, i in idx) / len(idx)
    assert float(feature_kd(s, t, mask, "mse")) == pytest.approx(mse, rel=1e-6)
    assert float(feature_kd(s, t, mask, "cosine")) == pytest.approx(cos, rel=1e-6)
    for kind in ("mse", "cosine"):
        assert torch.autograd.gradcheck(lambda x: feature_kd(x, t, mask, kind), (s,))


def test_temperature_schedule():
    assert linear_temperature(0, 11) == 5.0 and linear_temperature(10, 11) == 1.0
    assert linear_temperature(5, 11) == pytest.approx(3.0)


def test_logit_kd_gradient_finite_without_tail_bucket():
    """Regression: with k = V (or a teacher tail of -inf) the student's tail bucket is dropped; its
    log(0) used to leak a nan into the gradient through the mask."""
    g = torch.Generator().manual_seed(SEED)
    z = torch.randn(1, 4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.log_softmax(torch.randn(1, 4, 11, generator=g, dtype=torch.float64), -1)
    mask = torch.ones(1, 4, dtype=torch.bool)
    for ids, lps, tail in [(t.topk(11, -1)[1], t.topk(11, -1)[0], None),
                           (t.topk(3, -1)[1], torch.log_softmax(t.topk(3, -1)[0], -1), torch.full((1, 4), float("-inf")))]:
        for loss in LOSSES:
            (grad,) = torch.autograd.grad(logit_kd(z, ids, lps, mask, loss=loss, teacher_tail=tail), z)
            assert torch.isfinite(grad).all(), loss


@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_matches_reference_and_gradcheck(symmetric):
    from reference import info_nce_ref

    from vlmkd.losses import info_nce, pooled

    g = torch.Generator().manual_seed(SEED + 41)
    for B, D in [(5, 3), (2, 7), (9, 4)]:
        s = torch.randn(B, D, generator=g, dtype=torch.float64)
        t = torch.randn(B, D, generator=g, dtype=torch.float64) * 3
        for tau in (0.07, 0.5):
            got = info_nce(s, t, tau, symmetric)
            assert float(got) == pytest.approx(info_nce_ref(s, t, tau, symmetric), rel=1e-10)
        s.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: info_nce(x, t, 0.3, symmetric), (s,))
    assert float(info_nce(s[:1], t[:1])) == 0.0  # one sample: nothing to contrast
    h = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    assert torch.allclose(pooled(h, m)[0], h[0, :2].mean(0)) and torch.allclose(pooled(h, m)[2], h[2, 1])
