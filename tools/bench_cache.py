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

--synthetic: teacher distributions at real vocabulary sizes (V = 32,000, 151,936, 262,144), drawn as
follows. Per position, the logit of the token of rank r is -a log r + 0.5 z (z standard normal), with
a = 2.0 x U(0.6, 1.4) per position: a Zipf-shaped profile whose mean entropy is ~2 nats (reported),
in the range of an instruction-tuned LM's next-token entropy. Which token holds which rank: the
vocabulary ordered by a Plackett-Luce draw from unigram frequencies 1 / (id + 1) (BPE ids are roughly
in frequency order, so frequent, low ids tend to rank high); `--id-order uniform` draws the order
uniformly instead (the worst case for id coding). Reported per mode (top-k k, or sampled N draws at
t = 1): bytes per scored token (members of 16 rows, like a short answer + its visual rows),
KL(unquantised top-k || decoded) over the k + 1 buckets (the codec's own loss), KL(full || decoded)
with the tail spread evenly over the other ids, top-1 agreement, and decode throughput on one core.
For sampled rows the estimate is zero off its draws, so KL(full || it) is infinite by construction;
its total variation to the full distribution is reported instead (E[estimate] = full: tests/test_sampled.py).

    python tools/bench_cache.py --synthetic --json out.json
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


ENTROPY_SCALE = 2.0  # a: the Zipf exponent of the rank profile (mean entropy ~2 nats at these V)


def synthetic_rows(V: int, n: int, seed: int, id_order: str = "frequency") -> tuple[np.ndarray, np.ndarray]:
    """(logp [n, V] over ranks (float64), ids [n, V]: the token id holding each rank)."""
    g = np.random.default_rng(seed)
    r = np.log(np.arange(1, V + 1, dtype=np.float64))
    a = ENTROPY_SCALE * g.uniform(0.6, 1.4, size=(n, 1))
    logits = -a * r[None] + 0.5 * g.standard_normal((n, V))
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    if id_order == "uniform":
        ids = np.stack([g.permutation(V) for _ in range(n)])
    else:  # Plackett-Luce over unigram weights 1/(id+1): sort by log(id+1) - Gumbel
        ids = np.argsort(r[None] - g.gumbel(size=(n, V)), axis=-1)
    return logp, ids


def synthetic_bench(V: int, n: int, seed: int, id_order: str, ks=(16, 64), draws=(50,), rows_per_member=16,
                    repeats: int = 3) -> list[dict]:
    logp, rank_ids = synthetic_rows(V, n, seed, id_order)
    p = np.exp(logp)
    entropy = float(-(p * logp).sum(-1).mean())
    top1 = rank_ids[np.arange(n), logp.argmax(-1)]
    out = []
    members = range(0, n, rows_per_member)

    def timed(decode, blob, rows):
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            decode(blob)
            best = min(best, time.perf_counter() - t)
        return rows / best

    for k in ks:
        part = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
        lp = np.take_along_axis(logp, part, -1)
        ids = np.take_along_axis(rank_ids, part, -1)
        tail = np.log1p(-np.exp(lp).sum(-1))
        blobs = [fmt.encode_topk(np.arange(s, min(s + rows_per_member, n)), ids[s : s + rows_per_member],
                                 lp[s : s + rows_per_member], tail[s : s + rows_per_member], V) for s in members]
        dec = [fmt.decode_topk(b) for b in blobs]
        d_ids = np.concatenate([d["ids"] for d in dec])
        d_lp = np.concatenate([d["logprobs"] for d in dec]).astype(np.float64)
        d_tail = np.concatenate([d["tail"] for d in dec]).astype(np.float64)
        # the decoded rows are in id order: bring the exact values into the same order
        order = np.argsort(ids, -1)
        lp_s = np.take_along_axis(lp, order, -1)
        p_s, T = np.exp(lp_s), np.exp(tail)
        kl_codec = (p_s * (lp_s - d_lp)).sum(-1) + np.where(T > 0, T * (tail - d_tail), 0)
        rest = np.ones_like(p, bool)
        np.put_along_axis(rest, part, False, -1)
        tail_share = d_tail - np.log(V - k)
        kl_full = (p_s * (lp_s - d_lp)).sum(-1) + np.where(rest, p * (logp - tail_share[:, None]), 0).sum(-1)
        agree = float((d_ids[np.arange(n), d_lp.argmax(-1)] == top1).mean())
        bulk = fmt.encode_topk(np.arange(n), ids, lp, tail, V)
        out.append({"mode": "topk", "k": k, "vocab": V, "id_order": id_order, "rows": n, "entropy_mean": entropy,
                    "bytes_per_token": sum(map(len, blobs)) / n, "bytes_per_token_bulk": len(bulk) / n,
                    "bytes_per_token_packed_ids_only": k * int(np.ceil(np.log2(V))) / 8,
                    "kl_vs_unquantised_topk_mean": float(kl_codec.mean()), "kl_full_mean": float(kl_full.mean()),
                    "top1_agreement": agree, "decode_tokens_per_s": timed(fmt.decode_topk, bulk, n)})
    for N in draws:
        g = np.random.default_rng(seed + N)
        s_ids, s_cnt, s_lp, tv, agree = [], [], [], [], 0
        cdf = np.cumsum(p, -1)
        for i in range(n):
            ranks = np.minimum(np.searchsorted(cdf[i], g.random(N) * cdf[i, -1]), V - 1)
            u, c = np.unique(ranks, return_counts=True)
            s_ids.append(rank_ids[i, u]), s_cnt.append(c), s_lp.append(logp[i, u])
            est = c / N
            tv.append(0.5 * (np.abs(est - p[i, u]).sum() + (1 - p[i, u].sum())))
            agree += int(rank_ids[i, u[c.argmax()]] == top1[i])
        # as the cache stores t = 1 draws: ids and counts; the float16 log-probs a t != 1 proposal adds
        # (for its importance weights) are reported apart
        blobs = [fmt.encode_sampled(np.arange(s, min(s + rows_per_member, n)), s_ids[s : s + rows_per_member],
                                    s_cnt[s : s + rows_per_member], N) for s in members]
        with_lp = [fmt.encode_sampled(np.arange(s, min(s + rows_per_member, n)), s_ids[s : s + rows_per_member],
                                      s_cnt[s : s + rows_per_member], N, 1.0, s_lp[s : s + rows_per_member])
                   for s in members]
        bulk = fmt.encode_sampled(np.arange(n), s_ids, s_cnt, N)
        out.append({"mode": "sampled", "draws": N, "vocab": V, "id_order": id_order, "rows": n,
                    "entropy_mean": entropy, "unique_ids_mean": float(np.mean([len(x) for x in s_ids])),
                    "bytes_per_token": sum(map(len, blobs)) / n,
                    "bytes_per_token_with_logprobs": sum(map(len, with_lp)) / n,
                    "bytes_per_token_bulk": len(bulk) / n, "tv_full_mean": float(np.mean(tv)),
                    "top1_agreement": agree / n, "decode_tokens_per_s": timed(fmt.decode_sampled, bulk, n)})
    return out


def print_synthetic(rows: list[dict]) -> None:
    print(f"{'V':>7} {'ids':>9} {'mode':>11} {'H nats':>6} {'B/tok':>6} {'B/tok bulk':>10} {'KL codec':>9} "
          f"{'KL full':>8} {'TV full':>7} {'top-1':>6} {'dec tok/s':>10}")
    for r in rows:
        mode = f"top-{r['k']}" if r["mode"] == "topk" else f"N={r['draws']}"
        print(f"{r['vocab']:>7} {r['id_order']:>9} {mode:>11} {r['entropy_mean']:>6.2f} {r['bytes_per_token']:>6.1f} "
              f"{r['bytes_per_token_bulk']:>10.1f} {r.get('kl_vs_unquantised_topk_mean', float('nan')):>9.1e} "
              f"{r.get('kl_full_mean', float('nan')):>8.3f} {r.get('tv_full_mean', float('nan')):>7.3f} "
              f"{r['top1_agreement']:>6.3f} {r['decode_tokens_per_s']:>10,.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--synthetic", action="store_true", help="synthetic teachers at V = 32k, 152k, 262k instead")
    ap.add_argument("--rows", type=int, default=256, help="--synthetic: scored rows per vocabulary size")
    ap.add_argument("--id-order", default="both", choices=["frequency", "uniform", "both"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--score-visual", action="store_true", help="also score visual positions, as the demo cache does")
    ap.add_argument("--cache", type=Path, help="also report a built cache's bytes per token per payload")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.synthetic:
        res = []
        orders = ["frequency", "uniform"] if args.id_order == "both" else [args.id_order]
        for V in (32000, 151936, 262144):
            for order in orders:
                res += synthetic_bench(V, args.rows, args.seed, order)
        print_synthetic(res)
        if args.json:
            args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                             "synthetic": res}, indent=1))
            print(f"wrote {args.json}")
        return
    if not (args.teacher and args.data):
        ap.error("--teacher and --data are needed (or --synthetic)")
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
