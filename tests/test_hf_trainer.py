"""vlmkd inside transformers' Trainer: the same recipe stage, seed and cache give the same loss curve
as vlmkd's own loop (>= 20 steps, every term), the batches are the loop's, and the student it trains
saves and loads as a plain checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import TINY_IDEFICS3

pytest.importorskip("accelerate")

from vlmkd.hf_trainer import KDLoss, KDTrainer, StageBatches, kd_arguments, save_student  # noqa: E402
from vlmkd.teacher.hf_backend import Extraction  # noqa: E402
from vlmkd.teacher.job import CacheJob, run_cache_job  # noqa: E402
from vlmkd.train.student import prepare_student, train_student_run  # noqa: E402

STUDENT = {**TINY_IDEFICS3, "vision_from": "teacher", "text": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}}
STEPS = 24


@pytest.fixture(scope="module")
def cache(trained_tiny_teacher, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hfcache")
    run_cache_job(CacheJob(trained_tiny_teacher, shapes_dir / "train.json", out,
                           Extraction(topk=16, attn_layers=[0], hidden_points=["projector", "final"]),
                           samples_per_shard=64, val=shapes_dir / "val.json"))
    return out


def _recipe(tmp_path):
    stage = {"name": "kd", "data": "questions", "steps": STEPS, "lr": 3e-3, "warmup": 3, "batch_size": 8,
             "trainable": ["projector", "llm"], "clip": 0.5,
             "losses": {"ce": 1.0, "res": 1.0, "feat": 0.5, "attn": 1.0},
             "loss_args": {"logit_loss": "jsd", "attn_layers": [0]}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "hf", "model": STUDENT, "eval_every": 1000, "eval_samples": 8,
                                    "save_every": 1000, "log_every": 1, "stages": [stage]}))
    return path


def test_trainer_follows_vlmkds_own_loop(cache, tmp_path):
    recipe = _recipe(tmp_path)
    train_student_run(recipe, cache, tmp_path / "own", data_workers=0)
    own = [r for r in map(json.loads, (tmp_path / "own" / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "train"]
    run = prepare_student(recipe, cache, data_workers=0)
    trainer = KDTrainer(run, "kd", kd_arguments(run, "kd", tmp_path / "hf"))
    trainer.train()
    hf = [r for r in trainer.state.log_history if "loss_ce" in r]
    assert len(own) == len(hf) == STEPS
    worst = 0.0
    for a, b in zip(own, hf, strict=True):
        for term in ("ce", "res", "feat", "attn"):
            assert b[f"loss_{term}"] == pytest.approx(a[f"loss_{term}"], rel=1e-4, abs=1e-6), (a["step"], term)
            worst = max(worst, abs(b[f"loss_{term}"] - a[f"loss_{term}"]) / max(abs(a[f"loss_{term}"]), 1e-12))
    print(f"{STEPS} steps, 4 terms: worst relative difference Trainer vs vlmkd's loop {worst:.2e}")
    assert own[-1]["loss_ce"] < own[0]["loss_ce"]  # it learnt, the same way in both loops
    from transformers import AutoModelForImageTextToText

    out = save_student(run, tmp_path / "student")
    assert AutoModelForImageTextToText.from_pretrained(out) is not None


def test_a_lora_student_through_the_trainer(cache, tmp_path):
    path = tmp_path / "lora.yaml"
    recipe = yaml.safe_load(_recipe(tmp_path).read_text())
    recipe["model"] = {**STUDENT, "lora": {"r": 4, "alpha": 8}}
    recipe["stages"][0]["steps"] = 6
    path.write_text(yaml.safe_dump(recipe))
    run = prepare_student(path, cache, data_workers=0)
    trainer = KDTrainer(run, "kd", kd_arguments(run, "kd", tmp_path / "hf"))
    trainer.train()
    out = save_student(run, tmp_path / "student")
    assert (out / "lora" / "adapters.safetensors").is_file()
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(out) is not None


def test_stage_batches_and_loss_are_the_loops(cache, tmp_path):
    run = prepare_student(_recipe(tmp_path), cache, data_workers=0)
    loader = torch.utils.data.DataLoader(StageBatches(run, "kd", start=5), batch_size=None)
    b = next(iter(loader))
    ref = next(run.source.batches(0, run.recipe.stages[0], 5))
    assert b["sample_ids"] == ref["sample_ids"] and torch.equal(b["input_ids"], ref["input_ids"])
    total, terms = KDLoss(run, "kd")(run.model, b)
    weights = run.recipe.stages[0].losses
    assert float(total) == pytest.approx(sum(weights[k] * float(v) for k, v in terms.items()))
    with pytest.raises(Exception, match="no stage 'dpt'"):
        KDLoss(run, "dpt")


DDP_SCRIPT = '''
import json, os, sys
import torch
torch.set_num_threads(1)
from vlmkd.hf_trainer import KDTrainer, kd_arguments
from vlmkd.train.student import prepare_student
recipe, cache, out = sys.argv[1:4]
run = prepare_student(recipe, cache, data_workers=0)
trainer = KDTrainer(run, "kd", kd_arguments(run, "kd", out))
seen, inner = [], trainer.compute_loss
def spy(model, inputs, *a, **k):
    seen.append(list(inputs["sample_ids"]))
    return inner(model, inputs, *a, **k)
trainer.compute_loss = spy
trainer.train()
rank = int(os.environ.get("RANK", "0"))
curve = [r["loss"] for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
json.dump({"seen": seen, "curve": curve}, open(os.path.join(out, f"rank{rank}.json"), "w"))
'''


@pytest.mark.slow
def test_two_process_trainer_deals_every_sample_once_per_epoch(cache, shapes_dir, tmp_path):
    """torchrun, 2 processes on gloo: one epoch of the stage's data (30 global batches of 8), every
    sample on exactly one rank, and the loss curve of vlmkd's own loop under torchrun with the same
    recipe (both average the ranks' means; against one process the curves part by ~1e-3 after a few
    steps, as tests/test_distributed.py says why)."""
    import subprocess
    import sys

    from vlmkd.cache.reader import CacheReader

    questions = {s["id"] for s in CacheReader(cache, payloads=("tokens",)).samples() if s["fields"]["kind"] == "questions"}
    steps = len(questions) // 8
    recipe = yaml.safe_load(_recipe(tmp_path).read_text())
    recipe["stages"][0].update(steps=steps, losses={"ce": 1.0, "res": 1.0, "feat": 0.5}, loss_args={"logit_loss": "jsd"})
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    script = tmp_path / "ddp_trainer.py"
    script.write_text(DDP_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531"]
    (tmp_path / "hf").mkdir()
    r = subprocess.run([*torchrun, str(script), str(path), str(cache), str(tmp_path / "hf")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([*torchrun, "-m", "vlmkd", "train-student", "--recipe", str(path), "--cache", str(cache),
                        "--out", str(tmp_path / "own"), "--threads", "1"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / "hf" / f"rank{i}.json").read_text()) for i in (0, 1)]
    dealt = [i for rk in ranks for batch in rk["seen"] for i in batch]
    assert all(len(b) == 4 for rk in ranks for b in rk["seen"]) and len(ranks[0]["seen"]) == steps
    assert len(dealt) == len(set(dealt)) == len(questions) and set(dealt) == questions
    own = [r["loss"] for r in map(json.loads, (tmp_path / "own" / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "train"]
    assert len(own) == len(ranks[0]["curve"]) == steps
    for a, b in zip(own, ranks[0]["curve"], strict=True):
        assert b == pytest.approx(a, rel=1e-5)


def test_trainer_accumulation_and_resume_follow_the_loop(cache, tmp_path):
    """Gradient accumulation (2 micro-batches a step) through the Trainer equals vlmkd's loop; a Trainer
    run saved at step 4 and resumed from that checkpoint ends where the uninterrupted run ends (the
    learned maps travel in the checkpoint)."""
    recipe = yaml.safe_load(_recipe(tmp_path).read_text())
    recipe["stages"][0].update(steps=8, grad_accum=2)
    path = tmp_path / "ga.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train_student_run(path, cache, tmp_path / "own", data_workers=0)
    own = [r for r in map(json.loads, (tmp_path / "own" / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "train"]

    def trainer(out, **kw):
        run = prepare_student(path, cache, data_workers=0)
        return run, KDTrainer(run, "kd", kd_arguments(run, "kd", out, **kw))

    run, whole = trainer(tmp_path / "whole")
    whole.train()
    hf = [r for r in whole.state.log_history if "loss_ce" in r]
    for a, b in zip(own, hf, strict=True):
        for term in ("ce", "res", "feat", "attn"):
            assert b[f"loss_{term}"] == pytest.approx(a[f"loss_{term}"], rel=1e-5, abs=1e-7), (a["step"], term)
    end = {k: v.clone() for k, v in run.model.state_dict().items()}
    maps = {k: v.clone() for k, v in run.objective.state_dict().items()}
    _, first = trainer(tmp_path / "cut", save_strategy="steps", save_steps=4, max_steps=8)
    first.train()
    assert (tmp_path / "cut" / "checkpoint-4" / "vlmkd_objective.pt").is_file()
    run2, second = trainer(tmp_path / "cut2")
    second.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
    got = run2.model.state_dict()
    assert all(torch.allclose(got[k], v, rtol=1e-5, atol=1e-7) for k, v in end.items())
    assert all(torch.allclose(run2.objective.state_dict()[k], v, rtol=1e-5, atol=1e-7) for k, v in maps.items())
