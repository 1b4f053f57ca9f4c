"""Generation throughput per engine, side by side in one run (`vlmkd generate`'s two engines).

Both engines start once (start-up timed apart), then answer the same prompts greedily in alternating
repetitions; prints prompts/s and new tokens/s per engine (mean and sample SD over repetitions), the
vLLM : transformers ratio, and whether the answers were the same; writes JSON.

    python tools/bench_generate.py --model DIR --data MANIFEST [--prompts 512] [--max-new-tokens 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vlmkd.data.dataset import encode_samples  # noqa: E402
from vlmkd.data.manifest import Sample, read_manifest  # noqa: E402
from vlmkd.generate.engines import HFEngine, Sampling, VLLMEngine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", type=Path, default=Path("bench_generate.json"))
    args = ap.parse_args()
    samples = [s for s in read_manifest(args.data, prompts=True) if isinstance(s, Sample)][: args.prompts]
    engines, startup = {}, {}
    for name, make in (("hf", lambda: HFEngine(args.model, args.batch_size)), ("vllm", lambda: VLLMEngine(args.model))):
        t0 = time.time()
        try:
            engines[name] = make()
        except ImportError as e:
            print(f"{name}: not available ({e})")
            continue
        startup[name] = time.time() - t0
    s = Sampling(max_new_tokens=args.max_new_tokens)
    items = {n: encode_samples(samples, e.tok, e.layout, with_answer=False) for n, e in engines.items()}
    times = {n: [] for n in engines}
    answers = {}
    for _ in range(args.reps):
        for n, e in engines.items():
            t0 = time.time()
            out = []
            for b in range(0, len(items[n]), args.batch_size):
                chunk = items[n][b: b + args.batch_size]
                out += e.answer(chunk, list(range(b, b + len(chunk))), s)
            times[n].append(time.time() - t0)
            answers[n] = [[c.ids for c in cs] for cs in out]
    new_tokens = {n: sum(len(c[0]) for c in a) for n, a in answers.items()}
    rows = {}
    print(f"\n{len(samples)} prompts, greedy, at most {args.max_new_tokens} new tokens, {args.reps} reps (mean ± sample SD)")
    print("| engine | start-up s | prompts/s | new tokens/s |\n| --- | --- | --- | --- |")
    for n, ts in times.items():
        rates = [len(samples) / t for t in ts]
        toks = [new_tokens[n] / t for t in ts]
        rows[n] = {"startup_s": startup[n], "seconds": ts, "prompts_per_s": statistics.mean(rates),
                   "prompts_per_s_sd": statistics.stdev(rates) if len(rates) > 1 else 0.0,
                   "new_tokens_per_s": statistics.mean(toks), "new_tokens": new_tokens[n]}
        print(f"| {n} | {startup[n]:.1f} | {rows[n]['prompts_per_s']:.1f} ± {rows[n]['prompts_per_s_sd']:.1f} | "
              f"{rows[n]['new_tokens_per_s']:.0f} |")
    result = {"model": str(args.model), "prompts": len(samples), "max_new_tokens": args.max_new_tokens, "rows": rows}
    if len(answers) == 2:
        same = sum(a == b for a, b in zip(answers["hf"], answers["vllm"], strict=True))
        result["same_answers"] = same
        result["ratio_vllm_to_hf"] = statistics.mean(times["hf"]) / statistics.mean(times["vllm"])
        print(f"vLLM : transformers speed {result['ratio_vllm_to_hf']:.2f}x; same answers on {same}/{len(samples)} prompts")
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
