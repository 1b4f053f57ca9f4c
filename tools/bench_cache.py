"""Cache codec benchmark: bytes per scored token, fidelity and decode speed, on a real teacher.

For k in (8, 16, 32, 64): the teacher's full distributions at the scored positions of N samples,
reduced to top-k + tail, encoded by the cache codec and decoded again. Reports, per k:
- bytes per scored token of the top-k member as the cache stores it (one member per sample, so
  per-sample framing included) and of the codec alone on all rows at once (framing amortised);
- the same for raw float32 top-k (ids int32 + log-probs float32 + tail) and full-vocab float32 logits;
- mean KL(full || top-k + tail) before quantisation (truncation) and after (what the student sees);
- the mean and max error of the decoded top-k log-probs where p > 1e-3;
- decode throughput in scored tokens/s on one core.

    python tools/bench_cache.py --teacher demo/teacher --data demo/data/val.json --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from vlmkd.cache import format as fmt
from vlmkd.data.dataset import collate, encode_samples, model_inputs
from vlmkd.data.manifest import load_samples
from vlmkd.models.build import data_tokenizer, load_model
from vlmkd.teacher.hf_backend import topk_rows


def full_rows(model_dir: Path, data: Path, n: int, score_visual: bool) -> tuple[list[torch.Tensor], int]:
    """Per sample: the float64 log-softmax [R, V] at the positions the cache scores."""
    model, hf = load_model(model_dir)
    model.eval()
    tok, layout = data_tokenizer(model, hf)
    samples, _ = load_samples(data)
    items = encode_samples(samples[:n], tok, layout)
    rows = []
    with torch.no_grad():
        for i in range(0, len(items), 32):
            chunk = items[i : i + 32]
            logits = model(**model_inputs(collate(chunk, layout, tok.pad_id))).logits
            for b, it in enumerate(chunk):
                pos = np.flatnonzero(it.enc.labels_mask) - 1
                if score_visual:
                    pos = np.union1d(pos, np.flatnonzero(it.enc.image_mask))
                rows.append(torch.log_softmax(logits[b, torch.from_numpy(pos)].double(), -1))
    return rows, model.config.text_config.vocab_size


def sparse_kl(full: torch.Tensor, ids: np.ndarray, lp: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """KL(full || top-k + tail bucket) per row, in float64."""
    p = full.exp()
    idx = torch.from_numpy(ids)
    p_top = p.gather(-1, idx)
    lq = torch.from_numpy(lp.astype(np.float64))
    kl_top = (p_top * (full.gather(-1, idx) - lq)).sum(-1)
    p_tail = (1 - p_top.sum(-1)).clamp_min(0)
    lt = torch.from_numpy(tail.astype(np.float64))
    kl_tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - lt), torch.zeros_like(p_tail))
    return (kl_top + kl_tail).numpy()


def bench(rows: list[torch.Tensor], V: int, ks=(8, 16, 32, 64), repeats: int = 3) -> list[dict]:
    torch.set_num_threads(1)
    R = sum(len(r) for r in rows)
    out = []
    for k in ks:
        k = min(k, V)
        blobs, trunc, quant, errs, maxerr = [], [], [], [], 0.0
        all_pos, all_ids, all_lp, all_tail = [], [], [], []
        for r in rows:
            ids, lp, tail = topk_rows(r.float(), k)
            ids, lp, tail = ids.numpy(), lp.numpy(), tail.numpy()
            pos = np.arange(len(r))
            blobs.append(fmt.encode_topk(pos, ids, lp, tail, V))
            all_pos.append(pos), all_ids.append(ids), all_lp.append(lp), all_tail.append(tail)
            trunc.append(sparse_kl(r, ids, lp, tail))
            dec = fmt.decode_topk(blobs[-1])
            quant.append(sparse_kl(r, dec["ids"], dec["logprobs"], dec["tail"]))
            ref = r.gather(-1, torch.from_numpy(dec["ids"])).numpy()
            big = ref > np.log(1e-3)
            if big.any():
                e = np.abs(dec["logprobs"] - ref)[big]
                errs.append(e)
                maxerr = max(maxerr, float(e.max()))
        one = fmt.encode_topk(np.concatenate(all_pos), np.concatenate(all_ids), np.concatenate(all_lp),
                              np.concatenate(all_tail), V)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for b in blobs:
                fmt.decode_topk(b)
            best = min(best, time.perf_counter() - t)
        t = time.perf_counter()
        fmt.decode_topk(one)
        bulk = time.perf_counter() - t
        out.append({
            "k": k, "vocab": V, "scored_tokens": R,
            "bytes_per_token_member": sum(len(b) for b in blobs) / R,
            "bytes_per_token_codec": len(one) / R,
            "bytes_per_token_raw_f32_topk": (8 * k + 4),
            "bytes_per_token_full_f32": 4 * V,
            "kl_truncation_mean": float(np.concatenate(trunc).mean()),
            "kl_after_codec_mean": float(np.concatenate(quant).mean()),
            "logprob_abs_err_mean": float(np.concatenate(errs).mean()) if errs else 0.0,
            "logprob_abs_err_max": maxerr,
            "decode_tokens_per_s_per_member": R / best,
            "decode_tokens_per_s_bulk": R / max(bulk, 1e-9),
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--score-visual", action="store_true", help="also score visual positions, as the demo cache does")
    ap.add_argument("--cache", type=Path, help="also report a built cache's bytes per token per payload")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows, V = full_rows(args.teacher, args.data, args.samples, args.score_visual)
    res = bench(rows, V)
    print(f"{'k':>3} {'B/tok member':>12} {'B/tok codec':>11} {'raw f32 top-k':>13} {'full f32':>9} "
          f"{'KL trunc':>9} {'KL codec':>9} {'|err| mean':>10} {'|err| max':>9} {'dec tok/s':>11}")
    for r in res:
        print(f"{r['k']:>3} {r['bytes_per_token_member']:>12.1f} {r['bytes_per_token_codec']:>11.1f} "
              f"{r['bytes_per_token_raw_f32_topk']:>13} {r['bytes_per_token_full_f32']:>9} "
              f"{r['kl_truncation_mean']:>9.2e} {r['kl_after_codec_mean']:>9.2e} {r['logprob_abs_err_mean']:>10.4f} "
              f"{r['logprob_abs_err_max']:>9.4f} {r['decode_tokens_per_s_per_member']:>11,.0f}")
    report = {"machine": platform.processor() or platform.machine(), "teacher": str(args.teacher),
              "data": str(args.data), "topk": res}
    if args.cache:
        from vlmkd.cache.inspect import summarize
        from vlmkd.cache.manifest import read_manifest

        info = summarize(read_manifest(args.cache))
        report["cache"] = {"bytes_per_token": info["bytes_per_token"], "samples": info["samples"],
                           "scored_tokens": info["scored_tokens"]}
        print("cache bytes per scored token:", {k: round(v, 1) for k, v in info["bytes_per_token"].items()})
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
