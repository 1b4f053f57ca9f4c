"""Each seed paper's ablation, reproduced side by side, in two regimes, from one cache per regime.

    python tools/ablations.py --regime pretrained --out ablations   # the papers' regime
    python tools/ablations.py --regime scratch --out ablations      # today's demo regime
    python tools/ablations.py --report --out ablations              # both regimes' tables + chart

A regime folder OUT/REGIME/ holds its data, teacher and one teacher cache (`vlmkd.demo.PRETRAINED` or
`SCRATCH`: 6,000 training questions, 3,000 captions, preference pairs; the pretrained regime also 20,000
text-only rows and its pretrained student LLM, OUT/pretrained/student_lm), built once and reused. Every
row of pipelines/ablations/PAPER/ROW.yaml trains `--seeds` students from that cache (600 steps each),
scored on the test split (greedy, first word) and on held-out NLL (per answer token, the validation
split). The regime adapts each recipe (OUT/REGIME/recipes/): `pretrained` starts the student's LLM from
student_lm (`model.text_from`); `scratch` trains the LLM also in the projector-only stages (its LLM
has read nothing). Rows run `--workers` at a time (one thread each), and a finished run (its
score.json) is not run again. Results: OUT/REGIME/results.json; OUT/ABLATIONS.md, OUT/ablations.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import aggregate, cell, code_commit, parameter_counts, run_log  # noqa: E402

ABLATIONS = ROOT / "pipelines" / "ablations"
# each paper's rows in the order its ablation adds them; the last row is the paper's method
TABLES = {"llava_kd": ["sft", "mdist", "mdist_rdist", "three_stages"],
          "align_kd": ["logit", "attn", "align", "both"],
          "llava_mod": ["dense", "moe", "moe_pref"]}
LABELS = {"llava_kd/sft": "SFT (PT → SFT, no KD)", "llava_kd/mdist": "+ MDist in DFT (PT → SFT → DFT)",
          "llava_kd/mdist_rdist": "+ RDist in DFT", "llava_kd/three_stages": "+ DPT: all three stages (LLaVA-KD)",
          "align_kd/logit": "logit KD", "align_kd/attn": "+ shallow attention", "align_kd/align": "+ projection alignment",
          "align_kd/both": "+ both (Align-KD)", "llava_mod/dense": "dense KD",
          "llava_mod/moe": "MoE KD, equal active parameters (4 experts, top-1)",
          "llava_mod/moe_pref": "+ preference distillation (LLaVA-MoD)"}
REGIMES = ("scratch", "pretrained")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--regime", choices=REGIMES, default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows", default=None, help="comma-separated PAPER/ROW or PAPER (default: every row)")
    ap.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--max-steps", type=int, default=None, help="cap every stage (a plumbing check, not a row)")
    ap.add_argument("--report", action="store_true", help="only write OUT/ABLATIONS.md and OUT/ablations.png")
    args = ap.parse_args()
    if args.regime:
        run_regime(args.out, args.regime, range(args.seeds), select_rows(args.rows), args.workers, args.max_steps)
    if args.report or args.regime:
        report(args.out)


def select_rows(spec: str | None) -> list[str]:
    every = [f"{t}/{r}" for t, rows in TABLES.items() for r in rows]
    if not spec:
        return every
    out = []
    for part in spec.split(","):
        hits = [k for k in every if k == part or k.split("/")[0] == part]
        if not hits:
            raise SystemExit(f"--rows {part!r}: not a row; rows are {every}")
        out += hits
    return out


def regime_recipe(row: str, regime: str, lm: Path | None, folder: Path) -> Path:
    """pipelines/ablations/ROW.yaml as the regime runs it (`vlmkd.demo.regime_recipe`)."""
    from vlmkd.demo import regime_recipe as adapt

    return adapt(ABLATIONS / f"{row}.yaml", regime, lm, folder / "recipes" / f"{row}.yaml")


def build_regime(out: Path, regime: str) -> dict:
    """The regime's data, teacher, cache (and pretrained student LLM), built once."""
    from vlmkd.demo import PRETRAINED, SCRATCH
    from vlmkd.demo import build_regime as build

    folder = out / regime
    data, teacher, cache, lm = build(folder, PRETRAINED if regime == "pretrained" else SCRATCH)
    return {"folder": folder, "data": data, "teacher": teacher, "cache": cache, "student_lm": lm}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def train_and_score(recipe: str, cache: str, run_dir: str, val: str, test: str, seed: int,
                    max_steps: int | None = None) -> dict:
    """One student: trained from the cache, scored on the test split; its score.json (kept)."""
    from vlmkd.eval.run import evaluate_model
    from vlmkd.train.student import train_student_run

    run = Path(run_dir)
    done = run / "score.json"
    if done.is_file():
        return json.loads(done.read_text())
    t = time.time()
    res = train_student_run(Path(recipe), Path(cache), run, val=Path(val), seed=seed, max_steps=max_steps)
    secs = time.time() - t
    sc = evaluate_model(res.model_dir, Path(test))
    sc.update(run_log(run), train_seconds=secs)
    sc["params"] = parameter_counts(res.model_dir)
    done.write_text(json.dumps(sc, indent=1))
    return sc


def run_regime(out: Path, regime: str, seeds, rows: list[str], workers: int, max_steps: int | None = None) -> dict:
    from vlmkd.eval.run import evaluate_model

    built = build_regime(out, regime)
    folder, data = built["folder"], built["data"]
    results_path = folder / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if "teacher" not in results:
        results["teacher"] = evaluate_model(built["teacher"], data / "test.json")
    jobs = {}
    for row in rows:
        recipe = regime_recipe(row, regime, built["student_lm"], folder)
        for seed in seeds:
            jobs[(row, seed)] = (str(recipe), str(built["cache"]), str(folder / "students" / row / f"seed{seed}"),
                                 str(data / "val.json"), str(data / "test.json"), seed, max_steps)
    scores: dict = {}

    def said(key, sc):
        scores[key] = sc
        print(f"{regime} {key[0]} seed {key[1]}: accuracy {sc['accuracy']:.3f}, held-out NLL {sc['val_nll']:.4f}",
              flush=True)

    if workers == 1:  # in this process, with its threads
        for key, job in jobs.items():
            said(key, train_and_score(*job))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
            futures = {key: pool.submit(train_and_score, *job) for key, job in jobs.items()}
            for key, fut in futures.items():
                said(key, fut.result())
    for row in rows:
        per_seed = [scores[(row, s)] for s in seeds]
        results[row] = aggregate(per_seed)
        results[row]["params"] = per_seed[0]["params"]
        results[row]["nll_seeds"] = [r["val_nll"] for r in per_seed]
    results["commit"] = code_commit()
    results_path.write_text(json.dumps(results, indent=1))
    return results


def report(out: Path) -> str:
    res = {r: json.loads((out / r / "results.json").read_text()) for r in REGIMES if (out / r / "results.json").is_file()}
    commits = ", ".join(f"{r}: {v.get('commit', '?')}" for r, v in res.items())
    lines = [f"Each paper's ablation in two regimes, one teacher cache per regime; students of one size, 600 "
             f"steps × 32 samples; mean ± sample SD over the seeds (runs); test split accuracy (greedy, first "
             f"word) and held-out NLL per answer token (validation split). Command: `python tools/ablations.py "
             f"--regime REGIME --out {out}`; code at {commits}.", ""]
    lines.append("| teacher | " + " | ".join(f"{r}: {v['teacher']['accuracy']:.3f}" for r, v in res.items()) + " |")
    lines.append("| --- |" + " --- |" * len(res))
    for table, rows in TABLES.items():
        lines += ["", f"**{table}**", "", "| row | " + " | ".join(f"{r} accuracy | {r} held-out NLL" for r in res) + " | runs |",
                  "| --- |" + " --- | --- |" * len(res) + " --- |"]
        for row in rows:
            key = f"{table}/{row}"
            cells = []
            for r in res.values():
                x = r.get(key)
                cells += [cell(x["accuracy"]) if x else "", cell(x["val_nll"], 4) if x else ""]
            runs = "/".join(str(r[key]["runs"]) for r in res.values() if key in r)
            lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + f" | {runs} |")
    for regime, r in res.items():  # where the rows differ: accuracy per question type, and the seeds
        types = sorted(r["teacher"]["per_type"])
        lines += ["", f"Per question type, {regime} regime (mean over seeds; the seeds' accuracies last):", "",
                  "| row | " + " | ".join(types) + " | seeds |", "| --- |" + " --- |" * (len(types) + 1),
                  "| teacher | " + " | ".join(f"{r['teacher']['per_type'][t]['accuracy']:.3f}" for t in types) + " | |"]
        for table, rows in TABLES.items():
            for row in rows:
                x = r.get(f"{table}/{row}")
                if x:
                    lines.append(f"| {table}/{row} | " + " | ".join(f"{x['per_type'][t]['mean']:.3f}" for t in types)
                                 + " | " + ", ".join(f"{a:.3f}" for a in x["seeds"]) + " |")
    text = "\n".join(lines) + "\n"
    (out / "ABLATIONS.md").write_text(text)
    chart(res, out / "ablations.png")
    print(text)
    return text


def chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TABLES), figsize=(16, 4.8), sharey=True)
    for ax, (table, rows) in zip(axes, TABLES.items(), strict=True):
        width = 0.8 / max(1, len(res))
        for j, (regime, r) in enumerate(res.items()):
            keys = [f"{table}/{row}" for row in rows]
            xs = [i + (j - (len(res) - 1) / 2) * width for i in range(len(rows))]
            means = [r[k]["accuracy"]["mean"] if k in r else 0 for k in keys]
            sds = [r[k]["accuracy"]["std"] if k in r else 0 for k in keys]
            ax.bar(xs, means, width, yerr=sds, capsize=3, label=f"{regime} (teacher {r['teacher']['accuracy']:.2f})",
                   color=f"C{j}")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([LABELS[f"{table}/{row}"].split(" (")[0] for row in rows], rotation=25, ha="right", fontsize=8)
        ax.set_title(table)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean ± sample SD)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
