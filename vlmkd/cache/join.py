"""Several teachers' caches over the same data, joined by sample id: each sample of the first cache gets
the other teachers' top-k rows at its positions, mixed into one target (`vlmkd.losses.mixture`).

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
from vlmkd.losses.mixture import MIX_MODES, mix_topk


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
