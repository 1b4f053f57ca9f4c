"""The proof: students of one size, one budget, one cache, trained under each recipe; scored.

Uses a finished demo folder (`vlmkd demo --out DEMO`: its data, teacher and cache), trains every
recipe below for the same steps, data and seed (3 seeds; 1 with --quick), and writes
DIR/students/RECIPE/seedK/ (HF format in model/), DIR/results.json, DIR/results.png and
docs/RESULTS.md-style markdown (DIR/RESULTS.md).

    python tools/reproduce.py --demo demo --out repro [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["sft", "logit_kd", "mdist", "mdist_rdist", "llava_kd", "align_kd"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="a finished `vlmkd demo` folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="1 seed and a third of the steps")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of the rows")
    args = ap.parse_args()

    from vlmkd.eval.run import evaluate_model
    from vlmkd.train.student import train_student_run

    seeds = range(args.seeds or (1 if args.quick else 3))
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = {name: ROOT / "pipelines" / f"{name}.yaml" for name in RECIPES}  # every row a shipped recipe
    data = args.demo / "data"
    results: dict = {"teacher": evaluate_model(args.demo / "teacher", data / "test.json", limit=args.test_limit)}
    results["teacher"]["runs"] = 1
    chosen = [r for r in RECIPES if r in args.recipes.split(",")]
    for name in chosen:
        rows = []
        for seed in seeds:
            run = args.out / "students" / name / f"seed{seed}"
            t = time.time()
            res = train_student_run(recipes[name], args.demo / "cache", run, val=data / "val.json",
                                    max_steps=200 if args.quick else None, seed=seed)
            secs = time.time() - t
            sc = evaluate_model(res.model_dir, data / "test.json", limit=args.test_limit)
            metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            evals = [m for m in metrics if m["kind"] == "eval"]
            sc["val_nll"] = evals[-1]["val_nll"] if evals else None
            sc["train_seconds"] = secs
            sc["steps"] = res.steps
            sc["step_seconds"] = secs / max(res.steps, 1)
            rows.append(sc)
        results[name] = aggregate(rows)
    previous = args.out / "results.json"
    if previous.is_file():  # rows of recipes not re-run this time are kept
        results = {**json.loads(previous.read_text()), **results}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "RESULTS.md").write_text(markdown(results, args))
    chart(results, args.out / "results.png")
    print((args.out / "RESULTS.md").read_text())


def aggregate(rows: list[dict]) -> dict:
    def ms(vals):
        vals = [v for v in vals if v is not None]
        return {"mean": statistics.mean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0}

    types = sorted({t for r in rows for t in r["per_type"]})
    return {"runs": len(rows), "accuracy": ms([r["accuracy"] for r in rows]),
            "per_type": {t: ms([r["per_type"][t]["accuracy"] for r in rows if t in r["per_type"]]) for t in types},
            "val_nll": ms([r["val_nll"] for r in rows]), "step_seconds": ms([r["step_seconds"] for r in rows]),
            "n": rows[0]["n"], "seeds": [r["accuracy"] for r in rows]}


def markdown(results: dict, args) -> str:
    types = sorted(results["teacher"]["per_type"])
    head = "| model | runs | accuracy | " + " | ".join(types) + " | held-out NLL | s / step |\n"
    head += "| --- " * (len(types) + 5) + "|\n"
    lines = []
    t = results["teacher"]
    lines.append(f"| teacher | 1 | {t['accuracy']:.3f} | " + " | ".join(f"{t['per_type'][x]['accuracy']:.3f}" for x in types)
                 + " | | |")
    for name in [n for n in RECIPES if n in results]:
        r = results[name]
        cell = lambda m: f"{m['mean']:.3f} ± {m['std']:.3f}"  # noqa: E731
        lines.append(f"| {name} | {r['runs']} | {cell(r['accuracy'])} | " + " | ".join(cell(r["per_type"][x]) for x in types)
                     + f" | {cell(r['val_nll'])} | {r['step_seconds']['mean']:.3f} |")
    return (f"Students trained from one cache, same steps, data and seed per row; mean ± std over "
            f"the seeds given in the runs column; n = {results['teacher']['n']} test questions.\n"
            f"Command: `python tools/reproduce.py --demo {args.demo} --out {args.out}{' --quick' if args.quick else ''}`\n\n"
            + head + "\n".join(lines) + "\n")


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [n for n in RECIPES if n in results]
    names = ["teacher", *rows]
    means = [results["teacher"]["accuracy"]] + [results[n]["accuracy"]["mean"] for n in rows]
    stds = [0.0] + [results[n]["accuracy"]["std"] for n in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, means, yerr=stds, color=["#555"] + ["#4a7"] * len(rows), capsize=4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title("shapes: students from one teacher cache")
    for i, m in enumerate(means):
        ax.text(i, m + 0.02, f"{m:.2f}", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
