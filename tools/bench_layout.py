"""Shard layouts side by side: bytes on disk per scored token and decode rate, tar against Parquet.

Two workloads, each in both layouts from the same member bytes:
- a real cache (`--cache`, e.g. the demo's), converted to Parquet by `vlmkd cache convert` into a
  temporary folder (`--max-shards`: its first N shards only);
- synthetic long samples (`--long N`): N samples of T = 1,100 tokens with R = 1,024 scored rows each
  (a long answer), top-64 rows at V = 151,936 with tools/bench_cache.py's Zipf-shaped profile (rank r:
  -a log r + 0.5 z) and ids drawn in the order of a sequential draw from unigram weights 1 / (id + 1)
  (log-uniform ids, the first 64 distinct), a tokens and a top-k member per sample (the members a
  logits-only cache holds).
Bytes: the shard files as written (framing included) per scored token, and the members alone.
Decode: `CacheReader.samples()` over every shard from disk with checksums on, decoding `tokens` and
the logit member (and, for the real cache, every payload it holds: `--all-payloads`), in alternating
rounds (tar, parquet, tar, ...); mean ± sample SD over `--rounds`, and the ratio of the means.

    python tools/bench_layout.py --cache demo/cache --max-shards 2 --long 256 --json layout.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from vlmkd.cache import format as fmt
from vlmkd.cache.manifest import MANIFEST, new_manifest, read_manifest, write_manifest
from vlmkd.cache.reader import CacheReader
from vlmkd.cache.store import Store
from vlmkd.cache.writer import convert_layout, write_shard

ENTROPY_SCALE = 2.0  # tools/bench_cache.py's profile


def long_rows(R: int, k: int, V: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [R, k], log-probs [R, k], log tail [R]) of a Zipf-shaped teacher, without [R, V] arrays."""
    a = ENTROPY_SCALE * rng.uniform(0.6, 1.4, size=(R, 1))
    r = np.arange(1, 4097, dtype=np.float64)  # ranks past 4,096 hold < 1e-6 of the mass at a >= 1.2
    logits = -a * np.log(r)[None] + 0.5 * rng.standard_normal((R, len(r)))
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    top = np.sort(logp, axis=-1)[:, ::-1][:, :k]
    tail = np.log(-np.expm1(np.logaddexp.reduce(top, axis=-1)))
    ids = np.empty((R, k), np.int64)
    for i in range(R):
        draw = np.floor(np.exp(rng.uniform(0, np.log(V + 1), 8 * k))).astype(np.int64) - 1
        _, first = np.unique(draw, return_index=True)
        got = draw[np.sort(first)][:k]
        while len(got) < k:  # (rare) too few distinct draws: fill with unused ids
            got = np.concatenate([got, np.setdiff1d(rng.integers(0, V, k), got)])[:k]
        ids[i] = got
    return ids, top, tail


def subset(cache: Path, n: int, dest: Path) -> Path:
    """The first `n` shards of a cache as a cache of their own (files linked, manifest rewritten)."""
    m = read_manifest(cache)
    dest.mkdir(parents=True)
    m["shards"] = m["shards"][:n]
    for s in m["shards"]:
        (dest / s["name"]).symlink_to(Path(cache).resolve() / s["name"])
    write_manifest(dest / MANIFEST, m)
    return dest


def long_cache(root: Path, n: int, layout: str, seed: int = 0, T: int = 1100, R: int = 1024, k: int = 64,
               V: int = 151_936, per_shard: int = 64) -> Path:
    """A logits-only cache of n synthetic long samples in `layout` (same member bytes for both layouts)."""
    store = Store(root / layout)
    store.makedirs()
    fp = {"format_version": fmt.FORMAT_VERSION, "teacher": {"vocab_size": V}, "tokenizer_sha256": "synthetic",
          "chat_template": None, "extraction": {"topk": k, "logits": "topk", "shard_layout": layout},
          "data_sha256": "synthetic"}
    m = new_manifest(fp, "synthetic", n, {"num_shards": 1, "shard_index": 0, "start": 0, "end": n})
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        ids, lp, tail = long_rows(R, k, V, rng)
        pos = np.arange(T - R - 1, T - 1)
        resp = np.zeros(T, bool)
        resp[T - R:] = True
        members = {"meta": fmt.encode_meta({"id": f"long{i}", "tokens": T, "scored": R, "visual_tokens": 0,
                                            "response_tokens": R}),
                   "tokens": fmt.encode_tokens(rng.integers(0, V, T), resp, np.zeros(T, bool)),
                   "topk": fmt.encode_topk(pos, ids, lp, tail, V)}
        samples.append((fmt.sample_key(i), members))
    for s0 in range(0, n, per_shard):
        chunk = samples[s0 : s0 + per_shard]
        name = f"shard-{s0 // per_shard:06d}" + (".tar" if layout == "tar" else ".parquet")
        nbytes, digest, per = write_shard(store, name, chunk, layout)
        m["shards"].append({"name": name, "start": s0, "end": s0 + len(chunk), "samples": len(chunk),
                            "tokens": T * len(chunk), "scored_tokens": R * len(chunk), "visual_tokens": 0,
                            "bytes": nbytes, "sha256": digest, "payload_bytes": per, "rejects": [],
                            "ids": [f"long{i}" for i in range(s0, s0 + len(chunk))], "seconds": 0.0})
    m["state"] = "complete"
    write_manifest((store, MANIFEST), m)
    return root / layout


def sizes(cache: Path) -> dict:
    m = read_manifest(cache)
    scored = sum(s["scored_tokens"] for s in m["shards"])
    files = sum(s["bytes"] for s in m["shards"])
    members = sum(sum(s["payload_bytes"].values()) for s in m["shards"])
    return {"samples": sum(s["samples"] for s in m["shards"]), "scored_tokens": scored,
            "file_bytes_per_scored_token": files / scored, "member_bytes_per_scored_token": members / scored,
            "framing_bytes_per_scored_token": (files - members) / scored}


def decode_seconds(cache: Path, payloads: tuple[str, ...]) -> float:
    t = time.perf_counter()
    n = sum(1 for _ in CacheReader(cache, payloads=payloads).samples())
    assert n == sizes(cache)["samples"]
    return time.perf_counter() - t


def side_by_side(name: str, caches: dict[str, Path], payloads: tuple[str, ...], rounds: int) -> dict:
    times = {lay: [] for lay in caches}
    for _ in range(rounds):
        for lay, c in caches.items():
            times[lay].append(decode_seconds(c, payloads))
    out = {"workload": name, "payloads": list(payloads), "rounds": rounds}
    for lay, c in caches.items():
        sz = sizes(c)
        rates = [sz["samples"] / t for t in times[lay]]
        out[lay] = {**sz, "decode_samples_per_s_mean": statistics.mean(rates),
                    "decode_samples_per_s_sd": statistics.stdev(rates) if len(rates) > 1 else 0.0,
                    "decode_scored_tokens_per_s_mean": statistics.mean(sz["scored_tokens"] / t for t in times[lay])}
    out["parquet_over_tar_bytes"] = out["parquet"]["file_bytes_per_scored_token"] / out["tar"]["file_bytes_per_scored_token"]
    out["parquet_over_tar_decode_rate"] = out["parquet"]["decode_samples_per_s_mean"] / out["tar"]["decode_samples_per_s_mean"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, help="a real tar cache (converted to Parquet in a temporary folder)")
    ap.add_argument("--max-shards", type=int, default=None)
    ap.add_argument("--all-payloads", action="store_true", help="real cache: decode every payload it holds")
    ap.add_argument("--long", type=int, default=0, help="synthetic long samples (0: none)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if args.cache:
            src = subset(args.cache, args.max_shards, d / "tar") if args.max_shards else args.cache
            convert_layout(src, d / "parquet", "parquet")
            m = read_manifest(src)
            logit = "sampled" if m["extraction"].get("logits") == "sampled" else "topk"
            held = sorted({p for s in m["shards"] for p in s["payload_bytes"]} - {"meta"})
            payloads = tuple(held) if args.all_payloads else ("tokens", logit)
            results.append(side_by_side(f"cache {args.cache}", {"tar": src, "parquet": d / "parquet"}, payloads,
                                        args.rounds))
        if args.long:
            caches = {lay: long_cache(d / "long", args.long, lay) for lay in ("tar", "parquet")}
            results.append(side_by_side(f"{args.long} synthetic long samples (T 1,100, R 1,024, top-64, V 151,936)",
                                        caches, ("tokens", "topk"), args.rounds))
    print(f"{'workload':<58} {'layout':<8} {'B/scored tok':>12} {'framing':>8} {'samples/s':>18} {'ratio':>6}")
    for r in results:
        for lay in ("tar", "parquet"):
            x = r[lay]
            ratio = f"{r['parquet_over_tar_decode_rate']:.2f}" if lay == "parquet" else ""
            print(f"{r['workload'][:58]:<58} {lay:<8} {x['file_bytes_per_scored_token']:>12.1f} "
                  f"{x['framing_bytes_per_scored_token']:>8.1f} "
                  f"{x['decode_samples_per_s_mean']:>10.0f} ± {x['decode_samples_per_s_sd']:<5.0f} {ratio:>6}")
    print("± is the sample SD over rounds; ratio: Parquet's decode rate over tar's (means)")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "results": results},
                                        indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
