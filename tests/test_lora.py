"""LoRA students (PEFT adapters in the LLM): only the adapters and the fully trainable parts move,
resume is exact, and the merged export loads in plain transformers with the adapted model's logits."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import TINY_IDEFICS3
from safetensors.torch import load_file

pytest.importorskip("peft")

from vlmkd.errors import RecipeError  # noqa: E402
from vlmkd.models.lora import LoraSpec, merged_state_dict  # noqa: E402
from vlmkd.teacher.hf_backend import Extraction  # noqa: E402
from vlmkd.teacher.job import CacheJob, run_cache_job  # noqa: E402
from vlmkd.train.checkpoint import find_checkpoint  # noqa: E402
from vlmkd.train.student import prepare_student, train_student_run  # noqa: E402

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}
STUDENT = {**TINY_IDEFICS3, "vision_from": "teacher", "lora": LORA,
           "text": {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64}}


@pytest.fixture(scope="module")
def cache(trained_tiny_teacher, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("loracache")
    run_cache_job(CacheJob(trained_tiny_teacher, shapes_dir / "train.json", out,
                           Extraction(topk=16, attn_layers=[0], hidden_points=["projector"]),
                           samples_per_shard=64, val=shapes_dir / "val.json"))
    return out


def _recipe(tmp_path, model=STUDENT, steps=8, **stage):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "lora", "model": model, "eval_every": 1000, "eval_samples": 8,
                                    "save_every": 1000, "log_every": 1, "stages": [
                                        {"name": "kd", "data": "questions", "steps": steps, "lr": 1e-2, "warmup": 1,
                                         "batch_size": 8, "trainable": ["projector", "llm"],
                                         "losses": {"ce": 1.0, "res": 1.0, "align": 1.0}, **stage}]}))
    return path


def test_only_adapters_and_the_projector_train(cache, tmp_path):
    recipe = _recipe(tmp_path)
    init = {k: v.clone() for k, v in prepare_student(recipe, cache, data_workers=0).model.state_dict().items()}
    assert any(".lora_A." in k for k in init) and not any("vision" in k and "lora" in k for k in init)
    res = train_student_run(recipe, cache, tmp_path / "run", data_workers=0)
    adapters = load_file(str(tmp_path / "run" / "lora" / "adapters.safetensors"))
    assert adapters and all(".lora_" in k for k in adapters)
    assert any(float(v.abs().sum()) > 0 for k, v in adapters.items() if ".lora_B." in k)  # B starts at 0: it moved
    saved = load_file(str(res.model_dir / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in saved)  # a plain checkpoint
    from transformers import AutoModelForImageTextToText

    plain = AutoModelForImageTextToText.from_pretrained(res.model_dir).eval()
    for k, v in plain.state_dict().items():
        base = k.replace(".weight", ".base_layer.weight") if k.replace(".weight", ".base_layer.weight") in init else k
        if "connector" in k:
            continue  # fully trainable
        if base != k:  # an adapted layer: base + B A, B no longer 0
            continue
        assert torch.equal(v, init[k]), k  # vision tower, embeddings, norms, LM head: untouched
    assert not torch.equal(plain.state_dict()["model.connector.modality_projection.proj.weight"],
                           init["model.connector.modality_projection.proj.weight"])


def _merged_logits_gap(run, tmp_path, seed=0) -> float:
    """Max |logit difference| between the adapted model (adapters with non-zero B, as after training)
    and its merged export loaded in plain transformers, on one cached batch."""
    from transformers import AutoModelForImageTextToText

    from vlmkd.models.build import save_model

    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in run.model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.2)
    batch = next(run.source.batches(0, run.recipe.stages[0], 0))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    run.model.eval()
    save_model(run.model, run.hf_tok, tmp_path / "merged", state_dict=merged_state_dict(run.model))
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        return float((plain(**inputs).logits - run.model(**inputs).logits).abs().max())


def test_merged_export_has_the_adapted_models_logits(cache, tmp_path):
    assert _merged_logits_gap(prepare_student(_recipe(tmp_path), cache, data_workers=0), tmp_path) < 1e-5


def test_resume_is_exact(cache, tmp_path):
    recipe = _recipe(tmp_path, steps=8)
    train_student_run(recipe, cache, tmp_path / "whole", data_workers=0)
    train_student_run(recipe, cache, tmp_path / "cut", data_workers=0, stop_after=3)
    assert find_checkpoint(tmp_path / "cut") is not None
    train_student_run(recipe, cache, tmp_path / "cut", data_workers=0)
    a = load_file(str(tmp_path / "whole" / "lora" / "adapters.safetensors"))
    b = load_file(str(tmp_path / "cut" / "lora" / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_lora_sections_are_refused(cache, tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['rank'\]"):
        LoraSpec.parse({"rank": 8})
    with pytest.raises(RecipeError, match="not with qat"):
        prepare_student(_recipe(tmp_path, qat={"bits": 4, "group_size": 32}), cache, data_workers=0)


def test_qlora_base_is_frozen_integers_and_the_export_merges(cache, tmp_path):
    """QLoRA: the decoder's base weights held as int4 levels (int8 storage) + scales, frozen; adapters
    train; resume is exact; the export (dequantised + merged) has the adapted model's logits."""
    from vlmkd.models.lora import QuantizedLinear

    model = {**STUDENT, "lora": {**LORA, "quantize_base": {"bits": 4, "group_size": 32}}}
    recipe = _recipe(tmp_path, model=model, steps=6)
    run = prepare_student(recipe, cache, data_workers=0)
    quant = [m for m in run.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quant) == 2 * 7  # every decoder linear of the 2 layers
    for m in quant:
        assert m.q.dtype == torch.int8 and int(m.q.min()) >= -8 and int(m.q.max()) <= 7
    train_student_run(recipe, cache, tmp_path / "whole", data_workers=0)
    train_student_run(recipe, cache, tmp_path / "cut", data_workers=0, stop_after=2)
    train_student_run(recipe, cache, tmp_path / "cut", data_workers=0)
    a = load_file(str(tmp_path / "whole" / "lora" / "adapters.safetensors"))
    b = load_file(str(tmp_path / "cut" / "lora" / "adapters.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and any(float(v.abs().sum()) for k, v in a.items() if "lora_B" in k)
    trained = load_file(str(find_checkpoint(tmp_path / "whole") / "model.safetensors"))
    fresh = {k: v for k, v in run.model.state_dict().items() if k.endswith(".q")}
    assert fresh and all(torch.equal(trained[k], v) for k, v in fresh.items())  # the base never moved
    assert _merged_logits_gap(run, tmp_path, seed=1) < 1e-5  # dequantised base + B A
    with pytest.raises(RecipeError, match="bits must be 4 or 8"):
        LoraSpec.parse({"quantize_base": {"bits": 3}})
