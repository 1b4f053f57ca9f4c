"""Several teachers' sparse distributions combined into one target per position (the maths of
several-teacher distillation; the cache join that feeds it is `vlmkd.cache.join`).

- "average": the weighted mixture sum_t w_t p_t over the union of the teachers' ids. An id outside
  teacher t's top-k gets nothing from t there: t's mass on it is inside t's tail, so the mixture's
  tail bucket is sum_t w_t tail_t and the mixture sums to one exactly (no mass invented or lost).
  Rows of a batch then hold different numbers of ids; the shorter ones are padded with log-prob -inf,
  which the losses read as "no slot" (`vlmkd.losses.logit.bucket_logprobs_from_lse`).
- "confidence": per position, the distribution of the teacher whose top-1 probability is highest.
"""

from __future__ import annotations

import numpy as np

from vlmkd.errors import RecipeError

MIX_MODES = ("average", "confidence")


def mix_topk(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], weights: list[float],
             mode: str = "average") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine per-teacher sparse rows (ids [P, k_t], logprobs [P, k_t], log tail [P]) into
    (ids [P, K], logprobs [P, K] with -inf padding, log tail [P]); computed in float64."""
    if mode not in MIX_MODES:
        raise RecipeError(f"teacher mix {mode!r}: choose one of {MIX_MODES}")
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    P = rows[0][0].shape[0]
    lps = [np.asarray(r[1], dtype=np.float64) for r in rows]
    tails = [np.asarray(r[2], dtype=np.float64) for r in rows]
    if mode == "confidence":
        best = np.argmax(np.stack([lp.max(-1) for lp in lps]), 0)  # [P]: the most confident teacher
        K = max(r[0].shape[1] for r in rows)
        ids = np.zeros((P, K), dtype=np.int64)
        out = np.full((P, K), -np.inf)
        tail = np.empty(P)
        for t, r in enumerate(rows):
            sel = best == t
            k = r[0].shape[1]
            ids[sel, :k] = r[0][sel]
            out[sel, :k] = lps[t][sel]
            tail[sel] = tails[t][sel]
        return ids, out, tail
    cat_ids = np.concatenate([np.asarray(r[0], dtype=np.int64) for r in rows], 1)  # [P, S]
    cat_p = np.concatenate([wt * np.exp(lp) for wt, lp in zip(w, lps, strict=True)], 1)
    order = np.argsort(cat_ids, axis=1, kind="stable")
    sid = np.take_along_axis(cat_ids, order, 1)
    sp = np.take_along_axis(cat_p, order, 1)
    new = np.ones(sid.shape, dtype=bool)
    new[:, 1:] = sid[:, 1:] != sid[:, :-1]
    group = np.cumsum(new, 1) - 1  # slot of each entry within its row's union
    count = group[:, -1] + 1
    K = int(count.max())
    r_idx = np.broadcast_to(np.arange(P)[:, None], sid.shape)
    probs = np.zeros((P, K))
    np.add.at(probs, (r_idx, group), sp)
    ids = np.zeros((P, K), dtype=np.int64)
    ids[r_idx, group] = sid
    with np.errstate(divide="ignore"):
        out = np.where(np.arange(K)[None] < count[:, None], np.log(probs), -np.inf)
        tail = np.log(sum(wt * np.exp(t) for wt, t in zip(w, tails, strict=True)))
    return ids, out, tail
