"""The command line: help, error paths (one clear line, exit 2) and the quick demo end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlmkd", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900)


def test_help_lists_every_command():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ["cache-teacher", "train-student", "data", "train-teacher", "eval", "demo", "plot"]:
        assert cmd in out.stdout, cmd


def test_errors_are_one_clear_line(tmp_path):
    out = run("eval", "--model", str(tmp_path / "nomodel"), "--data", str(tmp_path / "x.json"))
    assert out.returncode == 2
    assert "is not a model directory" in out.stderr and "Traceback" not in out.stderr
    out = run("plot", str(tmp_path))
    assert out.returncode == 2 and "no metrics.jsonl" in out.stderr
    out = run("train-teacher", "--data", str(tmp_path), "--out", str(tmp_path / "t"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = run("eval", "--model")
    assert out.returncode != 0 and "Traceback" not in out.stderr


def test_data_shapes_writes_the_splits(tmp_path):
    out = run("data", "shapes", "--out", str(tmp_path), "--train", "4", "--val", "2", "--test", "3")
    assert out.returncode == 0, out.stderr
    test = json.loads((tmp_path / "test.json").read_text())
    assert len(test) == 3 and (tmp_path / "images/test/000002.png").is_file()
    assert "wrote" in out.stderr


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = run("demo", "--out", str(tmp_path / "d"), "--quick")
    assert out.returncode == 0, out.stderr[-3000:]
    d = tmp_path / "d"
    assert (d / "teacher/config.json").is_file() and (d / "data/test.json").is_file()
    scores = json.loads((d / "scores/teacher.json").read_text())
    assert {"accuracy", "n", "per_type"} <= set(scores) and scores["n"] == 100
    assert (d / "runs/teacher/curves.png").is_file()
    assert (d / "cache/manifest.json").is_file()
    for name in ("sft", "mdist"):
        assert (d / "students" / name / "model/config.json").is_file()
        assert json.loads((d / "scores" / f"{name}.json").read_text())["n"] == 100
    # eval on any LLaVA manifest, with JSON out
    res = run("eval", "--model", str(d / "teacher"), "--data", str(d / "data/val.json"), "--limit", "20",
              "--json", str(tmp_path / "e.json"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 20


@pytest.mark.slow
def test_quick_fault_campaign(tmp_path):
    """tools/faults.py in small numbers: every fault survived, detected or refused (docs/RELIABILITY.md)."""
    import pathlib

    tool = pathlib.Path(__file__).resolve().parent.parent / "tools" / "faults.py"
    out = subprocess.run([sys.executable, str(tool), "--kills", "1", "--trials", "40", "--fuzz", "40",
                          "--json", str(tmp_path / "f.json"), "--keep", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "f.json").read_text())
    assert r["cache_kills"]["exact"] == r["cache_kills"]["runs"] == 1
    assert r["trainer_kills"]["equal"] == r["trainer_kills"]["runs"] == 1
    assert r["corruptions"]["detected"] == r["corruptions"]["named"] == 40
    assert all(v["refused"] and v["named"] for v in r["hostile"].values())
    assert r["fuzz"]["ok"] and r["fuzz"]["outcomes"]["crash"] == 0 and r["fuzz"]["outcomes"]["dropped"] == 0
    e2e = r["fuzz"]["end_to_end"]  # every case's rows through cache-teacher, training and eval
    assert e2e["ok"] and e2e["cache"]["samples"] > 0 and e2e["train"]["steps"] == 8


@pytest.mark.slow
def test_quick_demo_in_the_papers_regime(tmp_path):
    """`vlmkd demo --regime pretrained`: text rows, an image-first teacher, the student LLM pretrained on
    text and saved alone, students started from it; a misspelt regime is one clear line."""
    bad = run("demo", "--out", str(tmp_path / "x"), "--quick", "--regime", "pretrianed")
    assert bad.returncode == 2 and "choose scratch or pretrained" in bad.stdout + bad.stderr
    out = run("demo", "--out", str(tmp_path / "d"), "--quick", "--regime", "pretrained")
    assert out.returncode == 0, out.stderr[-3000:]
    d = tmp_path / "d"
    rows = json.loads((d / "data/train.json").read_text())
    assert sum(r.get("kind") == "text" for r in rows) == 300
    assert json.loads((d / "teacher/tokenizer_config.json").read_text())["image_position"] == "start"
    assert (d / "student_lm/config.json").is_file()
    for name in ("sft", "mdist"):
        recipe = yaml.safe_load((d / "recipes" / f"{name}.yaml").read_text())
        assert recipe["model"]["text_from"] == str(d / "student_lm")
        assert recipe["stages"][0]["trainable"] == ["projector"]
        assert json.loads((d / "scores" / f"{name}.json").read_text())["n"] == 100
