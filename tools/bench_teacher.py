"""Teacher backends side by side on the same samples: scored tokens/s of transformers and vLLM, their
parity before any quantisation, and the cache bytes each writes. Any supported family: a backend that
cannot run the teacher here (vLLM for a family it does not load) is left out with its reason.

Throughput counts the scoring only (engine start-up is reported apart: it is paid once per job).
Parity: per scored row, the top-k ids of both (ties aside), the largest |log-prob difference| on the
ids they share, and the tail-mass difference.

    python tools/bench_teacher.py --teacher demo/teacher --data demo/data/train.json --samples 512 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from vlmkd.data.dataset import encode_samples
    from vlmkd.data.manifest import load_samples
    from vlmkd.teacher.hf_backend import Extraction, HFTeacher
    from vlmkd.teacher.job import CacheJob, run_cache_job
    from vlmkd.teacher.vllm_backend import VLLMTeacher, vllm_available

    settings = Extraction(topk=args.k, score_visual=True, attn_layers=[], hidden_points=[], gram=False,
                          batch_size=args.batch_size)
    samples, _ = load_samples(args.data)
    samples = samples[: args.samples]
    rows = {}
    results = {}
    vllm_ok, vllm_why = vllm_available(args.teacher)
    backends = [("hf", HFTeacher)] + ([("vllm", VLLMTeacher)] if vllm_ok else [])
    if not vllm_ok:
        print(f"vllm left out: {vllm_why}")
    for name, cls in backends:
        t = time.perf_counter()
        teacher = cls(args.teacher, settings)
        start = time.perf_counter() - t
        items = encode_samples(samples, teacher.tok, teacher.layout)
        if not items:
            raise SystemExit(f"{args.data}: none of its first {len(samples)} rows encodes for {args.teacher} "
                             "(missing images? run `vlmkd cache-teacher` on it to see each reject's reason)")
        t = time.perf_counter()
        out = []
        step = args.batch_size if name == "hf" else len(items)  # vLLM schedules the whole set itself
        for i in range(0, len(items), step):
            out += teacher.topk_arrays(items[i : i + step])
        secs = time.perf_counter() - t
        rows[name] = [{"pos": p, "ids": i, "logprobs": lp, "tail": tl} for p, i, lp, tl in out]
        scored = sum(len(p) for p, _, _, _ in out)
        results[name] = {"startup_s": start, "score_s": secs, "scored_tokens": scored,
                         "scored_tokens_per_s": scored / secs, "samples_per_s": len(items) / secs}
        if hasattr(teacher, "close"):
            teacher.close()
        del teacher
    worst_lp, worst_tail, mismatched, total = 0.0, 0.0, 0, 0
    for a, b in zip(rows["hf"], rows.get("vllm", []), strict=False):
        for r in range(len(a["pos"])):
            total += 1
            sa, sb = set(a["ids"][r].tolist()), set(b["ids"][r].tolist())
            mismatched += sa != sb
            la = dict(zip(a["ids"][r].tolist(), a["logprobs"][r].tolist(), strict=True))
            lb = dict(zip(b["ids"][r].tolist(), b["logprobs"][r].tolist(), strict=True))
            common = sa & sb
            if common:
                worst_lp = max(worst_lp, max(abs(la[i] - lb[i]) for i in common))
            worst_tail = max(worst_tail, abs(float(np.exp(a["tail"][r]) - np.exp(b["tail"][r]))))
    parity = None if not vllm_ok else {"rows": total, "rows_with_other_topk_ids": mismatched,
              "max_abs_logprob_diff": worst_lp, "max_abs_tail_mass_diff": worst_tail}
    # cache bytes written by each backend through the whole job
    tmp = Path(tempfile.mkdtemp())
    manifest = tmp / "data.json"
    raw = json.loads(args.data.read_text())[: args.samples]
    for r in raw:
        if r.get("image") and not Path(r["image"]).is_absolute():
            r["image"] = str((args.data.parent / r["image"]).resolve())
    manifest.write_text(json.dumps(raw))
    for name in results:
        m = run_cache_job(CacheJob(args.teacher, manifest, tmp / name, settings, backend=name))
        results[name]["cache_bytes"] = sum(s["bytes"] for s in m["shards"])
    shutil.rmtree(tmp)
    ratio = results["vllm"]["scored_tokens_per_s"] / results["hf"]["scored_tokens_per_s"] if vllm_ok else None
    report = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads"
              + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU"),
              "teacher": str(args.teacher),
              "model_type": json.loads((args.teacher / "config.json").read_text())["model_type"], "samples": len(samples), "k": args.k, "backends": results,
              "vllm_over_hf": ratio, "parity": parity, "vllm_left_out": None if vllm_ok else vllm_why}
    print(f"{'backend':>8} {'startup s':>10} {'score s':>8} {'scored tok/s':>13} {'samples/s':>10} {'cache bytes':>12}")
    for name, r in results.items():
        print(f"{name:>8} {r['startup_s']:>10.1f} {r['score_s']:>8.2f} {r['scored_tokens_per_s']:>13,.0f} "
              f"{r['samples_per_s']:>10.1f} {r['cache_bytes']:>12,}")
    if vllm_ok:
        print(f"vLLM / transformers: {ratio:.2f}x; parity: {parity}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
