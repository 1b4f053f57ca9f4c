"""A KD step from the cache against an SFT step, side by side in one run: the same student, cache,
batch size and data order, recipes run in alternating rounds so that machine noise hits both alike.

Each row runs a recipe for `--steps` optimizer steps through `train_student_run` (the real trainer:
cache read and decode, collate, forward, the terms, backward, update) and takes the median of the
trainer's own `step_seconds` after `--warmup` steps; rounds alternate the recipe order. With
`--data-workers 0,1` each recipe runs with the cache decoded on the trainer's thread and in a worker.
Prints a table (median, sample SD over rounds, ratio to the first recipe, the first stage's trainable
parameters and their AdamW state: what a LoRA student saves) and writes JSON.

    python tools/bench_step.py --cache demo/cache --recipes sft,mdist,align_kd --rounds 3 --json step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--recipes", default="sft,mdist")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data-workers", default="0,1", help="comma-separated: 0 (trainer's thread), 1 (a worker)")
    ap.add_argument("--val", type=Path, default=None, help="validation manifest (default: the cache's own)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from vlmkd.train.loop import stage_optimizer
    from vlmkd.train.student import prepare_student, train_student_run

    trainable, model_mib = {}, {}
    for recipe in args.recipes.split(","):
        prep = prepare_student(ROOT / "pipelines" / f"{recipe}.yaml", args.cache, val=args.val, data_workers=0)
        params, _ = stage_optimizer(prep.model, prep.objective, prep.recipe.stages[0])  # what the loop trains
        trainable[recipe] = sum(p.numel() for p in params)
        # the student's weights and buffers as held in memory (a QLoRA base as int8 levels + scales)
        model_mib[recipe] = sum(t.numel() * t.element_size()
                                for t in [*prep.model.parameters(), *prep.model.buffers()]) / 2**20

    rows = [(r, int(w)) for r in args.recipes.split(",") for w in args.data_workers.split(",")]
    per: dict[str, list[float]] = {f"{r} w{w}": [] for r, w in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = rows if rnd % 2 == 0 else rows[::-1]
            for recipe, workers in order:
                run = Path(tmp) / f"{recipe}-w{workers}-{rnd}"
                # eval_every past the run: the step times are the training steps only
                train_student_run(ROOT / "pipelines" / f"{recipe}.yaml", args.cache, run, val=args.val,
                                  max_steps=args.steps, data_workers=workers)
                steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
                secs = [r["step_seconds"] for r in steps if r["kind"] == "train" and r["step"] > args.warmup]
                per[f"{recipe} w{workers}"].append(statistics.median(secs))
    base = statistics.mean(next(iter(per.values())))
    table = []
    print(f"{'recipe':<18} {'median step s':>14} {'SD (sample)':>12} {'x first':>8} {'trainable':>10} {'AdamW MiB':>10} {'model MiB':>10}")
    for name, vals in per.items():
        m = statistics.mean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        n, mib = trainable[name.rsplit(" ", 1)[0]], model_mib[name.rsplit(" ", 1)[0]]
        adam = 2 * 4 * n / 2**20  # two float32 moments per trainable parameter
        table.append({"row": name, "step_seconds": m, "sd": sd, "ratio": m / base, "rounds": vals,
                      "trainable_params": n, "adamw_state_mib": adam, "model_mib": mib})
        print(f"{name:<18} {m:>14.4f} {sd:>12.4f} {m / base:>8.2f} {n:>10,} {adam:>10.2f} {mib:>10.2f}")
    out = {"cache": str(args.cache), "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
           "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(), "rows": table}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
