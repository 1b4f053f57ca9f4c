"""Layer maps and contrastive alignment, from caches: the pairs each map makes, the cache payloads they
need (refused by name when missing), and students whose feat / attn / contrast terms fall."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import TINY_IDEFICS3

from vlmkd.cache.reader import CacheReader
from vlmkd.errors import RecipeError
from vlmkd.teacher.hf_backend import Extraction
from vlmkd.teacher.job import CacheJob, run_cache_job
from vlmkd.train.layer_map import layer_pairs
from vlmkd.train.student import train_student_run

STUDENT = {**TINY_IDEFICS3, "vision_from": "teacher", "text": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}}


def test_layer_pairs():
    assert layer_pairs("uniform", 2, 4) == [(0, 1), (1, 3)]
    assert layer_pairs("uniform", 3, 12) == [(0, 3), (1, 7), (2, 11)]
    assert layer_pairs({"kind": "last_k", "k": 2}, 3, 5) == [(1, 3), (2, 4)]
    assert layer_pairs({"kind": "explicit", "pairs": [[0, 0], [1, 3]]}, 2, 4) == [(0, 0), (1, 3)]
    for bad, msg in [({"kind": "explicit", "pairs": [[2, 0]]}, "the student has layers 0..1"),
                     ({"kind": "last_k", "k": 3}, "must be in 1..2"), ("deepest", "choose one of"),
                     ({"kind": "uniform", "k": 1}, "unknown key")]:
        with pytest.raises(RecipeError, match=msg):
            layer_pairs(bad, 2, 4)


@pytest.fixture(scope="module")
def layer_cache(trained_tiny_teacher, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("layercache")
    settings = Extraction(topk=8, attn_layers=[0, 1], hidden_points=["projector", "final", "layer:0", "layer:1"],
                          text_pool=True)
    run_cache_job(CacheJob(trained_tiny_teacher, shapes_dir / "train.json", out, settings, samples_per_shard=64))
    return out


def _run(tmp_path, cache, shapes_dir, losses, args, steps=30):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "model": STUDENT, "eval_every": 1000, "eval_samples": 8,
                                      "save_every": 1000, "log_every": 1, "stages": [
                                          {"name": "kd", "data": "questions", "steps": steps, "lr": 3e-3, "warmup": 2,
                                           "batch_size": 8, "trainable": ["projector", "llm"], "losses": losses,
                                           "loss_args": args}]}))
    run = tmp_path / "run"
    train_student_run(recipe, cache, run, val=shapes_dir / "val.json")
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


def _falls(rows, key):
    vals = [r[key] for r in rows]
    return np.mean(vals[-5:]) < np.mean(vals[:5])


def test_the_cache_holds_mapped_layers_and_pooled_text(layer_cache):
    s = next(CacheReader(layer_cache, payloads=("tokens", "hidden", "pooled")).samples())
    assert s["hidden"].shape[0] == 4 and s["pooled_text"].shape == (64,)


@pytest.mark.parametrize("layer_map", ["uniform", {"kind": "explicit", "pairs": [[0, 0]]}])
def test_layer_mapped_feat_and_attn_fall(layer_cache, shapes_dir, tmp_path, layer_map):
    rows = _run(tmp_path, layer_cache, shapes_dir, {"ce": 1.0, "feat": 1.0, "attn": 1.0},
                {"layer_map": layer_map, "attn_kind": "kl"})
    assert _falls(rows, "loss_feat") and _falls(rows, "loss_attn")


def test_contrast_on_visual_and_text_falls(layer_cache, shapes_dir, tmp_path):
    rows = _run(tmp_path, layer_cache, shapes_dir, {"ce": 1.0, "contrast": 1.0},
                {"contrast_on": ["visual", "text"], "contrast_tau": 0.1})
    assert _falls(rows, "loss_contrast")


def test_missing_payloads_are_refused_by_name(kd_cache_plain, shapes_dir, tmp_path):
    with pytest.raises(RecipeError, match=r"--hidden-points projector,final,layer:1"):
        _run(tmp_path, kd_cache_plain, shapes_dir, {"feat": 1.0}, {"layer_map": "uniform"}, steps=1)
    with pytest.raises(RecipeError, match="--text-pool"):
        _run(tmp_path, kd_cache_plain, shapes_dir, {"contrast": 1.0}, {"contrast_on": ["text"]}, steps=1)
    with pytest.raises(RecipeError, match=r"loss_args.layer_map is read by the term\(s\) \[.attn., .feat.\], which this stage does not use"):
        _run(tmp_path, kd_cache_plain, shapes_dir, {"ce": 1.0}, {"layer_map": "uniform"}, steps=1)


@pytest.fixture(scope="module")
def kd_cache_plain(trained_tiny_teacher, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plaincache")
    settings = Extraction(topk=8, attn_layers=[0], hidden_points=["projector", "final"])
    run_cache_job(CacheJob(trained_tiny_teacher, shapes_dir / "train.json", out, settings, samples_per_shard=64))
    return out
