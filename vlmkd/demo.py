"""`vlmkd demo`: the default pipeline end to end on the shapes data set.

OUT/data/{train,val,test}.json (+ images) -> OUT/teacher/ (HF format) -> OUT/cache/ (teacher cache)
-> OUT/students/{sft,mdist}/ (runs; the student in model/) -> OUT/scores/*.json and a table.
Each step is skipped when its output is already complete, so a re-run resumes. `--regime pretrained`:
the papers' regime (the image first, teacher and student LLMs pretrained on text; OUT/student_lm), its
students LLaVA-KD's SFT and MDist-in-DFT rows (pipelines/ablations/llava_kd/).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from vlmkd.data.shapes import write_dataset
from vlmkd.errors import RecipeError
from vlmkd.eval.run import evaluate_model
from vlmkd.progress import bar, console
from vlmkd.teacher.job import CacheJob, run_cache_job
from vlmkd.teacher.settings import extraction_from
from vlmkd.train.demo_teacher import train_teacher_run
from vlmkd.train.student import train_student_run

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
STUDENTS = ("sft", "mdist")
FULL = {"sizes": {"train": 16000, "val": 500, "test": 1000}, "max_steps": None, "student_steps": None,
        "test_limit": None, "backend": "auto", "teacher": "teacher.yaml", "captions": True}
# the plumbing check: tiny sizes, and the transformers backend (no vLLM engine start-up)
QUICK = {"sizes": {"train": 300, "val": 100, "test": 100}, "max_steps": 30, "student_steps": 10,
         "test_limit": 100, "backend": "hf", "teacher": "teacher.yaml", "captions": True}
# `tools/reproduce.py --quick` (CI): questions only, a shorter curriculum (pipelines/teacher_quick.yaml)
# and a cache through the transformers backend: about 10 minutes on 2 cores
MINI = {"sizes": {"train": 6000, "val": 300, "test": 500}, "max_steps": None, "student_steps": None,
        "test_limit": None, "backend": "hf", "teacher": "teacher_quick.yaml", "captions": False}
# the two regimes of `tools/ablations.py` (each paper's ablation), at MINI's size, with what every
# ablation row needs in one cache per regime: captions (LLaVA-KD's DPT) and preference pairs (LLaVA-MoD)
# - scratch: today's demo regime (the image after the question, every model from scratch)
# - pretrained: the papers' (the image first; teacher and student LLMs pretrained on text rows first,
#   the students assembled from the teacher's tower, a new projector and that LLM: `student_lm`)
SCRATCH = {**MINI, "captions": True, "preference": True}
PRETRAINED = {**MINI, "captions": True, "preference": True, "text_rows": 20000, "teacher": "teacher_pretrained.yaml",
              "student_lm": "student_lm.yaml"}
PRETRAINED_QUICK = {**QUICK, "text_rows": 300, "teacher": "teacher_pretrained.yaml", "student_lm": "student_lm.yaml"}
PRETRAINED_STUDENTS = {"sft": "llava_kd/sft", "mdist": "llava_kd/mdist"}  # pipelines/ablations/ rows


def build_teacher_and_cache(out: Path, cfg: dict) -> tuple[Path, Path, Path]:
    """OUT/data, OUT/teacher and OUT/cache for a preset; each step skipped when already complete."""
    out = Path(out)
    data = out / "data"
    if not (data / "test.json").is_file():
        with bar() as p:
            tasks = {s: p.add_task(f"shapes/{s}", total=n, unit="images") for s, n in cfg["sizes"].items()}
            # every training image carries one question, every second one a caption too (for the
            # captioning stages of the teacher and of LLaVA-KD's DPT)
            write_dataset(data, cfg["sizes"], seed=0, questions_per_image={"train": 1},
                          caption_every={"train": 2} if cfg["captions"] else {}, balanced={"train"},
                          progress=lambda s, n: p.update(tasks[s], advance=n),
                          preference={"train"} if cfg.get("preference") else set(),
                          text_rows={"train": cfg["text_rows"]} if cfg.get("text_rows") else None)
    console.print(f"data: {data}")
    teacher = out / "teacher"
    if not (teacher / "config.json").is_file():
        train_teacher_run(data, teacher, PIPELINES / cfg["teacher"], max_steps=cfg["max_steps"])
    console.print(f"teacher: {teacher}")
    cache = out / "cache"
    run_cache_job(CacheJob(teacher, data / "train.json", cache, extraction_from(PIPELINES / "cache.yaml"),
                           backend=cfg["backend"], val=data / "val.json"))
    console.print(f"cache: {cache}")
    return data, teacher, cache


def regime_recipe(src: Path, regime: str, lm: Path | None, dst: Path) -> Path:
    """A recipe written for the papers' regime (projector-only alignment stages) as `regime` runs it,
    written to `dst`: `pretrained` starts the student's LLM from `lm` (`model.text_from`); `scratch`
    also trains the LLM in the projector-only stages, since an LLM from scratch has read nothing."""
    src = Path(src)
    raw = yaml.safe_load(src.read_text())
    model = raw["model"]
    model = yaml.safe_load((src.parent / model).read_text()) if isinstance(model, str) else dict(model)
    if regime == "pretrained":
        model["text_from"] = str(lm)
    else:
        for st in raw["stages"]:
            if st.get("trainable") == ["projector"]:
                st["trainable"] = ["projector", "llm"]
    raw["model"] = model
    raw["name"] = f"{regime}_{raw.get('name', src.stem)}"
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(f"# {regime} regime of {src} (vlmkd.demo.regime_recipe)\n" + yaml.safe_dump(raw, sort_keys=False))
    return dst


def build_student_lm(out: Path, cfg: dict, cache: Path) -> Path:
    """OUT/student_lm: the regime's pretrained student language model (a causal LM with the teacher's
    tokenizer), trained by `cfg["student_lm"]` on the cache's text-only rows, then its LLM saved alone."""
    from vlmkd.models.build import load_model, save_language_model

    lm_dir = Path(out) / "student_lm"
    if not (lm_dir / "config.json").is_file():
        run = Path(out) / "runs" / "student_lm"
        res = train_student_run(PIPELINES / cfg["student_lm"], cache, run, val=Path(out) / "data" / "val.json",
                                max_steps=cfg["student_steps"])
        model, tok = load_model(res.model_dir)
        save_language_model(model, tok, lm_dir)
    console.print(f"student language model: {lm_dir}")
    return lm_dir


def build_regime(out: Path, cfg: dict) -> tuple[Path, Path, Path, Path | None]:
    """build_teacher_and_cache, and the pretrained student LLM where the preset names one."""
    data, teacher, cache = build_teacher_and_cache(out, cfg)
    return data, teacher, cache, build_student_lm(out, cfg, cache) if cfg.get("student_lm") else None


def run_demo(out: Path, quick: bool = False, regime: str = "scratch") -> dict[str, dict]:
    if regime not in ("scratch", "pretrained"):
        raise RecipeError(f"--regime {regime!r}: choose scratch or pretrained")
    pretrained = regime == "pretrained"
    cfg = (PRETRAINED_QUICK if quick else PRETRAINED) if pretrained else (QUICK if quick else FULL)
    out = Path(out)
    data, teacher, cache, lm = build_regime(out, cfg)
    rows = {"teacher": teacher}
    for name in STUDENTS:
        run = out / "students" / name
        recipe = PIPELINES / f"{name}.yaml"
        if pretrained:
            recipe = regime_recipe(PIPELINES / "ablations" / f"{PRETRAINED_STUDENTS[name]}.yaml", regime, lm,
                                   out / "recipes" / f"{name}.yaml")
        if not (run / "model" / "config.json").is_file():
            train_student_run(recipe, cache, run, val=data / "val.json", max_steps=cfg["student_steps"])
        rows[name] = run / "model"
    scores = out / "scores"
    scores.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, model_dir in rows.items():
        results[name] = evaluate_model(model_dir, data / "test.json", limit=cfg["test_limit"], name=name)
        (scores / f"{name}.json").write_text(json.dumps(results[name], indent=1))
    console.print(f"scores: {scores}")
    return results
