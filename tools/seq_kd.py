"""Teacher-written answers and on-policy rounds against the data set's answers (#24).

From a demo folder (data/, teacher/, cache/ as `vlmkd demo` or vlmkd.demo.build_teacher_and_cache
make them): the teacher answers every training prompt greedily (`vlmkd generate`), the answers are
cached (`cache-teacher`, the demo's settings), and students of the demo's shape train, each over
several seeds, 600 steps in all:
- sft: ce on the data set's answers;            seq_kd_ce: ce on the teacher's answers (Kim & Rush);
- mdist: ce + res + vis on the data set's;      seq_kd: ce + res + vis on the teacher's answers;
- on_policy: pipelines/on_policy.yaml (300 steps of mdist, then one round: the student samples
  answers for half the prompts, the teacher scores them, 300 steps of res + vis);
- two_stage_off: the same two stages with no round (the data set's answers throughout): the control
  that separates the on-policy data from the round's schedule and terms.
Test accuracy (first word) and held-out NLL of the data set's validation answers, mean and sample SD.

    python tools/seq_kd.py --demo DIR --out OUT [--seeds 3] [--rows sft,seq_kd_ce,mdist,seq_kd,on_policy]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from reproduce import mean_std  # noqa: E402

from vlmkd.eval.run import evaluate_model  # noqa: E402
from vlmkd.generate.engines import Sampling  # noqa: E402
from vlmkd.generate.job import GenerateJob, run_generate  # noqa: E402
from vlmkd.generate.rounds import run_rounds  # noqa: E402
from vlmkd.teacher.job import CacheJob, run_cache_job  # noqa: E402
from vlmkd.teacher.settings import extraction_from  # noqa: E402
from vlmkd.train.student import train_student_run  # noqa: E402

PIPES = ROOT / "pipelines"
ROWS = {"sft": ("sft.yaml", "data"), "seq_kd_ce": ("sft.yaml", "teacher"), "mdist": ("mdist.yaml", "data"),
        "seq_kd": ("seq_kd.yaml", "teacher"), "on_policy": ("on_policy.yaml", "data"),
        # on_policy.yaml's two stages with no round: the same schedule and terms, the data set's answers only
        "two_stage_off": ("two_stage_off.yaml", "data")}


def two_stage_off(out: Path) -> Path:
    """on_policy.yaml's round-0 stage and then its round stage, both on the data set's cache."""
    raw = yaml.safe_load((PIPES / "on_policy.yaml").read_text())
    op = raw.pop("on_policy")
    raw.update(name="two_stage_off", model=str(PIPES / raw["model"]), stages=raw["stages"] + op["stages"])
    path = out / "two_stage_off.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def last_eval(run: Path) -> dict:
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in evals if m["kind"] == "eval"][-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--backend", default="hf", help="the teacher's generation engine")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data, teacher, base = args.demo / "data", args.demo / "teacher", args.demo / "cache"
    answers = args.out / "teacher_answers.jsonl"
    t0 = time.time()
    gen = run_generate(GenerateJob(teacher, data / "train.json", answers, Sampling(max_new_tokens=8), args.backend))
    t_gen = time.time() - t0
    t_cache = args.out / "cache_teacher_answers"
    run_cache_job(CacheJob(teacher, answers, t_cache, extraction_from(PIPES / "cache.yaml"), "hf", val=data / "val.json"))
    agree = _agreement(answers)
    out_json = args.out / "seq_kd.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {"rows": {}}
    results.update(generation=gen["counts"], generation_seconds=gen["seconds"], teacher_answer_agreement=agree,
                   wall_generate_seconds=t_gen)
    if "teacher" not in results:
        results["teacher"] = evaluate_model(teacher, data / "test.json")["accuracy"]
    for name in args.rows.split(","):
        recipe, which = ROWS[name]
        rows = []
        for seed in range(args.seeds):
            run = args.out / name / f"seed{seed}"
            if name == "on_policy":
                s = run_rounds(PIPES / recipe, teacher, str(base), run, seed=seed)
                model, metrics = Path(s["rounds"][-1]["student"]), Path(s["rounds"][-1]["student"]).parent
            else:
                path = two_stage_off(args.out) if name == "two_stage_off" else PIPES / recipe
                res = train_student_run(path, base if which == "data" else t_cache, run,
                                        val=data / "val.json", seed=seed)
                model, metrics = res.model_dir, run
            sc = evaluate_model(model, data / "test.json")
            rows.append({"seed": seed, "accuracy": sc["accuracy"], "val_nll": last_eval(metrics)["val_nll"],
                         "per_type": sc["per_type"]})
            print(f"{name} seed {seed}: accuracy {sc['accuracy']:.3f}, held-out NLL {rows[-1]['val_nll']:.4f}", flush=True)
        results["rows"][name] = {"seeds": rows, "accuracy": mean_std([r["accuracy"] for r in rows]),
                                 "val_nll": mean_std([r["val_nll"] for r in rows])}
        out_json.write_text(json.dumps(results, indent=1))
    print(f"\nteacher test accuracy {results['teacher']:.3f}; teacher answers: {gen['counts']['answers']} in {gen['seconds']:.0f} s; {100 * agree:.1f} % match the data "
          "set's answer (first word)")
    print("\n| student | answers it learns | test accuracy | held-out NLL |\n| --- | --- | --- | --- |")
    for name, r in results["rows"].items():
        a, n = r["accuracy"], r["val_nll"]
        print(f"| {name} | {ROWS[name][1]} | {a['mean']:.3f} ± {a['std']:.3f} | {n['mean']:.4f} ± {n['std']:.4f} |")
    print("(mean ± sample SD over seeds)")


def _agreement(answers: Path) -> float:
    """The share of teacher answers whose first word is the data set's answer's."""
    from vlmkd.eval.score import first_word

    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    hits = [first_word(r["conversations"][-1]["value"]) == first_word(r["generation"]["replaced"] or "") for r in rows]
    return sum(hits) / len(hits)


if __name__ == "__main__":
    main()
