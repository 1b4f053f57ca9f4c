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
    sha256_file,
    tokenizer_fingerprint,
    totals,
    weights_fingerprint,
    write_manifest,
)
from vlmkd.cache.writer import CacheWriter
from vlmkd.data.dataset import encode_samples
from vlmkd.data.manifest import Reject, Sample, describe
from vlmkd.data.manifest import read_manifest as read_rows
from vlmkd.errors import CacheError, DataError
from vlmkd.models.build import layout_of, processor_path, saved_processor
from vlmkd.progress import bar, console
from vlmkd.teacher.hf_backend import Extraction


@dataclass
class CacheJob:
    teacher: Path
    data: Path
    out: str | Path  # a folder, or any fsspec URL (vlmkd.cache.store)
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
    val: Path | None = None  # a validation manifest to hold in the cache (CACHE/val/), so students need no data folder


def part_range(n_rows: int, num_parts: int, index: int) -> tuple[int, int]:
    if not 0 <= index < num_parts:
        raise CacheError(f"--shard-index {index} is outside 0..{num_parts - 1}")
    return n_rows * index // num_parts, n_rows * (index + 1) // num_parts


def choose_backend(name: str, teacher: Path, what: str = "teacher backend") -> str:
    """`auto` takes vLLM when it imports and supports the model, and says which it took and why."""
    from vlmkd.teacher.vllm_backend import vllm_available

    if name not in ("auto", "vllm", "hf"):
        raise CacheError(f"unknown teacher backend {name!r}; choose auto, vllm or hf")
    if name == "hf":
        return "hf"
    ok, why = vllm_available(teacher)
    if name == "vllm" and not ok:
        fix = ("install it with tools/install_vllm.sh or use --backend hf" if why.startswith("vLLM does not import")
               else "use --backend hf")
        raise CacheError(f"--backend vllm: {why}; {fix}")
    chosen = "vllm" if ok else "hf"
    if name == "auto":
        console.print(f"{what}: {chosen} ({why})")
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
    rows = list(read_rows(job.data))
    samples = [r for r in rows if isinstance(r, Sample)]
    bad = [r for r in rows if isinstance(r, Reject)]
    console.print(f"{Path(job.data).name}: {describe(samples, bad)}")
    if not samples:
        raise DataError(f"{job.data}: no usable row ({describe(samples, bad)}){_first_reasons([r.reason for r in bad])}")
    pairs = any("rejected" in s.extra for s in samples)
    if (job.settings.logits == "sampled" or pairs) and job.backend == "auto" and teacher is None:
        backend = "hf"  # the only backend with the full distribution and pair scoring (check_settings says why)
    else:
        backend = teacher.name if teacher is not None else choose_backend(job.backend, Path(job.teacher))
    check_settings(job.settings, backend, Path(job.data) if pairs else None)
    start, end = part_range(len(rows), job.num_parts, job.part_index)
    split = {"num_shards": job.num_parts, "shard_index": job.part_index, "start": start, "end": end}
    # the fingerprint comes from the files, so a finished cache is recognised without starting a backend
    writer = CacheWriter(job.out, job_fingerprint(job, backend), str(Path(job.data).resolve()), len(rows), split,
                         job.overwrite, job.samples_per_shard, job.max_shard_bytes)
    if writer.complete:
        console.print(f"{writer.store.where(writer.name)} is complete: nothing to do")
        return writer.manifest
    manifest = writer.manifest
    t_start = time.time()
    teacher = teacher or make_backend(job, backend)
    if not writer.resumed:
        manifest["teacher_path"] = str(Path(job.teacher).resolve())  # provenance only: students read CACHE/teacher
        manifest["payload_backends"] = getattr(teacher, "payload_backends",
                                               {p: teacher.name for p in ("tokens", job.settings.logits, "attn",
                                                                          "hidden", "pooled")})
        writer.put_teacher_files(Path(job.teacher))
        if job.val is not None:
            writer.put_validation(Path(job.val))
    bs = job.settings.batch_size
    # wall time is recorded so the cost of a cache is known later (docs/FORMAT.md: seconds)
    manifest["startup_seconds"] = manifest.get("startup_seconds", 0.0) + time.time() - t_start
    cursor, t0 = writer.cursor, time.time()
    stats = {"tokens": 0, "scored": 0}
    with bar() as p:
        task = p.add_task("teacher", total=end - start, completed=cursor - start, unit="samples")
        for b0 in range(start + (cursor - start) // bs * bs, end, bs):  # batches aligned to absolute rows
            chunk = range(b0, min(b0 + bs, end))
            payloads, rejected = _extract_batch(teacher, rows, chunk, job)
            for i in chunk:
                if i < cursor:
                    continue  # resumed mid-batch: these rows are in a complete shard already
                if i in rejected:
                    r = rejected[i]
                    writer.reject(i, r.sample_id, r.source, r.reason)
                else:
                    writer.add(i, payloads[i])
                    meta = json.loads(payloads[i]["meta"])
                    stats["tokens"] += meta["tokens"]
                    stats["scored"] += meta["scored"]
                if writer.full():
                    writer.close_shard(i + 1)
                    if job.stop_after_shards and writer.new_shards >= job.stop_after_shards:
                        return manifest
            el = max(time.time() - t0, 1e-9)
            p.update(task, completed=chunk[-1] + 1 - start,
                     description=f"teacher [{len(manifest['shards'])} shards, {stats['scored'] / el:,.0f} scored tok/s]")
    if job.settings.gram:
        writer.put_array("gram", teacher.lm_head_gram().astype(np.float32))
    if hasattr(teacher, "close"):
        teacher.close()
    manifest["counts"] = {"rows": end - start}  # = samples + rejects of this part (checked below)
    manifest = writer.finish(end)
    t = totals(manifest)
    manifest["counts"].update(samples=t["samples"], rejects=t["rejects"])
    if t["samples"] + t["rejects"] != end - start:
        raise CacheError(f"{writer.store}: {end - start} rows but {t['samples']} samples + {t['rejects']} rejects; the cache "
                         "lost or duplicated rows (a bug: please report it with the manifest)")
    if t["samples"] == 0 and job.num_parts == 1:  # (a part may be all rejects: `cache merge` checks the whole)
        manifest["state"] = "no-samples"  # not complete: a re-run says the same, never "nothing to do"
        write_manifest(writer.path, manifest)
        reasons = [r["reason"] for sh in manifest["shards"] for r in sh["rejects"]]
        raise DataError(f"{job.data}: no usable sample ({end - start} rows = 0 samples + {t['rejects']} rejected; "
                        f"see {writer.store.where('rejects.jsonl')}){_first_reasons(reasons)}")
    write_manifest(writer.path, manifest)
    console.print(f"cache part {job.part_index + 1}/{job.num_parts}: {t['samples']} samples, {t['scored_tokens']} scored "
                  f"tokens, {t['shards']} shards, {t['bytes'] / 2**20:.1f} MiB in {writer.store}; {end - start} rows = {t['samples']} "
                  f"samples + {t['rejects']} rejected"
                  + (f" (see {writer.store.where('rejects.jsonl')})" if t["rejects"] else ""))
    return manifest


def _first_reasons(reasons: list[str], n: int = 3) -> str:
    """The first rejects' reasons, one per line, for an error that says why nothing was usable."""
    more = f"\n  ... and {len(reasons) - n} more" if len(reasons) > n else ""
    return "".join(f"\n  {r}" for r in reasons[:n]) + more


def job_fingerprint(job: CacheJob, backend: str) -> dict:
    """What must agree for a resume (or parts being merged) to write the same cache."""
    cfg = AutoConfig.from_pretrained(str(job.teacher))
    hf_tok = AutoTokenizer.from_pretrained(str(job.teacher))
    proc = saved_processor(job.teacher) if processor_path(cfg, hf_tok) else None
    layout = layout_of(cfg, hf_tok, proc)
    # a processor family's visual tokens are its image processor's: recorded (only for those families,
    # so the fingerprints of earlier caches stay as they were)
    images = {"image_processor": json.loads(layout.processor.image_processor.to_json_string())} if proc else {}
    return {
        "format_version": fmt.FORMAT_VERSION,
        "teacher": {"model_type": cfg.model_type, "weights_sha256": weights_fingerprint(job.teacher),
                    "vocab_size": cfg.text_config.vocab_size, "hidden_size": cfg.text_config.hidden_size,
                    "num_layers": cfg.text_config.num_hidden_layers,
                    "num_heads": cfg.text_config.num_attention_heads,
                    "num_visual_tokens": layout.num_image_tokens, "patch_grid": layout.patch_grid, **images},
        "tokenizer_sha256": tokenizer_fingerprint(hf_tok),
        "chat_template": hf_tok.chat_template,
        "extraction": {**job.settings.to_dict(), "samples_per_shard": job.samples_per_shard,
                       "max_shard_bytes": job.max_shard_bytes, "backend": backend},
        "data_sha256": sha256_file(Path(job.data)),
    }


def _extract_batch(teacher, rows: list, chunk: range, job: CacheJob) -> tuple[dict[int, dict], dict[int, Reject]]:
    """The payload members of each good row of `chunk`, and a Reject for each row that is not."""
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
        raise DataError(f"--strict: {rejected[min(rejected)].reason}")
    payloads = {}
    if items:
        for it, members in zip(items, teacher.extract(items), strict=True):
            payloads[idx_of[id(it)]] = members
    return payloads, rejected


