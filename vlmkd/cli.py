"""The `vlmkd` command line. Each command is a thin shell over a library function, prints where it
wrote what, and turns vlmkd's own errors into one clear line and exit code 2."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from rich.table import Table

from vlmkd.errors import VlmkdError
from vlmkd.progress import bar, console

app = typer.Typer(help="Offline knowledge distillation for vision-language models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Generate or inspect data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


@data_app.command("shapes")
def data_shapes(
    out: Path = typer.Option(..., help="folder for {train,val,test}.json and images/"),
    train: int = typer.Option(12000, help="training images"),
    val: int = typer.Option(500, help="validation images"),
    test: int = typer.Option(1000, help="test images"),
    seed: int = typer.Option(0),
    questions_per_image: int = typer.Option(2, help="question samples per training image"),
    caption_every: int = typer.Option(4, help="a caption sample on every m-th training image (0: none)"),
    preference: bool = typer.Option(False, help="add a plausible wrong `rejected` answer to every training "
                                                "question (LLaVA-MoD preference pairs)"),
):
    """Generate the synthetic "shapes" data set (shared/DATASET.md), deterministic from the seed."""
    from vlmkd.data.shapes import write_dataset

    sizes = {"train": train, "val": val, "test": test}
    with bar() as p:
        tasks = {s: p.add_task(f"shapes/{s}", total=n, unit="images") for s, n in sizes.items()}
        paths = write_dataset(out, sizes, seed, {"train": questions_per_image}, {"train": caption_every},
                              progress=lambda s, n: p.update(tasks[s], advance=n),
                              preference={"train"} if preference else frozenset())
    for path in paths.values():
        console.print(f"wrote {path} ({len(json.loads(path.read_text()))} samples)")


@app.command("train-teacher")
def train_teacher(
    data: Path = typer.Option(..., help="data folder with train.json and val.json (or a train manifest)"),
    out: Path = typer.Option(..., help="where the trained teacher goes (Hugging Face format)"),
    recipe: Path = typer.Option(Path("pipelines/teacher.yaml"), help="model and schedule"),
    val: Path | None = typer.Option(None, help="validation manifest (default: DATA/val.json)"),
    max_steps: int | None = typer.Option(None, help="cap each stage's steps (quick runs)"),
    seed: int | None = typer.Option(None),
    strict: bool = typer.Option(False, help="fail on the first bad sample instead of skipping it"),
    threads: int | None = typer.Option(None, help="torch CPU threads"),
):
    """Train the demo teacher from scratch: a tokenizer on the data's texts, then the recipe's stages."""
    from vlmkd.train.demo_teacher import train_teacher_run

    _threads(threads)
    res = train_teacher_run(data, out, recipe, val, max_steps, seed, strict)
    console.print(f"teacher written to {res.model_dir} ({res.steps} steps, {res.seconds:.0f} s); "
                  f"curves in {res.run_dir / 'curves.png'}")


@app.command("eval")
def eval_cmd(
    model: Path = typer.Option(..., help="a model directory (Hugging Face format)"),
    data: Path = typer.Option(..., help="a manifest (LLaVA, ShareGPT, LLaMA-Factory or alpaca; JSON or JSONL)"),
    json_out: Path | None = typer.Option(None, "--json", help="write the scores here as JSON (and the rejects "
                                                              "beside it, as NAME.rejects.jsonl)"),
    limit: int | None = typer.Option(None, help="score only the first N samples"),
    match: str = typer.Option("first_word", help="first_word | exact | normalised | choice (option letters)"),
    max_new_tokens: int | None = typer.Option(None, help="answer budget (default: 4 for first_word, 8 for "
                                                         "choice, 64 for exact and normalised)"),
    type_field: str = typer.Option("question_type", help="the manifest field the per-type table groups by"),
    strict: bool = typer.Option(False),
    threads: int | None = typer.Option(None),
):
    """Greedy-decode every assistant turn (from the conversation before it) and score it, overall and per
    type."""
    from vlmkd.eval.run import evaluate_model

    _threads(threads)
    rejects = json_out.with_suffix(".rejects.jsonl") if json_out else None
    if rejects is not None and rejects.exists():
        rejects.unlink()  # this run's rejects only
    res = evaluate_model(model, data, limit=limit, strict=strict, rejects_path=rejects, match=match,
                         max_new_tokens=max_new_tokens, type_field=type_field or None)
    print_scores({model.name: res})
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=1))
        console.print(f"wrote {json_out}")


@app.command("quantize")
def quantize_cmd(
    model: Path = typer.Option(..., help="a trained student directory (Hugging Face format)"),
    out: Path = typer.Option(..., help="folder for the quantised student"),
    bits: int = typer.Option(4, help="4 or 8"),
    group_size: int = typer.Option(32, help="input columns per scale; 0: one scale per output channel"),
):
    """Post-training quantisation: round the LLM's linear weights to integers (the QAT quantiser, no
    training) and export them in the format `train-student` exports QAT students in."""
    from vlmkd.models.build import load_model
    from vlmkd.models.quant import QuantSpec, export_quantized

    m, tok = load_model(model)
    spec = QuantSpec.parse({"bits": bits, "group_size": group_size or None})
    console.print(f"wrote {export_quantized(m, spec, tok, out)} ({spec.tag}, compressed-tensors pack-quantized)")


SHORT = {"color_of_shape": "color(shape)", "shape_at_position": "shape@pos", "count_shape": "count",
         "exists_color_shape": "exists", "color_at_position": "color@pos"}


def print_scores(rows: dict[str, dict]) -> None:
    types = sorted({t for r in rows.values() for t in r["per_type"]})
    table = Table(title="accuracy (first word, greedy)")
    table.add_column("model")
    table.add_column("overall", justify="right")
    table.add_column("n", justify="right")
    for t in types:
        table.add_column(SHORT.get(t, t), justify="right")
    for name, r in rows.items():
        table.add_row(name, f"{r['accuracy']:.3f}", str(r["n"]),
                      *[f"{r['per_type'][t]['accuracy']:.3f}" if t in r["per_type"] else "-" for t in types])
    console.print(table)


@app.command("plot")
def plot_cmd(run_dir: Path = typer.Argument(..., help="a training run folder (with metrics.jsonl)")):
    """Draw a run's loss terms, learning rate and held-out accuracy into RUN_DIR/curves.png."""
    from vlmkd.train.metrics import plot_run, write_csv

    if not (run_dir / "metrics.jsonl").is_file():
        raise VlmkdError(f"{run_dir} has no metrics.jsonl: is it a training run folder?")
    write_csv(run_dir)
    console.print(f"wrote {plot_run(run_dir)}")


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("demo"), help="folder for data/, teacher/, cache/, students/"),
    quick: bool = typer.Option(False, help="a tiny run to check the plumbing (minutes, low accuracy)"),
    regime: str = typer.Option("scratch", help="scratch (the image after the question, every model from scratch) or "
                                               "pretrained (the papers': the image first, LLMs pretrained on text)"),
    threads: int | None = typer.Option(None),
):
    """The whole default pipeline: data -> teacher -> eval, with a summary table at the end."""
    from vlmkd.demo import run_demo

    _threads(threads)
    t0 = time.time()
    rows = run_demo(out, quick, regime)
    print_scores(rows)
    console.print(f"demo finished in {time.time() - t0:.0f} s; everything is under {out}")


def main() -> None:
    try:
        app()
    except VlmkdError as e:
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        sys.exit(2)


cache_app = typer.Typer(help="Inspect, verify and merge teacher caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@app.command("cache-teacher")
def cache_teacher(
    teacher: Path = typer.Option(..., help="teacher model directory (Hugging Face format)"),
    data: Path = typer.Option(..., help="LLaVA-format data manifest (JSON or JSONL)"),
    out: str = typer.Option(..., help="cache folder, or an fsspec URL (memory://, file://, s3://, gs://)"),
    recipe: Path | None = typer.Option(None, help="a recipe whose `cache:` section sets the extraction"),
    backend: str = typer.Option("auto", help="auto (vLLM when it imports and runs the model), vllm, or hf"),
    tensor_parallel_size: int = typer.Option(1, help="vLLM tensor parallelism (GPUs per teacher)"),
    data_parallel_size: int = typer.Option(1, help="vLLM data parallelism (engine replicas)"),
    logits: str | None = typer.Option(None, help="topk (default) or sampled (Random-Sampling KD; hf backend)"),
    topk: int | None = typer.Option(None, "--k", help="top-k log-probs per scored position (default 64)"),
    top_p: float | None = typer.Option(None, help="adaptive k: per position the fewest of the k ids whose mass "
                                                  "reaches P (e.g. 0.99); the rest joins the exact tail"),
    topk_min: int | None = typer.Option(None, help="--top-p: keep at least this many ids per position (default 1)"),
    shard_layout: str | None = typer.Option(None, help="tar (WebDataset, default) or parquet (one row per sample)"),
    draws: int | None = typer.Option(None, help="--logits sampled: draws per scored position (default 50)"),
    proposal_temperature: float | None = typer.Option(None, help="--logits sampled: draw from p^(1/t) (default 1)"),
    score_visual: bool | None = typer.Option(None, help="also score visual-token positions (LLaVA-KD L_vis)"),
    score_text: bool | None = typer.Option(None, help="also score every prompt text position (the txt term: logit "
                                                      "KD at every text position, Align-KD's as its authors compute it)"),
    hidden_points: str | None = typer.Option(None, help="visual hidden states to store, e.g. projector,final,"
                                                        "layer:3 (default projector,final; layer maps)"),
    text_pool: bool | None = typer.Option(None, help="store the pooled text hidden state (contrastive text term)"),
    keep_text: bool | None = typer.Option(None, help="store each sample's conversation and response-token character "
                                                     "spans (a student with another tokenizer: the uld term)"),
    num_shards: int = typer.Option(1, help="split the data into N jobs (N GPUs or nodes)"),
    shard_index: int = typer.Option(0, help="which of the N jobs this is"),
    samples_per_shard: int = typer.Option(2048),
    max_shard_mb: int = typer.Option(512),
    batch_size: int | None = typer.Option(None),
    strict: bool = typer.Option(False, help="fail on the first bad sample instead of recording it"),
    overwrite: bool = typer.Option(False, help="start over even if OUT holds another cache"),
    threads: int | None = typer.Option(None),
    val: Path | None = typer.Option(None, help="a validation manifest to hold in the cache (students evaluate on it "
                                               "with no data folder)"),
):
    """Run the teacher once over a data set and write its sparse distributions, attention maps and
    hidden states into a sharded cache. A re-run resumes; it never writes a sample twice."""
    from vlmkd.teacher.job import CacheJob, run_cache_job
    from vlmkd.teacher.settings import extraction_from

    _threads(threads)
    settings = extraction_from(recipe, topk=topk, top_p=top_p, topk_min=topk_min, shard_layout=shard_layout,
                               score_visual=score_visual, score_text=score_text, batch_size=batch_size, logits=logits,
                               draws=draws, proposal_temperature=proposal_temperature, text_pool=text_pool,
                               keep_text=keep_text, hidden_points=hidden_points.split(",") if hidden_points else None)
    run_cache_job(CacheJob(teacher, data, out, settings, backend, num_shards, shard_index, samples_per_shard,
                           max_shard_mb * 2**20, strict, overwrite, tensor_parallel_size=tensor_parallel_size,
                           data_parallel_size=data_parallel_size, val=val))


@cache_app.command("inspect")
def cache_inspect(cache: str = typer.Argument(..., help="cache folder or URL"), as_json: bool = typer.Option(False, "--json")):
    """Counts, sizes, bytes per scored token per payload, and the extraction settings."""
    from vlmkd.cache.inspect import summarize
    from vlmkd.cache.manifest import read_manifest

    info = summarize(read_manifest(cache))
    if as_json:
        print(json.dumps(info, indent=1))
        return
    table = Table(title=f"cache {cache}")
    table.add_column("payload")
    table.add_column("bytes", justify="right")
    table.add_column("bytes / scored token", justify="right")
    for k, v in info["payload_bytes"].items():
        table.add_row(k, f"{v:,}", f"{info['bytes_per_token'][k]:.1f}")
    table.add_row(f"shards ({info['extraction'].get('shard_layout', 'tar')})", f"{info['bytes']:,}", f"{info['bytes_per_token']['shard_total']:.1f}")
    console.print(table)
    console.print(f"{info['samples']} samples, {info['scored_tokens']} scored tokens, {info['shards']} shards, "
                  f"{info['rejects']} rejects, state {info['state']}, built in {info['build_seconds']:.0f} s")
    console.print(f"extraction: {info['extraction']}")


@cache_app.command("show")
def cache_show(
    caches: list[str] = typer.Argument(..., help="a cache; several caches of the same data: side by side"),
    sample: str = typer.Option(..., help="the sample id (as in the data manifest)"),
    out: Path | None = typer.Option(None, help="the page (default: SAMPLE.html)"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the page's data as JSON"),
):
    """One self-contained HTML page for one sample: the image with each text token's cached attention
    as a heat map, the teacher's top-k per scored row with the tail, its visual-token distributions."""
    from vlmkd.cache.pages import show_html
    from vlmkd.cache.view import sample_view

    views = [sample_view(c, sample) for c in caches]
    out = out or Path(f"{sample.replace('/', '_')}.html")
    out.write_text(show_html(views), encoding="utf-8")
    if json_out:
        json_out.write_text(json.dumps(views if len(views) > 1 else views[0]))
    console.print(f"wrote {out}" + (f" and {json_out}" if json_out else ""))


@cache_app.command("report")
def cache_report_cmd(
    cache: str = typer.Argument(..., help="cache folder or URL"),
    out: Path = typer.Option(Path("report.html"), help="the HTML report"),
    png_dir: Path | None = typer.Option(None, help="also write the figures here as PNG"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the report's data as JSON"),
    max_samples: int | None = typer.Option(None, help="histograms over the first N samples only"),
):
    """What a cache holds and costs: counts, rejects by reason, bytes per payload and per scored token,
    histograms of the teacher's entropy, tail mass and top-1 probability, per-shard build time."""
    from vlmkd.cache.pages import figures, report_html
    from vlmkd.cache.view import cache_report

    rep = cache_report(cache, max_samples)
    pngs = figures(rep)
    out.write_text(report_html(rep, pngs), encoding="utf-8")
    if png_dir:
        png_dir.mkdir(parents=True, exist_ok=True)
        for name, blob in pngs.items():
            (png_dir / name).write_bytes(blob)
    if json_out:
        json_out.write_text(json.dumps(rep))
    console.print(f"wrote {out}" + (f", {len(pngs)} PNGs in {png_dir}" if png_dir else "")
                  + (f", {json_out}" if json_out else ""))


@cache_app.command("verify")
def cache_verify(cache: str = typer.Argument(..., help="cache folder or URL")):
    """Check every shard's checksum and that every member decodes; exit 1 naming each bad shard."""
    from vlmkd.cache.reader import CacheReader

    problems = CacheReader(cache).verify_all()
    for p in problems:
        console.print(f"[red]bad:[/red] {p}")
    if problems:
        raise typer.Exit(1)
    console.print(f"{cache}: all shards verified")


@cache_app.command("merge")
def cache_merge(cache: str = typer.Argument(..., help="folder (or URL) the split jobs wrote into")):
    """Join the part manifests of `--num-shards N` jobs into one cache manifest."""
    from vlmkd.cache.manifest import totals
    from vlmkd.cache.writer import merge_parts

    m = merge_parts(cache)
    t = totals(m)
    console.print(f"merged {m['data']['split']['merged_parts']} parts: {t['samples']} samples in {t['shards']} shards")


@cache_app.command("convert")
def cache_convert(
    cache: str = typer.Argument(..., help="a complete cache (folder or URL)"),
    out: str = typer.Argument(..., help="a new folder or URL for the converted cache"),
    layout: str = typer.Option("parquet", help="the shard layout to write: parquet or tar"),
):
    """Rewrite a cache in the other shard layout, without the teacher (the members' bytes unchanged)."""
    from vlmkd.cache.manifest import totals
    from vlmkd.cache.writer import convert_layout

    m = convert_layout(cache, out, layout)
    t = totals(m)
    console.print(f"{cache} -> {out}: {t['samples']} samples in {t['shards']} {layout} shards, "
                  f"{t['bytes'] / 2**20:.1f} MiB")


@app.command("generate")
def generate_cmd(
    model: Path = typer.Option(..., help="the model that answers (teacher or student; Hugging Face format)"),
    data: Path = typer.Option(..., help="a manifest of prompts (rows with or without answers; any format vlmkd reads)"),
    out: Path = typer.Option(..., help="the answers as a manifest in the input's row format: .jsonl, or .json (a list)"),
    n: int = typer.Option(1, help="answers per prompt"),
    temperature: float = typer.Option(0.0, help="0: greedy; > 0: sampled"),
    top_p: float = typer.Option(1.0, help="nucleus sampling: keep the fewest tokens whose mass reaches P"),
    top_k: int = typer.Option(0, help="sample from the K likeliest tokens only (0: off)"),
    max_new_tokens: int = typer.Option(32),
    seed: int = typer.Option(0, help="each prompt row draws from its own seed, hashed from this and its row"),
    backend: str = typer.Option("auto", help="auto (vLLM when it imports and runs the model), vllm, or hf"),
    batch_size: int = typer.Option(64, help="prompt rows per batch (a re-run resumes after the last whole batch)"),
    tensor_parallel_size: int = typer.Option(1, help="vLLM tensor parallelism"),
    strict: bool = typer.Option(False, help="fail on the first bad row instead of recording it"),
    overwrite: bool = typer.Option(False, help="start over even if OUT holds another job's answers"),
    threads: int | None = typer.Option(None),
):
    """Answer every prompt of a manifest with a model (vLLM, or transformers), writing the answers as a
    manifest with each row's provenance: teacher answers for sequence-level KD, a student's own answers
    for on-policy rounds or preference pairs. A re-run resumes; every prompt is answered once."""
    from vlmkd.generate.engines import Sampling
    from vlmkd.generate.job import GenerateJob, run_generate

    _threads(threads)
    sampling = Sampling(n, temperature, top_p, top_k, max_new_tokens, seed)
    run_generate(GenerateJob(model, data, out, sampling, backend, batch_size, strict, overwrite,
                             tensor_parallel_size=tensor_parallel_size))


@app.command("pairs")
def pairs_cmd(
    teacher: Path = typer.Option(..., help="the teacher that ranks the answers"),
    data: Path = typer.Option(..., help="a `vlmkd generate` manifest with several answers per prompt (--n)"),
    out: Path = typer.Option(..., help="the pairs as a .jsonl manifest (chosen answer + `rejected`)"),
    rule: str = typer.Option("teacher", help="teacher: its best vs its worst answer; reference: the data set's answer "
                                             "vs the teacher's favourite wrong one"),
    match: str = typer.Option("first_word", help="--rule reference: what counts as matching the reference"),
    batch_size: int = typer.Option(32),
    threads: int | None = typer.Option(None),
):
    """LLaVA-MoD preference pairs from a model's own sampled answers, ranked by the teacher's mean
    log-prob per token; then `cache-teacher` scores the pairs and a `pref` stage trains on them."""
    from vlmkd.generate.pairs import make_pairs

    _threads(threads)
    make_pairs(teacher, data, out, rule, match, batch_size)


@app.command("on-policy")
def on_policy_cmd(
    recipe: Path = typer.Option(..., help="a recipe with an on_policy section (pipelines/on_policy.yaml)"),
    teacher: Path = typer.Option(..., help="the teacher that scores the student's answers each round"),
    cache: str = typer.Option(..., help="the teacher's cache of the data set (round 0 trains from it)"),
    out: Path = typer.Option(..., help="run folder: round-0/, round-1/ (answers, data, cache, student), rounds.json"),
    data: Path | None = typer.Option(None, help="the prompts (default: the manifest the cache was built from)"),
    max_steps: int | None = typer.Option(None, help="cap each stage's steps"),
    seed: int | None = typer.Option(None),
    threads: int | None = typer.Option(None),
):
    """On-policy distillation in rounds: the student answers a share of the prompts, the teacher scores
    those answers into a new cache, the student trains on it; teacher and student never share memory."""
    from vlmkd.generate.rounds import run_rounds

    _threads(threads)
    run_rounds(recipe, teacher, cache, out, data, max_steps, seed)


@app.command("train-student")
def train_student(
    recipe: Path = typer.Option(..., help="pipelines/*.yaml: student model, stages, losses"),
    cache: list[str] = typer.Option(..., help="the teacher cache (folder or URL) to learn from; repeat for several teachers "
                                              "over the same data (the first streams images and features)"),
    out: Path = typer.Option(..., help="run folder: checkpoints, metrics, the student (HF format) in OUT/model"),
    teacher_weights: str | None = typer.Option(None, help="several caches: mixture weights, e.g. 0.7,0.3 "
                                                          "(default equal)"),
    teacher_mix: str = typer.Option("average", help="several caches: average (weighted mixture over the union "
                                                     "of ids) or confidence (per position, the surest teacher)"),
    allow_partial: bool = typer.Option(False, help="several caches holding different samples: train on the "
                                                   "shared ones (the rest recorded in OUT/rejects.jsonl)"),
    val: Path | None = typer.Option(None, help="validation manifest (default: the one the cache holds, from "
                                               "cache-teacher --val)"),
    data_workers: str = typer.Option("auto", help="1: decode the cache in a worker process ahead of the step; 0: "
                                                  "on the trainer's thread (same batches); auto: 1 on a GPU, 0 on "
                                                  "the CPU"),
    max_steps: int | None = typer.Option(None, help="cap each stage's steps"),
    seed: int | None = typer.Option(None),
    no_verify: bool = typer.Option(False, help="skip shard checksums (faster start on trusted storage)"),
    stop_after: int | None = typer.Option(None, help="stop after N optimizer steps with a checkpoint (a job "
                                                     "slot shorter than the run); a re-run resumes"),
    threads: int | None = typer.Option(None),
):
    """Train a student from a teacher cache with the recipe's KD losses and stages; it never loads the
    teacher. A re-run resumes from the last checkpoint, under any world size."""
    from vlmkd.train.student import train_student_run

    _threads(threads)
    weights = [float(x) for x in teacher_weights.split(",")] if teacher_weights else None
    res = train_student_run(recipe, cache, out, val, max_steps, seed, verify=not no_verify, stop_after=stop_after,
                            teacher_weights=weights, teacher_mix=teacher_mix, allow_partial=allow_partial,
                            data_workers=data_workers if data_workers == "auto" else int(data_workers))
    if stop_after and res.model_dir.name == "checkpoint":
        console.print(f"stopped after {res.steps} steps; checkpoint in {res.model_dir}; re-run to resume")
        return
    console.print(f"student written to {res.model_dir} ({res.steps} steps, {res.seconds:.0f} s); "
                  f"metrics in {out / 'metrics.csv'}, curves in {out / 'curves.png'}")
