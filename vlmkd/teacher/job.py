"""`vlmkd cache-teacher`: run a teacher once over a data manifest and write the cache.

Exactly once: rows of the data manifest are processed in order in batches aligned to absolute row
numbers, shards close at deterministic points, and a re-run reads the manifest and resumes after the
last complete shard (the same inputs give the same bytes). `--num-shards N --shard-index i` takes the
i-th contiguous slice of the rows; `vlmkd cache merge` joins the parts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoConfig, AutoTokenizer

from vlmkd.cache import format as fmt
from vlmkd.cache.manifest import (
    MANIFEST,
    fingerprint,
    fingerprint_diff,
    new_manifest,
    part_name,
    read_manifest,
    sha256_file,
    tokenizer_fingerprint,
    totals,
    weights_fingerprint,
    write_manifest,
)
from vlmkd.cache.writer import remove_temporaries, write_shard
from vlmkd.data.dataset import encode_samples
from vlmkd.data.manifest import Reject, Sample
from vlmkd.data.manifest import read_manifest as read_rows
from vlmkd.errors import CacheError, DataError
from vlmkd.models.build import layout_of
from vlmkd.progress import bar, console
from vlmkd.teacher.hf_backend import Extraction


@dataclass
class CacheJob:
    teacher: Path
    data: Path
    out: Path
    settings: Extraction
    backend: str = "hf"
    num_parts: int = 1
    part_index: int = 0
    samples_per_shard: int = 2048
    max_shard_bytes: int = 512 * 2**20
    strict: bool = False
    overwrite: bool = False
    stop_after_shards: int | None = None  # testing: stop as if killed after this many new shards
    tensor_parallel_size: int = 1  # vLLM only
    data_parallel_size: int = 1  # vLLM only


def part_range(n_rows: int, num_parts: int, index: int) -> tuple[int, int]:
    if not 0 <= index < num_parts:
        raise CacheError(f"--shard-index {index} is outside 0..{num_parts - 1}")
    return n_rows * index // num_parts, n_rows * (index + 1) // num_parts


def choose_backend(name: str, teacher: Path) -> str:
    """`auto` takes vLLM when it imports and supports the model, and says which it took and why."""
    from vlmkd.teacher.vllm_backend import vllm_available

    if name not in ("auto", "vllm", "hf"):
        raise CacheError(f"unknown teacher backend {name!r}; choose auto, vllm or hf")
    if name == "hf":
        return "hf"
    ok, why = vllm_available(teacher)
    if name == "vllm" and not ok:
        raise CacheError(f"--backend vllm: {why}; install it with tools/install_vllm.sh or use --backend hf")
    chosen = "vllm" if ok else "hf"
    if name == "auto":
        console.print(f"teacher backend: {chosen} ({why})")
    return chosen


def check_settings(settings, backend: str, pairs_in: Path | None = None) -> None:
    """Refuse what a backend cannot extract, before any work; `pairs_in`: the data manifest, when it
    holds preference pairs."""
    if settings.logits not in ("topk", "sampled"):
        raise CacheError(f"--logits {settings.logits!r}: choose topk or sampled")
    if settings.logits == "sampled":
        if not 1 <= settings.draws <= 255:
            raise CacheError(f"--draws {settings.draws}: 1 to 255 draws per position")
        if settings.proposal_temperature <= 0:
            raise CacheError("--proposal-temperature must be positive")
        if backend == "vllm":
            # vLLM returns the top-k log-probs only; drawing from those would be a lossy copy of the top-k
            # cache itself, and full-vocabulary prompt log-probs come back as per-token Python dicts
            raise CacheError("--logits sampled draws from the teacher's full distribution, which the vLLM backend "
                             "does not return (only its top-k): use --backend hf (or --logits topk with vLLM)")
    if pairs_in is not None and backend == "vllm":
        raise CacheError(f"{pairs_in} holds preference pairs (`rejected` answers); the vLLM backend does not score "
                         "them: use --backend hf")


def make_backend(job: CacheJob, backend: str):
    if backend == "vllm":
        from vlmkd.teacher.vllm_backend import VLLMTeacher

        return VLLMTeacher(job.teacher, job.settings, job.tensor_parallel_size, job.data_parallel_size)
    from vlmkd.teacher.hf_backend import HFTeacher

    return HFTeacher(job.teacher, job.settings)


def run_cache_job(job: CacheJob, teacher=None) -> dict:
    """Run (or resume) one cache job; `teacher` reuses an already started backend."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)
    rows = list(read_rows(job.data))
    pairs = any(isinstance(r, Sample) and "rejected" in r.extra for r in rows)
    if (job.settings.logits == "sampled" or pairs) and job.backend == "auto" and teacher is None:
        backend = "hf"  # the only backend with the full distribution and pair scoring (check_settings says why)
    else:
        backend = teacher.name if teacher is not None else choose_backend(job.backend, Path(job.teacher))
    check_settings(job.settings, backend, Path(job.data) if pairs else None)
    start, end = part_range(len(rows), job.num_parts, job.part_index)
    # the fingerprint comes from the files, so a finished cache is recognised without starting a backend
    cfg = AutoConfig.from_pretrained(str(job.teacher))
    hf_tok = AutoTokenizer.from_pretrained(str(job.teacher))
    layout = layout_of(cfg, hf_tok)
    fp = {
        "format_version": fmt.FORMAT_VERSION,
        "teacher": {"model_type": cfg.model_type, "weights_sha256": weights_fingerprint(job.teacher),
                    "vocab_size": cfg.text_config.vocab_size, "hidden_size": cfg.text_config.hidden_size,
                    "num_layers": cfg.text_config.num_hidden_layers,
                    "num_heads": cfg.text_config.num_attention_heads,
                    "num_visual_tokens": layout.num_image_tokens, "patch_grid": layout.patch_grid},
        "tokenizer_sha256": tokenizer_fingerprint(hf_tok),
        "chat_template": hf_tok.chat_template,
        "extraction": {**job.settings.to_dict(), "samples_per_shard": job.samples_per_shard,
                       "max_shard_bytes": job.max_shard_bytes, "backend": backend},
        "data_sha256": sha256_file(Path(job.data)),
    }
    mpath = out / part_name(job.num_parts, job.part_index)
    manifest = None
    if mpath.is_file() and not job.overwrite:
        manifest = read_manifest(mpath)
        diff = fingerprint_diff(fingerprint(manifest), fp)
        if diff:
            raise CacheError(f"{out} holds a cache made with other {', '.join(diff)}; use a new --out or --overwrite")
    if manifest is not None and manifest["state"] == "complete":
        console.print(f"{mpath} is complete: nothing to do")
        return manifest
    t_start = time.time()
    teacher = teacher or make_backend(job, backend)
    if manifest is None:
        split = {"num_shards": job.num_parts, "shard_index": job.part_index, "start": start, "end": end}
        manifest = new_manifest(fp, str(job.data), len(rows), split)
        manifest["teacher_path"] = str(job.teacher)
        manifest["payload_backends"] = getattr(teacher, "payload_backends",
                                               {p: teacher.name for p in ("tokens", job.settings.logits, "attn",
                                                                          "hidden", "pooled")})
    cursor = manifest["shards"][-1]["end"] if manifest["shards"] else start
    prefix = "shard-" if job.num_parts == 1 else f"part{job.part_index:03d}-"
    bs = job.settings.batch_size
    # wall time is recorded so the cost of a cache is known later (docs/FORMAT.md: seconds)
    manifest["startup_seconds"] = manifest.get("startup_seconds", 0.0) + time.time() - t_start
    t0 = t_shard = time.time()
    pending: list[tuple[str, dict[str, bytes]]] = []
    pending_rejects: list[dict] = []
    shard_start, pending_bytes, new_shards = cursor, 0, 0
    stats = {"tokens": 0, "scored": 0}

    def close_shard(upto: int) -> None:
        nonlocal pending, pending_rejects, shard_start, pending_bytes, new_shards, t_shard
        name = f"{prefix}{len(manifest['shards']):06d}.tar"
        nbytes, digest, per_payload = write_shard(out / name, pending)
        metas = [json.loads(m["meta"]) for _, m in pending]
        manifest["shards"].append({
            "name": name, "start": shard_start, "end": upto, "samples": len(pending),
            "tokens": sum(m["tokens"] for m in metas), "scored_tokens": sum(m["scored"] for m in metas),
            "visual_tokens": sum(m["visual_tokens"] for m in metas),
            "bytes": nbytes, "sha256": digest, "payload_bytes": per_payload, "rejects": pending_rejects,
            "ids": [m["id"] for m in metas], "seconds": time.time() - t_shard,
        })
        write_manifest(mpath, manifest)
        pending, pending_rejects, shard_start, pending_bytes = [], [], upto, 0
        new_shards += 1
        t_shard = time.time()

    with bar() as p:
        task = p.add_task("teacher", total=end - start, completed=cursor - start, unit="samples")
        batch_start = start + (cursor - start) // bs * bs  # batches aligned to absolute rows
        for b0 in range(batch_start, end, bs):
            chunk = range(b0, min(b0 + bs, end))
            good, rejected = [], {}
            for i in chunk:
                row = rows[i]
                if isinstance(row, Reject):
                    rejected[i] = row
                else:
                    good.append((i, row))
            items, idx_of = [], {}
            for i, s in good:
                try:
                    (it,) = encode_samples([s], teacher.tok, teacher.layout, strict=True)
                    idx_of[id(it)] = i
                    items.append(it)
                except DataError as e:
                    rejected[i] = Reject(s.id, str(s.image or job.data), str(e))
            if rejected and job.strict:
                first = rejected[min(rejected)]
                raise DataError(f"--strict: {first.reason}")
            payloads = {}
            for j in range(0, len(items), bs):
                sub = items[j : j + bs]
                for it, members in zip(sub, teacher.extract(sub), strict=True):
                    payloads[idx_of[id(it)]] = members
            for i in chunk:
                if i < cursor:
                    continue  # resumed mid-batch: these rows are in a complete shard already
                if i in rejected:
                    r = rejected[i]
                    pending_rejects.append({"row": i, "id": r.sample_id, "source": r.source, "reason": r.reason})
                else:
                    members = payloads[i]
                    pending.append((fmt.sample_key(i), members))
                    pending_bytes += sum(len(v) for v in members.values())
                    meta = json.loads(members["meta"])
                    stats["tokens"] += meta["tokens"]
                    stats["scored"] += meta["scored"]
                if len(pending) >= job.samples_per_shard or pending_bytes >= job.max_shard_bytes:
                    close_shard(i + 1)
                    if job.stop_after_shards and new_shards >= job.stop_after_shards:
                        return manifest
            el = max(time.time() - t0, 1e-9)
            p.update(task, completed=chunk[-1] + 1 - start,
                     description=f"teacher [{len(manifest['shards'])} shards, {stats['scored'] / el:,.0f} scored tok/s]")
        if pending or pending_rejects:
            close_shard(end)
    if job.settings.gram:
        gram = teacher.lm_head_gram()
        gpath = out / "gram.npy"
        tmp = out / "gram.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, gram.astype(np.float32), allow_pickle=False)
        tmp.replace(gpath)
        manifest["gram"] = {"file": "gram.npy", "sha256": sha256_file(gpath), "shape": list(gram.shape)}
    if hasattr(teacher, "close"):
        teacher.close()
    manifest["state"] = "complete"
    write_manifest(mpath, manifest)
    write_rejects(out, manifest)
    t = totals(manifest)
    console.print(f"cache part {job.part_index + 1}/{job.num_parts}: {t['samples']} samples, {t['scored_tokens']} scored "
                  f"tokens, {t['shards']} shards, {t['bytes'] / 2**20:.1f} MiB in {out}; {t['rejects']} rejected"
                  + (f" (see {out / 'rejects.jsonl'})" if t["rejects"] else ""))
    return manifest


def write_rejects(out: Path, manifest: dict) -> None:
    """rejects.jsonl regenerated from the manifest: each reject exactly once, even across resumes."""
    lines = [json.dumps(r) for s in manifest["shards"] for r in s["rejects"]]
    name = "rejects.jsonl" if manifest["data"]["split"]["num_shards"] == 1 else \
        f"rejects.part-{manifest['data']['split']['shard_index']:03d}.jsonl"
    (out / name).write_text("".join(line + "\n" for line in lines))


def merge_parts(out: Path) -> dict:
    """Join split jobs' part manifests into manifest.json: same fingerprint, contiguous disjoint rows."""
    out = Path(out)
    parts = sorted(out.glob("manifest.part-*-of-*.json"))
    if not parts:
        raise CacheError(f"{out}: no part manifests (manifest.part-*-of-*.json) to merge")
    ms = [read_manifest(p) for p in parts]
    n = ms[0]["data"]["split"]["num_shards"]
    if len(ms) != n or sorted(m["data"]["split"]["shard_index"] for m in ms) != list(range(n)):
        have = sorted(m["data"]["split"]["shard_index"] for m in ms)
        raise CacheError(f"{out}: {n} parts expected, found indices {have}")
    ms.sort(key=lambda m: m["data"]["split"]["shard_index"])
    for p, m in zip(parts, ms, strict=True):
        diff = fingerprint_diff(fingerprint(ms[0]), fingerprint(m))
        if diff:
            raise CacheError(f"{p}: made with other {', '.join(diff)} than part 0; parts of one cache must agree")
        if m["state"] != "complete":
            raise CacheError(f"{p}: part is not complete; re-run its job first")
    for a, b in zip(ms, ms[1:], strict=False):
        if a["data"]["split"]["end"] != b["data"]["split"]["start"]:
            raise CacheError(f"{out}: parts do not tile the data rows ({a['data']['split']} then {b['data']['split']})")
    ids: set[str] = set()
    for m in ms:
        for s in m["shards"]:
            dup = ids.intersection(s["ids"])
            if dup:
                raise CacheError(f"{out}: sample id(s) {sorted(dup)[:5]} appear in two parts")
            ids.update(s["ids"])
    merged = {**ms[0], "shards": [s for m in ms for s in m["shards"]], "state": "complete",
              "startup_seconds": sum(m.get("startup_seconds", 0.0) for m in ms)}
    merged["data"] = {**ms[0]["data"], "split": {"num_shards": 1, "shard_index": 0, "start": 0,
                                                 "end": ms[-1]["data"]["split"]["end"], "merged_parts": n}}
    write_manifest(out / MANIFEST, merged)
    write_rejects(out, merged)
    return merged
