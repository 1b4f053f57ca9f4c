"""A student with another tokenizer than the teacher's, trained from one teacher cache (#28).

Trains a byte-level BPE tokenizer with another vocabulary size on the data set's training texts,
then students of the demo student's shape with that tokenizer: SFT (no KD), ce + uld (the GOLD
hybrid: exact-match KL on shared single-token spans, ULD elsewhere) and ce + uld with
`uld_hybrid: false` (ULD on every span), each over several seeds; test accuracy and held-out NLL (per
student token: comparable between these rows, which share the tokenizer), mean and sample SD.

    python tools/cross_tokenizer.py --demo DIR --cache DIR/cache_text --out OUT [--seeds 3] [--vocab 384]

The cache must be built with --keep-text (e.g. `vlmkd cache-teacher --recipe pipelines/cache.yaml --keep-text`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from reproduce import mean_std  # noqa: E402

from vlmkd.data.manifest import load_samples  # noqa: E402
from vlmkd.eval.run import evaluate_model  # noqa: E402
from vlmkd.models.tokenizer import train_tokenizer  # noqa: E402
from vlmkd.train.student import train_student_run  # noqa: E402

ROWS = {"sft": {"ce": 1.0}, "uld_hybrid": {"ce": 1.0, "uld": 1.0}, "uld_only": {"ce": 1.0, "uld": 1.0},
        # references with the teacher's own tokenizer (their NLL is per teacher token: not comparable)
        "sft_teacher_tok": {"ce": 1.0}, "res_teacher_tok": {"ce": 1.0, "res": 1.0}}


def recipe(name: str, tokenizer: Path, out: Path, steps: int) -> Path:
    base = yaml.safe_load((ROOT / "pipelines" / "sft.yaml").read_text())
    model = yaml.safe_load((ROOT / "pipelines" / "models" / "student.yaml").read_text())
    stage = {**base["stages"][0], "name": "kd", "steps": steps, "losses": ROWS[name]}
    if name == "uld_only":
        stage["loss_args"] = {"uld_hybrid": False}
    if not name.endswith("_teacher_tok"):
        model = {**model, "tokenizer": str(tokenizer)}
    doc = {**base, "name": name, "model": model, "stages": [stage]}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="a demo folder (data/ and teacher/)")
    ap.add_argument("--cache", type=Path, required=True, help="a teacher cache built with --keep-text")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=384, help="the student tokenizer's vocabulary (the teacher's: 512)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rows", default="sft,uld_hybrid,uld_only")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.demo / "data"
    tok_dir = args.out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        samples, _ = load_samples(data / "train.json")
        texts = [t.text.replace("<image>", "") for s in samples for t in s.turns]
        train_tokenizer(texts, vocab_size=args.vocab).save_pretrained(str(tok_dir))
    out_json = args.out / "cross_tokenizer.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {"vocab": args.vocab, "rows": {}}
    results["cache"] = str(args.cache)
    for name in args.rows.split(","):
        rows = []
        for seed in range(args.seeds):
            run = args.out / name / f"seed{seed}"
            res = train_student_run(recipe(name, tok_dir, args.out, args.steps), args.cache, run,
                                    val=data / "val.json", seed=seed)
            sc = evaluate_model(res.model_dir, data / "test.json")
            evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            evals = [m for m in evals if m["kind"] == "eval"]
            rows.append({"seed": seed, "accuracy": sc["accuracy"], "val_nll": evals[-1]["val_nll"],
                         "per_type": sc["per_type"]})
            print(f"{name} seed {seed}: accuracy {sc['accuracy']:.3f}, held-out NLL {evals[-1]['val_nll']:.4f}", flush=True)
        results["rows"][name] = {"seeds": rows, "accuracy": mean_std([r["accuracy"] for r in rows]),
                                 "val_nll": mean_std([r["val_nll"] for r in rows])}
        out_json.write_text(json.dumps(results, indent=1))
    print(f"\n| student (tokenizer {args.vocab} ids) | test accuracy | held-out NLL |\n| --- | --- | --- |")
    for name, r in results["rows"].items():
        a, n = r["accuracy"], r["val_nll"]
        print(f"| {name} | {a['mean']:.3f} ± {a['std']:.3f} | {n['mean']:.4f} ± {n['std']:.4f} |")
    print("(mean ± sample SD over seeds)")


if __name__ == "__main__":
    main()
