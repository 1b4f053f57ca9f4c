"""Training metrics a person can plot: JSONL while running, CSV and PNG curves from it."""

from __future__ import annotations

import csv
import json
from pathlib import Path


class MetricsLog:
    """Appends one JSON row per logged step; rows of a resumed run past its checkpoint are dropped."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [r for r in read_rows(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run: the resume rewrites it
    return rows


def write_csv(run_dir: Path) -> Path:
    rows = read_rows(run_dir / "metrics.jsonl")
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    out = run_dir / "metrics.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return out


def plot_run(run_dir: str | Path) -> Path:
    """curves.png: every loss term against step (log scale), LR, and eval accuracy when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_rows(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    terms = sorted({k for r in train for k in r if k.startswith("loss")})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for t in terms:
        # NaN where a stage does not have the term, so the line breaks instead of bridging stages
        ys = [r[t] if r.get(t) is not None and r[t] > 0 else float("nan") for r in train]
        if any(y == y for y in ys):
            axes[0].plot([r["step"] for r in train], ys, label=t, lw=1)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss terms")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    if train:
        axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set_title("learning rate")
    axes[1].set_xlabel("step")
    if evals:
        steps = [r["step"] for r in evals]
        axes[2].plot(steps, [r["val_accuracy"] for r in evals], marker="o", label="val accuracy")
        types = sorted({k for r in evals for k in r if k.startswith("val_acc_")})
        for t in types:
            axes[2].plot(steps, [r.get(t) for r in evals], lw=0.8, alpha=0.7, label=t[8:])
        axes[2].set_ylim(0, 1)
        axes[2].legend(fontsize=7)
    axes[2].set_title("held-out accuracy")
    axes[2].set_xlabel("step")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
