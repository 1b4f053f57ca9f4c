"""What a person looks at in a cache, as plain data (JSON-able): one sample (`sample_view`) and the
whole cache (`cache_report`). `vlmkd.cache.pages` draws them as HTML and PNG; notebooks take the JSON.

Every number comes from the cache's own payloads, decoded by the reader: probabilities are exp of the
stored log-probs, the tail is the stored tail mass, attention is the stored maps. Entropy over a
top-k row is that of the k kept ids plus the tail as one bucket (a lower bound on the teacher's
entropy over the whole vocabulary; exact when the tail is 0).
"""

from __future__ import annotations

import base64
import io
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from vlmkd.cache.inspect import summarize
from vlmkd.cache.reader import CacheReader, decode_sample, iter_members
from vlmkd.errors import CacheError

TOP_SHOWN = 64  # ids per scored row on the page (all of a top-64 cache)


def _tokenizer(cache: Path, manifest: dict):
    from transformers import AutoTokenizer

    from vlmkd.train.student import teacher_files

    return AutoTokenizer.from_pretrained(str(teacher_files(cache, manifest)))


def _payloads(manifest: dict) -> tuple[str, ...]:
    ext = manifest["extraction"]
    out = ["tokens", "image", "sampled" if ext.get("logits") == "sampled" else "topk"]
    if ext.get("attn_layers"):
        out.append("attn")
    return tuple(out)


def find_sample(reader: CacheReader, sample_id: str, payloads: tuple[str, ...]) -> dict:
    """One sample's `payloads`, read from the one shard that holds it (by the manifest's id lists)."""
    for shard in reader.shards:
        if sample_id in shard["ids"]:
            for key, members in iter_members(reader.read_shard(shard), shard["name"]):
                s = decode_sample(key, members, payloads, shard["name"], reader.manifest)
                if s["id"] == sample_id:
                    return s
    some = [i for sh in reader.shards[:1] for i in sh["ids"][:3]]
    raise CacheError(f"{reader.root}: no sample {sample_id!r} (ids look like {some}; rejected rows are in "
                     "rejects.jsonl, not in the shards)")


def row_stats(lp: np.ndarray, tail: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(entropy of the kept ids + the tail bucket, top-1 probability) per row of log-probs [R, k]."""
    lp = np.asarray(lp, dtype=np.float64)
    p = np.exp(np.where(np.isfinite(lp), lp, -np.inf))
    t = np.exp(np.asarray(tail, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=-1) - np.where(t > 0, t * np.log(t), 0.0)
    return h, p.max(axis=-1)


def _image(blob: bytes | None) -> dict | None:
    if blob is None:
        return None
    from PIL import Image

    from vlmkd.data.images import to_rgb

    img = to_rgb(Image.open(io.BytesIO(blob)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # what the student sees (EXIF applied), whatever the stored format
    return {"data_uri": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
            "width": img.width, "height": img.height, "stored_bytes": len(blob)}


def sample_view(cache: str | Path, sample_id: str, tokenizer=None) -> dict:
    """Everything the per-sample page shows, from the cache alone."""
    reader = CacheReader(cache, payloads=())
    man = reader.manifest
    s = find_sample(reader, sample_id, _payloads(man))
    tok = tokenizer or _tokenizer(Path(cache), man)
    text = lambda i: tok.decode([int(i)])  # noqa: E731
    ids = s["input_ids"]
    tokens = [{"t": t, "text": text(i), "response": bool(s["response"][t]), "visual": bool(s["visual"][t])}
              for t, i in enumerate(ids.tolist())]
    view: dict = {"cache": str(cache), "id": s["id"], "prompt": s["prompt"], "fields": s.get("fields"),
                  "teacher": man["teacher"]["model_type"], "grid": man["teacher"].get("patch_grid"),
                  "extraction": {k: man["extraction"].get(k) for k in ("logits", "topk", "draws", "score_visual",
                                                                         "attn_layers", "attn_heads")},
                  "image": _image((s.get("image") or [None])[0]), "tokens": tokens}
    scored = []
    if "weights" in s:  # a sampled cache: the drawn ids and their unbiased weights (counts / draws at t = 1)
        for r, p in enumerate(s["pos"].tolist()):
            w = s["weights"][r]
            draws = [[text(i), int(i), float(x)] for i, x in zip(s["ids"][r].tolist(), w.tolist(), strict=True) if x > 0]
            scored.append({"pos": p, "next": text(ids[p + 1]) if p + 1 < len(ids) else None,
                           "visual": bool(s["visual"][p]), "draws": sorted(draws, key=lambda d: -d[2])})
    else:
        h, top1 = row_stats(s["logprobs"], s["tail"])
        for r, p in enumerate(s["pos"].tolist()):
            order = np.argsort(-s["logprobs"][r], kind="stable")[:TOP_SHOWN]
            top = [[text(s["ids"][r][j]), int(s["ids"][r][j]), float(np.exp(np.float64(s["logprobs"][r][j])))]
                   for j in order]
            scored.append({"pos": p, "next": text(ids[p + 1]) if p + 1 < len(ids) else None,
                           "visual": bool(s["visual"][p]), "top": top, "tail": float(np.exp(np.float64(s["tail"][r]))),
                           "entropy": float(h[r]), "top1": float(top1[r])})
    view["scored"] = scored
    if "attn" in s:
        maps = s["attn"].astype(np.float64).mean(1)  # [L, Q, N]: heads averaged (one "head" in a mean cache)
        view["attention"] = {"layers": list(man["extraction"]["attn_layers"]), "qpos": s["qpos"].tolist(),
                             "maps": maps.tolist()}
    vis = [row for row in scored if row["visual"] and "top" in row]
    if vis:
        view["visual_rows"] = [{"pos": r["pos"], "entropy": r["entropy"], "top1": r["top1"], "top1_text": r["top"][0][0]}
                               for r in vis]
    return view


_NUMBERS = re.compile(r"\b\d+(\.\d+)?\b")
_PATHS = re.compile(r"(/[^\s:'\"]+)+")
_QUOTED = re.compile(r"'[^']*'")


def reason_kind(reason: str) -> str:
    """A reject reason without its specifics (file, row, sample id, paths, numbers): what to group by."""
    r = re.sub(r"^.*?\(sample [^)]*\):\s*", "", reason)
    r = re.sub(r"^sample \S+:\s*", "", r)
    r = re.sub(r"^\S+(:\d+|\[\d+\]):\s*", "", r)
    return _NUMBERS.sub("N", _QUOTED.sub("'…'", _PATHS.sub("PATH", r)))


def _histogram(values: np.ndarray, lo: float, hi: float, bins: int = 40) -> dict:
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return {"edges": edges.tolist(), "counts": counts.tolist(), "n": int(len(values)),
            "mean": float(values.mean()) if len(values) else None}


def cache_report(cache: str | Path, max_samples: int | None = None) -> dict:
    """What the cache holds and costs: counts, rejects by reason (with examples), bytes per payload and
    per scored token, the teacher's entropy / tail / top-1 histograms over its scored rows (response and
    visual apart), and each shard's build time."""
    head = CacheReader(cache, payloads=())
    man = head.manifest
    sampled = man["extraction"].get("logits") == "sampled"
    reader = CacheReader(cache, payloads=("tokens", "sampled" if sampled else "topk"))
    info = summarize(man)
    groups: dict[str, list[dict]] = defaultdict(list)
    for sh in man["shards"]:
        for r in sh["rejects"]:
            groups[reason_kind(r["reason"])].append(r)
    rejects = [{"reason": k, "count": len(v), "examples": v[:3]}
               for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
    out = {"cache": str(cache), "summary": info, "rejects": rejects,
           "shards": [{"name": s["name"], "samples": s["samples"], "bytes": s["bytes"],
                       "seconds": s.get("seconds", 0.0)} for s in man["shards"]]}
    stats: dict[str, list[np.ndarray]] = {k: [] for k in ("entropy", "tail", "top1", "v_entropy", "v_tail", "v_top1",
                                                          "ids", "v_ids")}
    kinds = Counter()
    n = 0
    for s in reader.samples():
        if max_samples is not None and n >= max_samples:
            break
        n += 1
        kinds["text-only" if not s["visual"].any() else "image"] += 1
        vis = s["visual"][s["pos"]].astype(bool)
        # ids kept per row: an adaptive-k row's finite slots, a sampled row's distinct draws
        width = (s["weights"] > 0).sum(-1) if sampled else np.isfinite(s["logprobs"]).sum(-1)
        for pre, m in (("", ~vis), ("v_", vis)):
            stats[pre + "ids"].append(width[m])
        if sampled:
            continue
        h, top1 = row_stats(s["logprobs"], s["tail"])
        tail = np.exp(s["tail"].astype(np.float64))
        for pre, m in (("", ~vis), ("v_", vis)):
            stats[pre + "entropy"].append(h[m])
            stats[pre + "tail"].append(tail[m])
            stats[pre + "top1"].append(top1[m])
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in stats.items()}
    k = int(man["extraction"].get("topk") or 0)
    out["ids_per_row"] = {
        name: {"rows": int(len(w)), "mean": float(w.mean()), "at_k": None if sampled else float((w >= k).mean())}
        for name, w in (("response", cat["ids"]), ("visual", cat["v_ids"])) if len(w)}
    out["samples_read"] = n
    out["sample_kinds"] = dict(kinds)
    if sampled:
        out["histograms"] = {}
        out["note"] = "a sampled cache keeps draws, not probabilities: no entropy histograms"
        return out
    hmax = float(max(1e-6, cat["entropy"].max(initial=0), cat["v_entropy"].max(initial=0)))
    out["histograms"] = {
        "response": {"entropy": _histogram(cat["entropy"], 0, hmax), "tail": _histogram(cat["tail"], 0, 1),
                     "top1": _histogram(cat["top1"], 0, 1)},
        "visual": {"entropy": _histogram(cat["v_entropy"], 0, hmax), "tail": _histogram(cat["v_tail"], 0, 1),
                   "top1": _histogram(cat["v_top1"], 0, 1)} if len(cat["v_entropy"]) else None}
    return out
