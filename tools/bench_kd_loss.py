"""LM head + sparse-target KD, forward + backward (grads for hidden states and LM-head weight):
time and peak memory of each implementation on the same shapes, side by side in one run.

impls: naive (full float32 logits, log-softmax, gather: the plain PyTorch baseline), chunked
(vlmkd.kernels, impl="torch"), and on CUDA: triton (vlmkd.kernels, impl="triton": the fused path the
trainer picks on a GPU) and liger_flce (Liger-Kernel's fused linear cross-entropy, no KD: the memory
floor) where liger-kernel is installed. Every run draws fresh random inputs and checks each vlmkd
path's loss and gradients against naive before timing (column err: max relative difference).

CPU peak memory is each measurement's own process's peak RSS (VmHWM, reset after the inputs are
made) above its RSS with the inputs in place: what the loss itself allocates, as on CUDA (one subprocess per
implementation and shape); CUDA peak memory is torch.cuda.max_memory_allocated.

    python tools/bench_kd_loss.py --device cpu --quick --json out.json
    python tools/bench_kd_loss.py --shapes 4096,32000,896,64 --chunks 256,4096   # on a GPU
    python tools/bench_kd_loss.py --profile 16384,151936,896,64                  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

QUICK = [(1024, 32000, 256, 16), (1024, 131072, 256, 64)]
FULL = [(t, v, h, k) for t in (4096, 16384) for v in (32000, 151936) for h in (896, 2048) for k in (16, 64)]


def make(tokens, vocab, hidden, k, device, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(tokens, hidden, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype).requires_grad_(True)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(min(tokens, 64))])
    ids = ids.repeat(tokens // len(ids) + 1, 1)[:tokens].to(device)
    lp = torch.log_softmax(torch.randn(tokens, k, generator=g) * 2, -1) - 0.1
    tail = torch.log1p(-lp.exp().sum(-1))
    return h, w, ids, lp.to(device), tail.to(device)


def run_impl(impl, h, w, ids, lp, tail):
    from vlmkd.kernels import linear_sparse_kd
    from vlmkd.losses import logit_kd

    if impl == "naive":
        z = (h @ w.T).float()
        loss = logit_kd(z[None], ids[None], lp[None], torch.ones(1, len(h), dtype=torch.bool, device=h.device),
                        teacher_tail=tail[None])
    elif impl == "chunked":
        loss = linear_sparse_kd(h, w, ids, lp, tail, impl="torch")
    elif impl.startswith("triton"):  # "triton" (the default chunk) or "triton@ROWS"
        rows = int(impl.split("@")[1]) if "@" in impl else None
        loss = linear_sparse_kd(h, w, ids, lp, tail, impl="triton", chunk=rows)
    elif impl == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()(w, h, ids[:, 0])
    else:
        raise ValueError(impl)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), gh, gw


def measure(impl, shape, device, dtype, repeats, seed):
    h, w, ids, lp, tail = make(*shape, device, dtype, seed)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run_impl(impl, h, w, ids, lp, tail)  # warm-up
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run_impl(impl, h, w, ids, lp, tail)
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
    return statistics.median(times), peak


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(args) -> None:
    """One implementation on one shape in a fresh process, so max RSS is its own."""
    torch.set_num_threads(args.threads)
    import vlmkd.kernels  # noqa: F401  (imports before the baseline)
    import vlmkd.losses  # noqa: F401

    shape = tuple(args.shape)
    h, w, ids, lp, tail = make(*shape, "cpu", torch.float32, args.seed)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark: count only what the loss itself allocates
    base = status_kb("VmRSS")
    times = []
    for _ in range(args.repeats + 1):
        t = time.perf_counter()
        run_impl(args.impl, h, w, ids, lp, tail)
        times.append((time.perf_counter() - t) * 1e3)
    peak = status_kb("VmHWM") - base
    t = statistics.median(times[1:])
    print(json.dumps({"time_ms": t, "peak_mem_bytes": peak}))


def check(impl, shape, device, seed) -> float:
    """Max relative difference of `impl` vs naive (loss and both gradients) on fresh float32 inputs."""
    small = (min(shape[0], 256), shape[1], shape[2], shape[3])
    h, w, ids, lp, tail = make(*small, device, torch.float32, seed + 1)
    a = run_impl("naive", h, w, ids, lp, tail)
    b = run_impl(impl, h, w, ids, lp, tail)
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(b, a, strict=True))


def profile(shape, seed) -> None:
    """Where the triton path's time goes on one shape: CUDA kernels and host time, largest first."""
    h, w, ids, lp, tail = make(*shape, "cuda", torch.bfloat16, seed)
    run_impl("triton", h, w, ids, lp, tail)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_impl("triton", h, w, ids, lp, tail)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=14, max_name_column_width=48))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", nargs="+", metavar="T,V,H,K", help="tokens,vocab,hidden,k (default: the grid)")
    ap.add_argument("--chunks", default="", help="CUDA: also time triton at these rows per chunk, e.g. 256,4096")
    ap.add_argument("--profile", metavar="T,V,H,K", help="CUDA: print torch.profiler's table for triton here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--shape", type=int, nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.profile:
        return profile(tuple(int(x) for x in args.profile.split(",")), args.seed)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else QUICK if args.quick else FULL
    impls = ["naive", "chunked"]
    if args.device == "cuda":
        impls += ["triton"] + [f"triton@{r}" for r in args.chunks.split(",") if r]
        try:
            import liger_kernel  # noqa: F401

            impls.append("liger_flce")
        except ImportError:
            pass
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    rows = []
    print(f"{'impl':>10} {'tokens':>6} {'vocab':>7} {'hidden':>6} {'k':>3} {'time ms':>9} {'peak MB':>9} {'err':>8}")
    for shape in shapes:
        errs = {i: check(i, shape, args.device, args.seed) for i in impls if i == "chunked" or i.startswith("triton")}
        for impl in impls:
            if args.device == "cpu":
                cmd = [sys.executable, __file__, "--child", "--impl", impl, "--shape", *map(str, shape),
                       "--repeats", str(args.repeats), "--threads", str(args.threads), "--seed", str(args.seed)]
                out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())
                t, peak = out["time_ms"], out["peak_mem_bytes"]
            else:
                t, peak = measure(impl, shape, "cuda", torch.bfloat16, args.repeats, args.seed)
            row = {"impl": impl, "device": dev_name, "tokens": shape[0], "vocab": shape[1], "hidden": shape[2],
                   "k": shape[3], "time_ms": t, "peak_mem_bytes": peak,
                   "max_rel_err_vs_naive": errs.get(impl, 0.0)}
            rows.append(row)
            print(f"{impl:>10} {shape[0]:>6} {shape[1]:>7} {shape[2]:>6} {shape[3]:>3} {t:>9.1f} "
                  f"{peak / 2**20:>9.1f} {row['max_rel_err_vs_naive']:>8.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
