"""Quantisation-aware distillation: the fake quantiser against a float64 reference, the straight-through
gradient, the export that transformers loads (outputs equal to the fake-quantised student's), and a
QAT stage that trains, resumes and exports."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from conftest import TINY_IDEFICS3

from vlmkd.errors import RecipeError
from vlmkd.models.quant import QuantSpec, add_fake_quant, export_quantized, fake_quantize, plain_state_dict

SEED = int.from_bytes(os.urandom(4), "little")


def _ref_fake_quant(w, bits, group):
    """By hand: per row, per group of columns, symmetric round-to-nearest (ties to even, as torch.round)."""
    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(w)
    n_out, n_in = w.shape
    G = group or n_in
    for r in range(n_out):
        for g0 in range(0, n_in, G):
            cols = w[r, g0 : g0 + G].tolist()
            s = max(abs(x) for x in cols) / qmax
            for j, x in enumerate(cols):
                q = min(max(round(x / s), -qmax - 1), qmax)
                out[r, g0 + j] = q * s
    return out


@pytest.mark.parametrize("bits,group", [(4, 8), (4, None), (8, 16), (8, None)])
def test_fake_quantize_matches_reference_and_passes_gradients_straight(bits, group):
    g = torch.Generator().manual_seed(SEED + bits)
    w = torch.randn(6, 32, generator=g, dtype=torch.float64).requires_grad_(True)
    spec = QuantSpec(bits, group)
    got = fake_quantize(w, spec)
    assert torch.allclose(got.detach(), _ref_fake_quant(w.detach(), bits, group), rtol=0, atol=1e-12)
    levels = {round(float(x), 9) for x in (got.detach()[0, : group or 32] / got.detach()[0, : group or 32].abs().max())}
    assert len(levels) <= 2**bits
    up = torch.randn(6, 32, generator=g, dtype=torch.float64)
    (gw,) = torch.autograd.grad((got * up).sum(), w)
    assert torch.equal(gw, up)  # straight-through: the rounding's gradient is the identity


def test_spec_is_checked():
    with pytest.raises(RecipeError, match="bits must be 4 or 8"):
        QuantSpec.parse({"bits": 3})
    with pytest.raises(RecipeError, match="unknown key"):
        QuantSpec.parse({"bits": 4, "groups": 8})
    with pytest.raises(RecipeError, match="does not divide"):
        fake_quantize(torch.randn(2, 30), QuantSpec(4, 16))


def test_export_loads_in_transformers_and_equals_the_fake_quantised_model(tiny_model_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForImageTextToText

    from vlmkd.models.build import load_model

    model, tok = load_model(tiny_model_dir)
    spec = QuantSpec(4, 32)
    assert add_fake_quant(model, spec) == 14  # 2 decoder layers x 7 linear layers
    sd = plain_state_dict(model, baked=True)
    assert not any("parametrizations" in k for k in sd)
    out = export_quantized(model, spec, tok, tmp_path / "int4")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    loaded = AutoModelForImageTextToText.from_pretrained(str(out))
    ids = torch.randint(5, 60, (2, 11), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = loaded(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    plain = load_model(tiny_model_dir)[0]
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, a, atol=1e-4)  # quantisation did change it


def test_qat_stage_trains_resumes_and_exports(trained_tiny_teacher, shapes_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    from vlmkd.teacher.hf_backend import Extraction
    from vlmkd.teacher.job import CacheJob, run_cache_job
    from vlmkd.train.student import train_student_run

    cache = tmp_path / "cache"
    run_cache_job(CacheJob(trained_tiny_teacher, shapes_dir / "train.json", cache,
                           Extraction(topk=8, attn_layers=[], hidden_points=[]), samples_per_shard=64))
    student = {**TINY_IDEFICS3, "vision_from": "teacher", "text": {"hidden": 32, "layers": 1, "heads": 2,
                                                                    "intermediate": 64}}
    stages = [{"name": "kd", "data": "questions", "steps": 12, "lr": 3e-3, "warmup": 1, "batch_size": 8,
               "trainable": ["projector", "llm"], "losses": {"ce": 1.0, "res": 1.0}, "qat": {"bits": 4, "group_size": 16}}]
    recipe = tmp_path / "qat.yaml"
    recipe.write_text(yaml.safe_dump({"name": "qat", "model": student, "eval_every": 1000, "eval_samples": 8,
                                      "save_every": 4, "log_every": 1, "stages": stages}))
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_student_run(recipe, cache, full, val=shapes_dir / "val.json")
    train_student_run(recipe, cache, cut, val=shapes_dir / "val.json", stop_after=5)
    assert (cut / "checkpoint" / "model.safetensors").is_file()
    train_student_run(recipe, cache, cut, val=shapes_dir / "val.json")
    rows = {r: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (full, cut)}
    a = [x["loss"] for x in rows[full] if x["kind"] == "train"]
    b = [x["loss"] for x in rows[cut] if x["kind"] == "train"]
    assert a[-1] == pytest.approx(b[-1], rel=1e-4)  # the resumed QAT run follows the uninterrupted one
    exported = [x for x in rows[full] if x["kind"] == "eval_export"]
    fq = [x for x in rows[full] if x["kind"] == "eval"][-1]
    assert exported and (full / "model_w4g16" / "config.json").is_file()
    for key in ("val_accuracy", "val_nll"):  # the export computes what the fake-quantised student did
        assert exported[0][key] == pytest.approx(fq[key], abs=1e-5), key
