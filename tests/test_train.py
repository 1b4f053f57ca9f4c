"""The SFT loop: loss falls, resume continues the exact curve, metrics and plots are written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_IDEFICS3

from vlmkd.data.items import load_items
from vlmkd.data.rejects import RejectLog
from vlmkd.errors import RecipeError
from vlmkd.models.build import build_model, data_tokenizer
from vlmkd.train.loop import ItemSource, batch_indices, train
from vlmkd.train.recipe import parse_recipe
from vlmkd.train.schedule import lr_factor


def _recipe(steps=8, **stage):
    return parse_recipe({"name": "t", "model": TINY_IDEFICS3, "eval_every": 4, "eval_samples": 16, "save_every": 2,
                         "log_every": 1,
                         "stages": [{"name": "a", "steps": steps, "lr": 3e-3, "warmup": 2, "batch_size": 8, **stage}]})


def _setup(hf_tok, shapes_dir):
    model = build_model(TINY_IDEFICS3, hf_tok)
    tok, layout = data_tokenizer(model, hf_tok)
    rej = RejectLog(None)
    tr = load_items(shapes_dir / "train.json", tok, layout, rej, show=False)
    va = load_items(shapes_dir / "val.json", tok, layout, rej, show=False)
    return model, tok, layout, ItemSource(tr, layout, tok.pad_id, 0), va


def _curve(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_resume_reproduces_the_uninterrupted_curve(hf_tok, shapes_dir, tmp_path):
    model, tok, layout, tr, va = _setup(hf_tok, shapes_dir)
    full = train(_recipe(), model, hf_tok, tok, layout, tr, va, tmp_path / "full")
    model, tok, layout, tr, va = _setup(hf_tok, shapes_dir)
    train(_recipe(), model, hf_tok, tok, layout, tr, va, tmp_path / "cut", stop_after=3)
    assert not (tmp_path / "cut" / "model").exists()
    model, tok, layout, tr, va = _setup(hf_tok, shapes_dir)  # a fresh process would start like this
    resumed = train(_recipe(), model, hf_tok, tok, layout, tr, va, tmp_path / "cut")
    a, b = _curve(tmp_path / "full"), _curve(tmp_path / "cut")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-6, abs=1e-7)
    assert full.steps == resumed.steps == 8
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "full/model/model.safetensors"))
    wb = load_file(str(tmp_path / "cut/model/model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    for f in ["metrics.csv", "curves.png", "recipe.json"]:
        assert (tmp_path / "cut" / f).is_file()


def test_loss_decreases_and_frozen_parts_stay_put(hf_tok, shapes_dir, tmp_path):
    model, tok, layout, tr, va = _setup(hf_tok, shapes_dir)
    vision_before = {k: v.clone() for k, v in model.model.vision_model.state_dict().items()}
    train(_recipe(steps=30, trainable=["projector", "llm"]), model, hf_tok, tok, layout, tr, va, tmp_path / "r")
    curve = [loss for _, loss in _curve(tmp_path / "r")]
    assert sum(curve[-5:]) / 5 < 0.6 * sum(curve[:5]) / 5
    after = model.model.vision_model.state_dict()
    assert all(torch.equal(vision_before[k], after[k]) for k in vision_before)


def test_batch_order_is_a_function_of_the_step():
    a = [batch_indices(10, 0, 0, s, 4) for s in range(5)]
    b = [batch_indices(10, 0, 0, s, 4) for s in range(5)]
    assert a == b
    flat = sum(a, [])
    assert sorted(flat[:10]) == list(range(10))  # each epoch is a permutation: no sample twice
    assert sorted(flat[10:20]) == list(range(10))


def test_schedule_warms_up_and_decays():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[50] < f[20] and f[-1] == pytest.approx(0.1, abs=1e-3)


def test_recipe_refuses_unknown_keys():
    with pytest.raises(RecipeError, match="unknown key"):
        parse_recipe({"model": {}, "stages": [{"name": "a", "steps": 1, "lr_typo": 1}]})
    with pytest.raises(RecipeError, match="trainable"):
        parse_recipe({"model": {}, "stages": [{"name": "a", "steps": 1, "trainable": ["eyes"]}]})


def test_checkpoint_survives_a_kill_while_the_previous_one_was_being_deleted(hf_tok, shapes_dir, tmp_path):
    """Regression (fault campaign in CI): a half-deleted checkpoint.old made the next save fail."""
    model, tok, layout, src, va = _setup(hf_tok, shapes_dir)
    run = tmp_path / "r"
    train(_recipe(steps=4), model, hf_tok, tok, layout, src, va, run, stop_after=2)
    half = run / "checkpoint.old"
    half.mkdir()
    (half / "config.json").write_text("{}")  # what a kill during rmtree leaves behind
    model, tok, layout, src, va = _setup(hf_tok, shapes_dir)
    res = train(_recipe(steps=4), model, hf_tok, tok, layout, src, va, run)
    assert res.steps == 4 and (run / "model" / "config.json").is_file()
