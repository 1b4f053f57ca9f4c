"""Several teachers: caches of different teachers over the same data, joined by sample id, their sparse
distributions combined into one target per position.

- "average": the weighted mixture sum_t w_t p_t over the union of the teachers' ids. An id outside
  teacher t's top-k gets nothing from t there: t's mass on it is inside t's tail, so the mixture's
  tail bucket is sum_t w_t tail_t and the mixture sums to one exactly (no mass invented or lost).
  Rows of a batch then hold different numbers of ids; the shorter ones are padded with log-prob -inf,
  which the losses read as "no slot" (`vlmkd.losses.logit.bucket_logprobs_from_lse`).
- "confidence": per position, the distribution of the teacher whose top-1 probability is highest.

The first cache streams the samples (with its images, attention and hidden states); the others give
only their top-k member, held in memory as its compressed bytes (their size on disk) and decoded
when the sample comes by.
"""

from __future__ import annotations

import numpy as np

from vlmkd.cache.reader import CacheReader, decode_sample, iter_members
from vlmkd.data.manifest import Reject
from vlmkd.data.rejects import RejectLog
from vlmkd.errors import CacheError, RecipeError

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


def _by_id(reader: CacheReader, payloads: tuple[str, ...] = ()) -> dict[str, tuple[str, dict, str]]:
    """sample id -> (key, {member: raw bytes} for `payloads` and meta, shard name), over every shard."""
    out = {}
    for shard in reader.shards:
        for key, members in iter_members(reader.read_shard(shard), shard["name"]):
            sid = decode_sample(key, {"meta": members["meta"]}, (), shard["name"])["id"]
            # a missing member is named by decode_sample when the sample comes by
            out[sid] = (key, {p: members[p] for p in ("meta", *payloads) if p in members}, shard["name"])
    return out


class TeacherMix:
    """Replaces each streamed sample's top-k target by the combination of every cache's target."""

    def __init__(self, primary: CacheReader, others: list[CacheReader], weights: list[float] | None = None,
                 mode: str = "average", allow_partial: bool = False, rejects: RejectLog | None = None):
        if mode not in MIX_MODES:
            raise RecipeError(f"--teacher-mix {mode!r}: choose one of {MIX_MODES}")
        n = 1 + len(others)
        weights = list(weights) if weights else [1.0 / n] * n
        if len(weights) != n or min(weights) < 0 or sum(weights) <= 0:
            raise RecipeError(f"--teacher-weights: {n} non-negative weights for {n} caches, not {weights}")
        self.weights, self.mode = weights, mode
        for r in (primary, *others):
            if r.manifest["extraction"].get("logits", "topk") != "topk":
                raise RecipeError(f"cache {r.root}: several teachers combine top-k caches; this one is "
                                  f"{r.manifest['extraction']['logits']!r}")
            if r is not primary:
                if r.manifest["tokenizer_sha256"] != primary.manifest["tokenizer_sha256"]:
                    raise CacheError(f"cache {r.root} was built with another tokenizer than {primary.root}: "
                                     "their token ids do not mean the same; several teachers need one tokenizer")
        mine = set(_by_id(primary))
        self.index: list[dict[str, tuple]] = []
        self.keep = set(mine)
        for r in others:
            idx = _by_id(r, ("tokens", "topk"))
            missing, extra = sorted(mine - idx.keys()), sorted(idx.keys() - mine)
            if (missing or extra) and not allow_partial:
                raise CacheError(f"caches {primary.root} and {r.root} hold different samples: "
                                 f"{len(missing)} only in the first (e.g. {missing[:5]}), {len(extra)} only in the "
                                 f"second (e.g. {extra[:5]}); pass --allow-partial to train on the shared ones")
            self.keep &= idx.keys()
            self.index.append(idx)
        self.roots = [primary.root] + [r.root for r in others]
        if rejects is not None:  # recorded once here, not once per epoch
            for sid in sorted(mine - self.keep):
                rejects.add(Reject(sid, "teachers", "not in every teacher cache; skipped (--allow-partial)"))

    def apply(self, s: dict) -> dict | None:
        """The sample with the combined target, or None (recorded) when a cache lacks it (--allow-partial)."""
        if s["id"] not in self.keep:
            return None
        rows = [(s["ids"], s["logprobs"], s["tail"])]
        for root, idx in zip(self.roots[1:], self.index, strict=True):
            key, members, shard = idx[s["id"]]
            o = decode_sample(key, members, ("tokens", "topk"), shard)
            if not np.array_equal(o["input_ids"], s["input_ids"]) or not np.array_equal(o["pos"], s["pos"]):
                raise CacheError(f"sample {s['id']}: cache {root} holds other tokens or scored positions than "
                                 f"{self.roots[0]} (another prompt template or --score-visual setting); "
                                 "the teachers' rows cannot be matched")
            rows.append((o["ids"], o["logprobs"], o["tail"]))
        ids, lps, tail = mix_topk(rows, self.weights, self.mode)
        return {**s, "ids": ids, "logprobs": lps.astype(np.float32), "tail": tail.astype(np.float32)}
