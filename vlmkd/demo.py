"""`vlmkd demo`: the default pipeline end to end on the shapes data set.

Layout: OUT/data/{train,val,test}.json (+ images), OUT/teacher/ (HF format), OUT/runs/, OUT/scores/.
Each step is skipped when its output is already complete, so a re-run resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmkd.data.shapes import write_dataset
from vlmkd.eval.run import evaluate_model
from vlmkd.progress import bar, console
from vlmkd.train.teacher import train_teacher_run

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
FULL = {"sizes": {"train": 12000, "val": 500, "test": 1000}, "max_steps": None, "test_limit": None}
QUICK = {"sizes": {"train": 600, "val": 100, "test": 100}, "max_steps": 30, "test_limit": 100}


def run_demo(out: Path, quick: bool = False) -> dict[str, dict]:
    cfg = QUICK if quick else FULL
    out = Path(out)
    data = out / "data"
    if not (data / "test.json").is_file():
        with bar() as p:
            tasks = {s: p.add_task(f"shapes/{s}", total=n, unit="images") for s, n in cfg["sizes"].items()}
            write_dataset(data, cfg["sizes"], seed=0, questions_per_image={"train": 2},
                          caption_every={"train": 4}, progress=lambda s, n: p.update(tasks[s], advance=n))
    console.print(f"data: {data}")
    teacher = out / "teacher"
    if not (teacher / "config.json").is_file():
        train_teacher_run(data, teacher, PIPELINES / "teacher.yaml", max_steps=cfg["max_steps"])
    console.print(f"teacher: {teacher}")
    scores = out / "scores"
    scores.mkdir(parents=True, exist_ok=True)
    rows = {"teacher": evaluate_model(teacher, data / "test.json", limit=cfg["test_limit"])}
    for name, res in rows.items():
        (scores / f"{name}.json").write_text(json.dumps(res, indent=1))
    console.print(f"scores: {scores}")
    return rows
