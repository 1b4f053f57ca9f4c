"""Straightforward float64 references for the losses, written independently of vlmkd/losses: explicit
loops, explicit sums over the vocabulary, the textbook formulas. Slow on purpose; small shapes only."""

from __future__ import annotations

import math

import torch


def _div(P, Q, loss, beta, alpha):
    """Divergence of two explicit probability lists."""
    def kl(a, b):
        return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b, strict=True) if x > 0)

    if loss == "fkl":
        return kl(P, Q)
    if loss == "rkl":
        return kl(Q, P)
    if loss == "jsd":
        M = [beta * p + (1 - beta) * q for p, q in zip(P, Q, strict=True)]
        return beta * kl(P, M) + (1 - beta) * kl(Q, M)
    if loss == "skl":
        return kl(P, [alpha * p + (1 - alpha) * q for p, q in zip(P, Q, strict=True)])
    if loss == "srkl":
        return kl(Q, [(1 - alpha) * p + alpha * q for p, q in zip(P, Q, strict=True)])
    if loss == "tvd":
        return 0.5 * sum(abs(p - q) for p, q in zip(P, Q, strict=True))
    raise ValueError(loss)


def sparse_kd_ref(z, ids, lps, mask, loss, tau=1.0, beta=0.5, alpha=0.1, tail=None, reduction="token"):
    """Buckets built by hand: the k teacher ids plus everything else, for teacher and student alike."""
    B, T, V = z.shape
    per = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            row = [float(v) / tau for v in z[b, t]]
            mx = max(row)
            ex = [math.exp(v - mx) for v in row]
            s = sum(ex)
            q = [e / s for e in ex]
            # a -inf teacher log-prob marks a padding slot: not an id of the row
            keep = [j for j in range(ids.shape[-1]) if math.isfinite(float(lps[b, t, j]))]
            chosen = [int(ids[b, t, j]) for j in keep]
            Q = [q[i] for i in chosen]
            rest = sum(q[j] for j in range(V) if j not in set(chosen))
            P = [math.exp(float(lps[b, t, j])) for j in keep]
            p_rest = math.exp(float(tail[b, t])) if tail is not None else 1 - sum(P)
            has_tail = len(set(chosen)) < V
            if has_tail:
                P, Q = P + [max(p_rest, 0.0)], Q + [rest]
            if tau != 1.0:
                w = [p ** (1 / tau) for p in P]
                P = [x / sum(w) for x in w]
            per[b, t] = tau**2 * _div(P, Q, loss, beta, alpha)
    m = mask.double()
    if reduction == "token":
        return float(per.sum() / m.sum())
    if reduction == "sequence":
        vals = [float(per[b].sum() / m[b].sum()) for b in range(B) if m[b].sum() > 0]
        return sum(vals) / len(vals)
    return float(per.sum() / B)


def full_vocab_ref(z, teacher_logits, mask, loss, beta=0.5, alpha=0.1):
    """The divergence over the whole vocabulary, from two full logit tensors."""
    P = torch.softmax(teacher_logits.double(), -1)
    Q = torch.softmax(z.double(), -1)
    vals = []
    for b in range(z.shape[0]):
        for t in range(z.shape[1]):
            if mask[b, t]:
                vals.append(_div(P[b, t].tolist(), Q[b, t].tolist(), loss, beta, alpha))
    return sum(vals) / len(vals)


def relation_ref(fs, ft, mask=None, gs=None, gt=None):
    out = []
    for b in range(fs.shape[0]):
        idx = [i for i in range(fs.shape[1]) if mask is None or mask[b, i]]
        a, c = fs[b, idx].double(), ft[b, idx].double()
        ra = a @ (gs.double() if gs is not None else torch.eye(a.shape[1], dtype=torch.float64)) @ a.T
        rc = c @ (gt.double() if gt is not None else torch.eye(c.shape[1], dtype=torch.float64)) @ c.T
        x, y = ra.flatten(), rc.flatten()
        out.append(1 - float((x * y).sum()) / math.sqrt(float((x * x).sum()) * float((y * y).sum())))
    return sum(out) / len(out)


def preference_ref(sc, sr, tc, tr, beta):
    vals = []
    for a, b, c, d in zip(sc.tolist(), sr.tolist(), tc.tolist(), tr.tolist(), strict=True):
        m = beta * ((a - c) - (b - d))
        vals.append(math.log(1 + math.exp(-m)))
    return sum(vals) / len(vals)


def encode_topk_layout1(pos, ids, logprobs, tail, vocab_size):
    """The top-k writer of cache layout 1 (caches built before 2026-11-26), kept to test that those
    caches still read: float32 lp_max and tail, plain deltas, uint8 sqrt-of-nats codes."""
    import numpy as np
    import zstandard

    R, k = ids.shape
    lp = logprobs.astype(np.float64)
    lp_max = lp.max(-1) if R else np.zeros(0)
    code = np.rint(255.0 * np.sqrt(np.clip(lp_max[:, None] - lp, 0.0, 32.0) / 32.0)).astype(np.uint8)
    order = np.argsort(ids, axis=-1, kind="stable")
    sids = np.take_along_axis(ids.astype(np.int64), order, -1)
    dt = np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")
    head = np.array([R], "<u4").tobytes() + np.array([k], "<u2").tobytes() + bytes([dt.itemsize, 1])
    body = [pos.astype("<i4"), lp_max.astype("<f4"), tail.astype("<f4"),
            np.diff(sids, axis=-1, prepend=0).astype(dt), np.take_along_axis(code, order, -1)]
    return zstandard.ZstdCompressor().compress(head + b"".join(np.ascontiguousarray(a).tobytes() for a in body))


def info_nce_ref(s, t, tau, symmetric=True):
    """InfoNCE by hand: cosine similarity of every pair, a softmax per row (and per column)."""
    B = s.shape[0]

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    S = [[cos(s[i].tolist(), t[j].tolist()) / tau for j in range(B)] for i in range(B)]

    def ce(rows):
        return sum(-rows[i][i] + math.log(sum(math.exp(v) for v in rows[i])) for i in range(B)) / B

    fwd = ce(S)
    if not symmetric:
        return fwd
    return 0.5 * (fwd + ce([[S[j][i] for j in range(B)] for i in range(B)]))


def backend_parity(got_a: list, got_b: list, tie: float = 1e-4) -> dict:
    """Two backends' `topk_arrays` over the same samples: the scored positions must be equal (asserted);
    returns the rows, the rows whose top-k sets differ (each difference must be a near-tie at the k-th
    place, within `tie`, asserted), the worst |d log p| on shared ids and the worst tail-mass difference."""
    import numpy as np

    rows = other = 0
    worst_lp = worst_tail = 0.0
    for (pa, ia, la, ta), (pb, ib, lb, tb) in zip(got_a, got_b, strict=True):
        assert np.array_equal(pa, pb)
        for r in range(len(pa)):
            rows += 1
            da = dict(zip(ia[r].tolist(), la[r].tolist(), strict=True))
            db = dict(zip(ib[r].tolist(), lb[r].tolist(), strict=True))
            if set(da) != set(db):
                other += 1
                kth = min(la[r].min(), lb[r].min())
                assert all(abs(da.get(i, db.get(i)) - kth) < tie for i in set(da) ^ set(db))
            worst_lp = max(worst_lp, max(abs(da[i] - db[i]) for i in set(da) & set(db)))
            worst_tail = max(worst_tail, abs(np.exp(ta[r]) - np.exp(tb[r])))
    return {"rows": rows, "other_sets": other, "worst_dlogp": worst_lp, "worst_tail": worst_tail}
