"""torchrun on the CPU (gloo): two processes follow one process's loss curve with the same global
batch, and one epoch deals every cached sample to exactly one rank."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import TINY_IDEFICS3

from vlmkd.cache.reader import CacheReader
from vlmkd.teacher.hf_backend import Extraction
from vlmkd.teacher.job import CacheJob, run_cache_job
from vlmkd.train import kd_data
from vlmkd.train.recipe import Stage

STUDENT = {**TINY_IDEFICS3, "vision_from": "teacher", "text": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}}


@pytest.fixture(scope="module")
def qa_cache(trained_tiny_teacher, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpcache")
    run_cache_job(CacheJob(trained_tiny_teacher, shapes_dir / "train.json", out, Extraction(topk=16),
                           samples_per_shard=50))
    return out


def _curve(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.slow
def test_two_ranks_follow_one_rank(qa_cache, shapes_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "ddp", "model": STUDENT, "eval_every": 1000, "eval_samples": 8, "save_every": 1000, "log_every": 1,
        "stages": [{"name": "kd", "data": "questions", "steps": 6, "lr": 2e-3, "warmup": 1, "batch_size": 8,
                    "losses": {"ce": 1.0, "res": 1.0}}]}))
    common = ["-m", "vlmkd", "train-student", "--recipe", str(recipe), "--cache", str(qa_cache),
              "--val", str(shapes_dir / "val.json"), "--threads", "1"]
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                          *common, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _curve(tmp_path / "one"), _curve(tmp_path / "two")
    assert len(a) == len(b) == 6
    # each rank averages over its own response tokens and the ranks' means are averaged: with answers of
    # one or two tokens that differs from the one-process token mean by a hair (2e-4 relative seen at
    # step 1, before any update). Stated tolerance: 2e-3 relative over the whole curve.
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=2e-3)
    assert (tmp_path / "two" / "model" / "config.json").is_file()


def test_one_epoch_deals_every_sample_once(qa_cache, monkeypatch):
    reader = CacheReader(qa_cache, payloads=("tokens", "image"), shuffle_buffer=16, rank=0, world=1)
    n = sum(1 for s in reader.samples() if not s["prompt"].lower().startswith("describe"))
    stage = Stage(name="s", steps=1, batch_size=4, data="questions")
    seen = []
    for rank in range(2):
        monkeypatch.setattr(kd_data, "dist_info", lambda rank=rank: (rank, 2))
        source = kd_data.CacheSource(reader, _layout(qa_cache), 0)
        it = source.batches(0, stage, 0)
        ids = []
        for _ in range(n // 4):
            ids += next(it)["sample_ids"]
        seen.append(ids)
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == n // 4 * 4 and len(set(seen[0] + seen[1])) == n // 4 * 4


def _layout(cache):
    from transformers import AutoConfig, AutoTokenizer

    from vlmkd.models.build import layout_of

    path = CacheReader(cache, payloads=()).manifest["teacher_path"]
    return layout_of(AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path))


@pytest.mark.slow
def test_fsdp_two_ranks_follow_one_rank_and_resume_on_one(qa_cache, shapes_dir, tmp_path):
    """FSDP2 on 2 ranks (gloo): the same curve as one process; its checkpoint (full weights and
    name-keyed optimizer state, gathered to rank 0) resumes in one process and finishes the run."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "fsdp", "model": STUDENT, "parallel": "fsdp", "eval_every": 2, "eval_samples": 8, "save_every": 1000,
        "log_every": 1, "stages": [{"name": "kd", "data": "questions", "steps": 6, "lr": 2e-3, "warmup": 1,
                                    "batch_size": 8, "losses": {"ce": 1.0, "res": 1.0}}]}))
    common = ["-m", "vlmkd", "train-student", "--recipe", str(recipe), "--cache", str(qa_cache),
              "--val", str(shapes_dir / "val.json"), "--threads", "1"]
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
                          *common, "--out", str(tmp_path / "two"), "--stop-after", "3"],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "checkpoint" / "state.json").read_text())["global_step"] == 3
    rest = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "two")], capture_output=True, text=True)
    assert rest.returncode == 0, rest.stderr[-2000:]
    a, b = _curve(tmp_path / "one"), _curve(tmp_path / "two")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):  # the DDP test's tolerance (per-rank token means)
        assert x == pytest.approx(y, rel=2e-3)
    evals = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if e["kind"] == "eval"] == [2, 4, 6]
    assert (tmp_path / "two" / "model" / "model.safetensors").is_file()
