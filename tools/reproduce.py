"""The proof: students of one size, one budget, one cache, trained under each recipe; scored.

Uses a finished demo folder (`vlmkd demo --out DEMO`: its data, teacher and cache), trains every
recipe below for the same steps, data and seed (3 seeds), and writes DIR/students/RECIPE/seedK/
(HF format in model/), DIR/results.json, DIR/results.png (accuracy), DIR/curves.png (learning
curves) and DIR/RESULTS.md (the table and the cost of each recipe).

    python tools/reproduce.py --demo demo --out repro
    python tools/reproduce.py --quick --out repro-quick    # CI: builds its own small teacher + cache
    python tools/reproduce.py --demo demo --out repro --recipes mdist --cache-variants sampled:50,topk:4

--cache-variants: extra rows of the `mdist` recipe (L_res + L_vis) trained from other caches of the
same teacher over the training questions (DEMO/data/train_questions.json): `sampled:N` (Random-
Sampling KD, N draws at t = 1), `topk:K` or `topp:P` (adaptive k up to 64); logits only (no attention or hidden states), built once
under DIR/caches/ through the transformers backend; each row reports its bytes per scored token.

--second-teacher DIR: another teacher with the same tokenizer: its own score, and mdist rows from its
cache alone and from both caches (`--teacher-weights`, `--second-teacher-rows`). --ptq RECIPE:BITS:GROUP:
that row's students quantised after training (`vlmkd.models.quant`, GROUP 0 = per channel), the
baseline of the qat_* rows, which score their integer export.

--quick also runs the pretrained-student rows (PRETRAINED_ROWS, one seed): the papers' regime of
tools/ablations.py (DIR/pretrained: the image first, teacher and student LLMs pretrained on text, one
cache), the same as docs/RESULTS.md's ablation tables, so CI trains that regime end to end.

--quick without --demo builds DIR/demo first (vlmkd.demo.MINI: 6,000 training questions, no
captions, pipelines/teacher_quick.yaml: 1,600 teacher steps to ~0.86, a cache through the transformers
backend), then trains one seed of sft, logit_kd and mdist at the recipes' own budget: about 9 minutes
on 2 cores (teacher 6, cache 0.4, students 2.2); the pretrained-student rows add about 25 (their
teacher 14, cache 6, student LLM 2, two students 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["sft", "logit_kd", "mdist", "mdist_rdist", "llava_kd", "align_kd", "llava_mod", "contrastive", "layer_map",
           "qat_int4", "qat_int4_pc"]
# llava_mod_pd (all three LLaVA-MoD parts) needs preference pairs: --cache-variants llava_mod_pd@pairs:64
QUICK_RECIPES = ["sft", "logit_kd", "mdist"]
PRETRAINED_ROWS = ["llava_kd/sft", "llava_kd/mdist"]  # --quick: tools/ablations.py rows in the pretrained regime
TEACHER_BATCH = 32  # the recipes' batch size: the online teacher forward is timed on one such batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=None, help="a finished `vlmkd demo` folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="1 seed; sft, logit_kd, mdist; builds a small teacher without --demo")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--recipes", default=None, help="comma-separated subset of the rows (none: variants only)")
    ap.add_argument("--cache-variants", default="", help="e.g. sampled:50,topk:4 (mdist rows from other caches)")
    ap.add_argument("--second-teacher", type=Path, default=None,
                    help="another teacher (same tokenizer): its own row, mdist from its cache alone, and mdist "
                         "from both caches (average 0.5/0.5 and most-confident)")
    ap.add_argument("--teacher-weights", default="0.5,0.5",
                    help="--second-teacher: the average row's weights (first teacher, second)")
    ap.add_argument("--second-teacher-rows", default="alone,average,confidence",
                    help="--second-teacher: which of its rows to run")
    ap.add_argument("--ptq", default="", help="RECIPE:BITS:GROUP, e.g. mdist:4:32: that row's students quantised "
                                              "after training (vlmkd quantize), scored as a row of their own")
    args = ap.parse_args()
    run(args)


def run(args) -> dict:
    from vlmkd.cache.manifest import read_manifest, totals
    from vlmkd.demo import MINI, build_teacher_and_cache
    from vlmkd.eval.run import evaluate_model
    from vlmkd.models.build import load_model
    from vlmkd.models.quant import QuantSpec, export_quantized
    from vlmkd.train.student import train_student_run

    args.out.mkdir(parents=True, exist_ok=True)
    if args.demo is None:
        if not args.quick:
            raise SystemExit("--demo DIR is needed (a finished `vlmkd demo`); only --quick builds its own")
        data, teacher, cache = build_teacher_and_cache(args.out / "demo", MINI)
        args.demo = args.out / "demo"
    else:
        data, teacher, cache = args.demo / "data", args.demo / "teacher", args.demo / "cache"
    seeds = range(args.seeds or (1 if args.quick else 3))
    steps = MINI["student_steps"] if args.quick else None  # the recipes' own steps (600)
    wanted = args.recipes.split(",") if args.recipes else (QUICK_RECIPES if args.quick else RECIPES)
    wanted = [] if wanted == ["none"] else wanted  # --recipes none: only the --cache-variants rows
    unknown = sorted(set(wanted) - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; rows are {RECIPES}")
    results: dict = {"teacher": evaluate_model(teacher, data / "test.json", limit=args.test_limit)}
    results["teacher"]["runs"] = 1
    jobs = [(name, name, cache) for name in RECIPES if name in wanted]
    for entry in filter(None, args.cache_variants.split(",")):
        recipe, _, spec = entry.rpartition("@")  # RECIPE@SPEC; the recipe defaults to mdist
        variant_cache = build_variant_cache(spec, data, teacher, args.out / "caches")
        jobs.append((f"{recipe or 'mdist'}+{spec}", recipe or "mdist", variant_cache))
    mixes, weights = {}, None
    if args.second_teacher:
        results["teacher_b"] = evaluate_model(args.second_teacher, data / "test.json", limit=args.test_limit)
        results["teacher_b"]["runs"] = 1
        cache_b = build_second_cache(args.second_teacher, cache, args.out / "caches" / "teacher_b")
        which = args.second_teacher_rows.split(",")
        if "alone" in which:
            jobs.append(("mdist+teacherB", "mdist", cache_b))
        weights = [float(x) for x in args.teacher_weights.split(",")]
        for mode in (m for m in ("average", "confidence") if m in which):
            name = "mdist+2teachers" + ("-confidence" if mode == "confidence" else
                                        "" if weights == [0.5, 0.5] else f"-w{weights[0]:g}")
            jobs.append((name, "mdist", [cache, cache_b]))
            mixes[name] = mode

    for name, recipe, row_cache in jobs:
        rows = []
        for seed in seeds:
            run_dir = args.out / "students" / name.replace(":", "") / f"seed{seed}"
            t = time.time()
            res = train_student_run(ROOT / "pipelines" / f"{recipe}.yaml", row_cache, run_dir, val=data / "val.json",
                                    max_steps=steps, seed=seed, teacher_mix=mixes.get(name, "average"),
                                    teacher_weights=weights if name in mixes else None)
            secs = time.time() - t
            exported = sorted(res.model_dir.parent.glob(f"{res.model_dir.name}_w*"))  # a QAT student's export
            fake_quant = None
            if exported:  # the row scores the real integer export; the fake-quantised model beside it
                fake_quant = evaluate_model(res.model_dir, data / "test.json", limit=args.test_limit)["accuracy"]
            sc = evaluate_model(exported[0] if exported else res.model_dir, data / "test.json", limit=args.test_limit)
            sc["fake_quant_accuracy"] = fake_quant
            logged = run_log(run_dir)
            sc.update(val_nll=logged["val_nll"], step_seconds=logged["step_seconds"], train_seconds=secs, steps=res.steps)
            sc["params"] = parameter_counts(res.model_dir)
            rows.append(sc)
        results[name] = aggregate(rows)
        results[name]["params"] = rows[0]["params"]
        caches = row_cache if isinstance(row_cache, list) else [row_cache]
        results[name]["logit_bytes_per_token"] = sum(logit_bytes(c) for c in caches)
        if rows[0].get("fake_quant_accuracy") is not None:
            results[name]["fake_quant_accuracy"] = mean_std([r["fake_quant_accuracy"] for r in rows])
    for entry in filter(None, args.ptq.split(",")):
        recipe, bits, group = entry.split(":")
        name = f"{recipe}+ptq-w{bits}g{group}"
        rows = []
        for seed in seeds:
            src = args.out / "students" / recipe / f"seed{seed}" / "model"
            dst = src.with_name(f"model_ptq_w{bits}g{group}")
            m, tok = load_model(src)
            export_quantized(m, QuantSpec(int(bits), int(group) or None), tok, dst)
            sc = evaluate_model(dst, data / "test.json", limit=args.test_limit)
            sc.update(val_nll=None, step_seconds=None, params=parameter_counts(src))
            rows.append(sc)
        results[name] = aggregate(rows)
        results[name]["params"] = rows[0]["params"]
        results[name]["logit_bytes_per_token"] = logit_bytes(cache)
    manifest = read_manifest(cache)
    sums = totals(manifest)
    cost = {"cache_seconds": sums["seconds"] or None, "cache_samples": sums["samples"],
            "cache_backend": manifest["extraction"].get("backend"),
            "teacher_forward_seconds": teacher_forward_seconds(teacher, data / "val.json"),
            "batch_size": TEACHER_BATCH}
    previous = args.out / "results.json"
    if previous.is_file():  # rows of recipes not re-run this time are kept
        old = json.loads(previous.read_text())
        results = {**old, **results}
        cost = {**old.get("cost", {}), **{k: v for k, v in cost.items() if v is not None}}
    for name in RECIPES:  # rows from the main cache (kept from an earlier run or not)
        if name in results:
            results[name].setdefault("logit_bytes_per_token", logit_bytes(cache))
    for name in row_names(results):
        first = args.out / "students" / name.replace(":", "") / "seed0" / "model"
        if "params" not in results[name] and (first / "config.json").is_file():
            results[name]["params"] = parameter_counts(first)
    if args.quick:
        results["pretrained"] = pretrained_rows(args.out)
    results["cost"] = cost
    results["commit"] = code_commit()
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "RESULTS.md").write_text(markdown(results, args))
    chart(results, args.out / "results.png")
    curves(args.out, args.out / "curves.png")
    print((args.out / "RESULTS.md").read_text())
    return results


def pretrained_rows(out: Path) -> dict:
    """The pretrained-student rows (one seed) of tools/ablations.py's papers' regime, built under OUT/pretrained."""
    from ablations import run_regime

    res = run_regime(out, "pretrained", range(1), PRETRAINED_ROWS, workers=1)
    return {"teacher": res["teacher"], **{row: res[row] for row in PRETRAINED_ROWS}}


def build_variant_cache(spec: str, data: Path, teacher: Path, root: Path) -> Path:
    """A logits-only cache of the training questions: `sampled:N`, `topk:K`, `topp:P` (adaptive k: per
    position the fewest of the top 64 ids whose mass reaches P), or `pairs:K` (top-K with preference
    pairs: a plausible wrong answer per question, scored by the teacher too)."""
    from vlmkd.data.shapes import add_preference_pairs
    from vlmkd.teacher.job import CacheJob, run_cache_job
    from vlmkd.teacher.settings import extraction_from

    mode, _, n = spec.partition(":")
    ok = n.isdigit() if mode != "topp" else n.replace(".", "", 1).isdigit() and 0 < float(n) <= 1
    if mode not in ("sampled", "topk", "topp", "pairs") or not ok:
        raise SystemExit(f"--cache-variants {spec!r}: use sampled:N, topk:K, topp:P or pairs:K")
    questions = data / ("train_questions_pairs.json" if mode == "pairs" else "train_questions.json")
    if not questions.is_file():
        rows = [r for r in json.loads((data / "train.json").read_text()) if r.get("question_type")]
        questions.write_text(json.dumps(add_preference_pairs(rows, 0) if mode == "pairs" else rows))
    over = ({"logits": mode, "draws": int(n)} if mode == "sampled" else
            {"logits": "topk", "topk": 64, "top_p": float(n)} if mode == "topp" else {"logits": "topk", "topk": int(n)})
    settings = extraction_from(ROOT / "pipelines" / "cache.yaml", **over)
    settings.attn_layers, settings.hidden_points, settings.gram = [], [], False
    out = root / spec.replace(":", "")
    run_cache_job(CacheJob(teacher, questions, out, settings, backend="hf"))
    return out


def build_second_cache(teacher: Path, like: Path, out: Path) -> Path:
    """Another teacher's top-k cache over the same samples as the cache `like`, with its top-k and
    scored-position settings (logits only)."""
    from vlmkd.cache.manifest import read_manifest
    from vlmkd.teacher.hf_backend import Extraction
    from vlmkd.teacher.job import CacheJob, run_cache_job

    m = read_manifest(like)
    ext = m["extraction"]
    settings = Extraction(topk=ext["topk"], score_visual=ext["score_visual"], attn_layers=[], hidden_points=[],
                          gram=False)
    run_cache_job(CacheJob(teacher, Path(m["data"]["manifest"]), out, settings, backend="hf"))
    return out


def run_log(run_dir: Path) -> dict:
    """What a student run's metrics.jsonl says: the last held-out NLL, the median logged step (data +
    forward + backward + update, not evaluation or saving; the first step's warm-up left out) and the
    validation curve [(step, accuracy, NLL)]."""
    metrics = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["kind"] == "eval"]
    steps = [m["step_seconds"] for m in metrics if m["kind"] == "train" and "step_seconds" in m]
    return {"val_nll": evals[-1]["val_nll"] if evals else None,
            "step_seconds": statistics.median(steps[1:] or steps) if steps else None,
            "curve": [(m["step"], m.get("val_accuracy"), m.get("val_nll")) for m in evals]}


def parameter_counts(model_dir: Path) -> dict:
    """Total and per-token active parameters (an MoE student uses top-k of its experts), LLM included."""
    from vlmkd.models.build import load_model
    from vlmkd.models.moe import active_parameters

    total, active = active_parameters(load_model(model_dir)[0])
    return {"total": total, "active": active}


def logit_bytes(cache: Path) -> float:
    """Bytes per scored token of the cache's logit payload (top-k or sampled)."""
    from vlmkd.cache.inspect import summarize
    from vlmkd.cache.manifest import read_manifest

    per = summarize(read_manifest(cache))["bytes_per_token"]
    return per.get("topk", per.get("sampled", 0.0))


def teacher_forward_seconds(teacher: Path, manifest: Path, reps: int = 10) -> float:
    """What online KD pays on top of every student step: the teacher's forward pass (no gradient, with
    hidden states, as MDist/RDist and Align-KD need) on one batch of the recipes' size; median of `reps`."""
    import torch

    from vlmkd.data.dataset import collate, model_inputs
    from vlmkd.data.items import load_items
    from vlmkd.data.rejects import RejectLog
    from vlmkd.models.build import data_tokenizer, load_model

    model, hf_tok = load_model(teacher)
    model.eval()
    tok, layout = data_tokenizer(model, hf_tok)
    items = load_items(manifest, tok, layout, RejectLog(None), limit=TEACHER_BATCH, show=False)
    batch = model_inputs(collate(items, layout, tok.pad_id))
    times = []
    with torch.no_grad():
        for i in range(reps + 2):
            t = time.perf_counter()
            model(**batch, output_hidden_states=True)
            if i >= 2:  # two warm-up passes
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def params_cell(r: dict) -> str:
    p = r.get("params")
    if not p:
        return ""
    return f"{p['total'] / 1e6:.2f}M" + (f" ({p['active'] / 1e6:.2f}M)" if p["active"] != p["total"] else "")


def row_names(results: dict) -> list[str]:
    """The recipes in their fixed order, then the cache-variant rows by their bytes per token."""
    variants = [n for n in results if "+" in n]
    return [n for n in RECIPES if n in results] + sorted(variants, key=lambda n: results[n].get("logit_bytes_per_token", 0))


def code_commit() -> str:
    """The commit the rows come from (`+dirty` when the tree has uncommitted changes to tracked files)."""
    import subprocess

    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return sha + ("+dirty" if dirty else "")


def mean_std(vals: list) -> dict | None:
    """{mean, std} over the values that are not None (None when there are none); std is the sample SD
    (n - 1 in the denominator), as every table of this project reports it."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def aggregate(rows: list[dict]) -> dict:
    ms = mean_std
    types = sorted({t for r in rows for t in r["per_type"]})
    return {"runs": len(rows), "accuracy": ms([r["accuracy"] for r in rows]),
            "per_type": {t: ms([r["per_type"][t]["accuracy"] for r in rows if t in r["per_type"]]) for t in types},
            "val_nll": ms([r["val_nll"] for r in rows]), "step_seconds": ms([r["step_seconds"] for r in rows]),
            "n": rows[0]["n"], "seeds": [r["accuracy"] for r in rows]}


def cell(m: dict | None, digits: int = 3) -> str:
    """mean ± sample SD of an `aggregate` entry ('' when there is none)."""
    return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}" if m else ""


def teacher_line(label: str, t: dict, types: list[str]) -> str:
    return (f"| {label} | 1 | {t['accuracy']:.3f} | " + " | ".join(f"{t['per_type'][x]['accuracy']:.3f}" for x in types)
            + " | | | |")


def markdown(results: dict, args) -> str:
    types = sorted(results["teacher"]["per_type"])
    head = ("| model | runs | accuracy | " + " | ".join(types)
            + " | held-out NLL | teacher logits, B / scored token | parameters (active) |\n")
    head += "| --- " * (len(types) + 6) + "|\n"
    lines = []
    for key, label in (("teacher", "teacher"), ("teacher_b", "teacher B (--second-teacher)")):
        if key in results:
            lines.append(teacher_line(label, results[key], types))
    rows = row_names(results)
    for name in rows:
        r = results[name]
        lines.append(f"| {name} | {r['runs']} | {cell(r['accuracy'])} | " + " | ".join(cell(r["per_type"][x]) for x in types)
                     + f" | {cell(r['val_nll'])} | {r.get('logit_bytes_per_token', 0):.1f} | {params_cell(r)} |")
    pre = results.get("pretrained")
    if pre:
        lines.append(teacher_line("*pretrained regime (tools/ablations.py):* teacher", pre["teacher"], types))
        for row in PRETRAINED_ROWS:
            r = pre[row]
            lines.append(f"| pretrained {row} | {r['runs']} | {cell(r['accuracy'])} | "
                         + " | ".join(cell(r["per_type"].get(x)) for x in types) + f" | {cell(r['val_nll'])} | | |")
    for name in rows:
        fq = results[name].get("fake_quant_accuracy")
        if fq:
            lines.append(f"\n{name}: the row scores the exported integer model; the fake-quantised model it was "
                         f"trained as scores {fq['mean']:.3f} ± {fq['std']:.3f}.")
    quick = " --quick" if args.quick else ""
    return (f"Students trained from one cache, same steps, data and seed per row; mean ± sample SD over "
            f"the seeds given in the runs column; n = {results['teacher']['n']} test questions; code at "
            f"commit {results.get('commit', '?')}.\n"
            f"Command: `python tools/reproduce.py --demo {args.demo} --out {args.out}{quick}`\n\n"
            + head + "\n".join(lines) + "\n\n" + cost_markdown(results, rows))


def cost_markdown(results: dict, rows: list[str]) -> str:
    c = results.get("cost", {})
    out = ["## Cost", ""]
    if c.get("cache_seconds"):
        out.append(f"The cache: {c['cache_samples']:,} samples in {c['cache_seconds']:.0f} s "
                   f"({c['cache_backend']} backend), once for every row.")
    sft = results.get("sft", {}).get("step_seconds")
    fwd = c.get("teacher_forward_seconds")
    out += ["", "| recipe | s / step from the cache | × SFT step | online KD step (+ teacher forward) | online ÷ cached |",
            "| --- | --- | --- | --- | --- |"]
    for name in rows:
        s = results[name].get("step_seconds")
        if not s:
            continue
        ratio = f"{s['mean'] / sft['mean']:.2f}" if sft else ""
        online = f"{s['mean'] + fwd:.3f}" if fwd and name != "sft" else ""
        speed = f"{(s['mean'] + fwd) / s['mean']:.2f}" if fwd and name != "sft" else ""
        out.append(f"| {name} | {s['mean']:.3f} | {ratio} | {online} | {speed} |")
    if fwd:
        out += ["", f"Teacher forward (batch {c['batch_size']}, with hidden states, no gradient): {fwd:.3f} s: what "
                "the seed papers' online KD adds to every step. Step times are medians of the logged steps of "
                "the runs above (data reading and decoding included; evaluation and saving excluded)."]
    return "\n".join(out) + "\n"


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = row_names(results)
    names = ["teacher", *rows]
    means = [results["teacher"]["accuracy"]] + [results[n]["accuracy"]["mean"] for n in rows]
    stds = [0.0] + [results[n]["accuracy"]["std"] for n in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.8 * len(names) + 2), 4.5))
    ax.bar(names, means, yerr=stds, color=["#555"] + ["#47a" if "+" in n else "#4a7" for n in rows], capsize=4)
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title("shapes: students from one teacher cache (blue: MDist from other caches or teachers, or quantised)")
    for i, m in enumerate(means):
        ax.text(i, m + 0.02, f"{m:.2f}", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves(out: Path, path: Path) -> None:
    """Learning curves of every recipe (mean over its seeds): the response cross-entropy on the
    training batches (smoothed) and the held-out NLL and accuracy at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    others = sorted(p.name for p in (out / "students").glob("*") if p.name not in RECIPES)
    for i, name in enumerate(RECIPES + others):
        runs = sorted((out / "students" / name).glob("seed*/metrics.jsonl"))
        if not runs:
            continue
        series: dict[str, dict[int, list[float]]] = {"loss_ce": {}, "val_nll": {}, "val_accuracy": {}}
        for f in runs:
            for m in map(json.loads, f.read_text().splitlines()):
                for key in series:
                    if key in m:
                        series[key].setdefault(m["step"], []).append(m[key])
        color = f"C{i % 10}"
        for ax, key in zip(axes, series, strict=True):
            pts = sorted(series[key].items())
            if not pts:
                continue
            x = np.array([p[0] for p in pts])
            y = np.array([np.mean(p[1]) for p in pts])
            if key == "loss_ce" and len(y) > 5:
                y = np.convolve(y, np.ones(5) / 5, mode="valid")
                x = x[2 : 2 + len(y)]
            ax.plot(x, y, color=color, label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})",
                    marker="o" if key != "loss_ce" else None)
    titles = ["training response CE (smoothed)", "held-out NLL per answer token", "held-out accuracy"]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
