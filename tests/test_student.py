"""train-student from a cache: every KD term trains, stages chain and resume, the student loads in
plain transformers and answers the eval; the student never touches the teacher."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import TINY_IDEFICS3

from vlmkd.cache.reader import CacheReader
from vlmkd.errors import CacheError
from vlmkd.teacher.hf_backend import Extraction
from vlmkd.teacher.job import CacheJob, run_cache_job
from vlmkd.train.student import train_student_run

STUDENT = {**TINY_IDEFICS3, "vision_from": "teacher", "text": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}}


@pytest.fixture(scope="module")
def kd_cache(trained_tiny_teacher, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kdcache")
    settings = Extraction(topk=16, score_visual=True, attn_layers=[0], hidden_points=["projector", "final"])
    run_cache_job(CacheJob(trained_tiny_teacher, shapes_dir / "train.json", out, settings, samples_per_shard=64))
    return out


def _recipe(tmp_path, name, stages):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "model": STUDENT, "eval_every": 1000, "eval_samples": 16,
                                    "save_every": 5, "log_every": 1, "stages": stages}))
    return path


def _terms(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def _falls(rows, key, n=5):
    vals = [r[key] for r in rows if key in r]
    return sum(vals[-n:]) / n < sum(vals[:n]) / n


@pytest.mark.parametrize("losses,args", [
    ({"ce": 1.0, "res": 1.0, "vis": 1.0, "rel": 1.0}, {"logit_loss": "fkl"}),
    ({"ce": 1.0, "res": 1.0, "attn": 1.0, "align": 1.0}, {"logit_loss": "jsd", "attn_kind": "mse"}),
    ({"res": 1.0, "feat": 1.0}, {"logit_loss": "rkl", "temperature": {"start": 3.0, "end": 1.0}}),
])
def test_every_kd_term_decreases(kd_cache, shapes_dir, tmp_path, losses, args):
    stage = {"name": "kd", "data": "questions", "steps": 40, "lr": 3e-3, "warmup": 3, "batch_size": 8,
             "trainable": ["projector", "llm"], "losses": losses, "loss_args": args}
    run = tmp_path / "run"
    res = train_student_run(_recipe(tmp_path, "kd", [stage]), kd_cache, run, val=shapes_dir / "val.json")
    rows = _terms(run)
    for term in losses:
        assert _falls(rows, f"loss_{term}"), term
    assert res.model_dir.is_dir()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fused_logit_terms_equal_the_full_logits_path(kd_cache, shapes_dir, tmp_path, impl):
    """ce/res/vis through the chunked (torch) or Triton LM-head path give the full-logits path's values
    on the same first batch (same init, same data): only the scored rows' hidden states meet the head."""
    if impl == "triton":
        pytest.importorskip("triton")
    first = {}
    for name in ("full", impl):
        stage = {"name": "kd", "data": "questions", "steps": 1, "lr": 1e-3, "warmup": 0, "batch_size": 8,
                 "trainable": ["projector", "llm"], "losses": {"ce": 1.0, "res": 1.0, "vis": 1.0},
                 "loss_args": {"logit_loss": "jsd", "temperature": 1.5, "logit_impl": name}}
        run = tmp_path / name
        train_student_run(_recipe(tmp_path, name, [stage]), kd_cache, run, val=shapes_dir / "val.json")
        first[name] = _terms(run)[0]
    for term in ("loss_ce", "loss_res", "loss_vis"):
        assert first[impl][term] == pytest.approx(first["full"][term], rel=1e-5), term


def test_three_stages_chain_resume_and_the_student_loads(kd_cache, shapes_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlmkd.eval.run import evaluate_model

    base = {"steps": 6, "lr": 2e-3, "warmup": 1, "batch_size": 4, "trainable": ["projector", "llm"]}
    stages = [{"name": "dpt", "data": "captions", "losses": {"ce": 1, "res": 1, "vis": 1, "rel": 1}, **base},
              {"name": "sft", "data": "questions", "losses": {"ce": 1}, **base},
              {"name": "dft", "data": "questions", "losses": {"ce": 1, "res": 1, "vis": 1, "rel": 1}, **base}]
    recipe = _recipe(tmp_path, "llava_kd", stages)
    full = tmp_path / "full"
    train_student_run(recipe, kd_cache, full, val=shapes_dir / "val.json")
    cut = tmp_path / "cut"
    from vlmkd.train import loop

    orig = loop.train

    def stop_mid_sft(*a, **kw):
        return orig(*a, **{**kw, "stop_after": 9})

    loop_train = stop_mid_sft
    import vlmkd.train.student as st

    st.train = loop_train
    try:
        train_student_run(recipe, kd_cache, cut, val=shapes_dir / "val.json")
    finally:
        st.train = orig
    assert json.loads((cut / "checkpoint/state.json").read_text())["stage"] == "sft"
    train_student_run(recipe, kd_cache, cut, val=shapes_dir / "val.json")
    a, b = _terms(full), _terms(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 19))
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
    for s in ("stage_0_dpt", "stage_1_sft", "stage_2_dft", "model"):
        assert (full / s / "config.json").is_file()
    AutoModelForImageTextToText.from_pretrained(str(full / "model"))
    scores = evaluate_model(full / "model", shapes_dir / "test.json")
    assert scores["n"] == 30 and 0.0 <= scores["accuracy"] <= 1.0


def test_student_with_another_tokenizer_is_refused(kd_cache, tmp_path, hf_tok):
    from vlmkd.cache.manifest import tokenizer_fingerprint
    from vlmkd.models.tokenizer import train_tokenizer

    reader = CacheReader(kd_cache)
    reader.check_tokenizer(tokenizer_fingerprint(hf_tok))
    with pytest.raises(CacheError, match="tokenizer"):
        reader.check_tokenizer(tokenizer_fingerprint(train_tokenizer(["other words entirely"], 300)))


def test_missing_payload_for_a_loss_is_a_clear_error(tiny_model_dir, shapes_dir, tmp_path):
    from vlmkd.errors import RecipeError

    out = tmp_path / "plain"
    run_cache_job(CacheJob(tiny_model_dir, shapes_dir / "val.json", out, Extraction(topk=8, score_visual=False)))
    stage = {"name": "kd", "steps": 2, "batch_size": 4, "losses": {"vis": 1.0}}
    with pytest.raises(RecipeError, match="score-visual"):
        train_student_run(_recipe(tmp_path, "v", [stage]), out, tmp_path / "r", val=shapes_dir / "val.json")


def test_a_copied_cache_trains_a_student_alone(trained_tiny_teacher, shapes_dir, tmp_path, monkeypatch):
    """One cache, many students, on other machines: the cache is copied elsewhere, the teacher's folder
    and the data folder are gone, the run starts from another directory, no --val: the student's
    tokenizer and vision tower and the validation data all come from the cache itself."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(trained_tiny_teacher, teacher)
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    built = tmp_path / "built"
    settings = Extraction(topk=8, score_visual=True, attn_layers=[0], hidden_points=["final"])
    run_cache_job(CacheJob(teacher, data / "train.json", built, settings, samples_per_shard=64, val=data / "val.json"))
    moved = tmp_path / "elsewhere" / "cache"
    shutil.copytree(built, moved)
    shutil.rmtree(built)
    shutil.rmtree(teacher)
    shutil.rmtree(data)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    stage = {"name": "kd", "data": "questions", "steps": 3, "lr": 3e-3, "warmup": 1, "batch_size": 4,
             "trainable": ["projector", "llm"], "losses": {"ce": 1.0, "vis": 1.0}}
    recipe = _recipe(tmp_path, "alone", [stage])
    res = train_student_run(recipe, moved, work / "run")
    assert res.model_dir.is_dir() and res.last_eval["val_accuracy"] >= 0
    m = CacheReader(moved, payloads=()).manifest
    assert "vision.safetensors" in m["teacher_files"]["files"] and m["validation"]["copied"] == 30


def test_an_old_cache_without_its_teacher_is_refused_with_what_to_do(kd_cache, tmp_path):
    import shutil

    from vlmkd.cache.manifest import write_manifest
    from vlmkd.errors import RecipeError

    d = tmp_path / "old"
    shutil.copytree(kd_cache, d)
    m = json.loads((d / "manifest.json").read_text())
    m.pop("teacher_files", None)
    m["teacher_path"] = "demo/teacher"  # as caches before 2026-12 recorded it: relative, as typed
    write_manifest(d / "manifest.json", m)
    stage = {"name": "kd", "steps": 1, "losses": {"ce": 1.0}}
    with pytest.raises(RecipeError, match=r"does not hold the teacher's tokenizer .* rebuild the cache"):
        train_student_run(_recipe(tmp_path, "old", [stage]), d, tmp_path / "run", val=d)


def test_a_llava_caches_vision_tower_travels_with_it(hf_tok, shapes_dir, tmp_path):
    """LLaVA checkpoints name the tower `vision_tower.*` (Idefics3: `model.vision_model.*`): the cache
    holds it either way, and a student built from the cache alone starts from the teacher's tower."""
    import shutil

    import torch
    from conftest import TINY_LLAVA

    from vlmkd.models.build import build_model, save_model
    from vlmkd.models.parts import parts_of

    teacher = save_model(build_model(TINY_LLAVA, hf_tok), hf_tok, tmp_path / "teacher")
    run_cache_job(CacheJob(teacher, shapes_dir / "val.json", tmp_path / "cache", Extraction(topk=8, attn_layers=[],
                                                                                            hidden_points=[])))
    m = CacheReader(tmp_path / "cache", payloads=()).manifest
    assert "vision.safetensors" in m["teacher_files"]["files"]
    want = parts_of(build_model(TINY_LLAVA, hf_tok))["vision"].state_dict()
    shutil.rmtree(teacher)
    student = build_model({**TINY_LLAVA, "init_seed": 7, "vision_from": tmp_path / "cache" / "teacher"}, hf_tok)
    got = parts_of(student)["vision"].state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_student_assembled_from_parts_starts_from_its_language_models_weights(kd_cache, hf_tok, shapes_dir, tmp_path):
    """The LLaVA way: the teacher's vision tower, a new projector, a pretrained language model from its
    own folder (`text_from`), which must share the teacher's tokenizer; the student trains from the cache."""
    import torch
    from transformers import LlamaForCausalLM

    from vlmkd.errors import ModelError
    from vlmkd.models.build import build_model
    from vlmkd.models.families.base import llama_text_config
    from vlmkd.models.tokenizer import train_tokenizer

    torch.manual_seed(3)
    lm = LlamaForCausalLM(llama_text_config({"hidden": 48, "layers": 2, "heads": 2, "intermediate": 96}, hf_tok, 128))
    lm.save_pretrained(str(tmp_path / "lm"))
    hf_tok.save_pretrained(str(tmp_path / "lm"))
    spec = {k: v for k, v in STUDENT.items() if k != "text"}
    spec = {**spec, "vision_from": None, "text_from": str(tmp_path / "lm")}
    student = build_model(spec, hf_tok)
    for k, v in lm.model.state_dict().items():
        assert torch.equal(student.model.text_model.state_dict()[k], v), k
    assert torch.equal(student.lm_head.weight, lm.lm_head.weight)
    assert student.config.text_config.hidden_size == 48
    # trains from the cache with the teacher's tower
    stage = {"name": "kd", "steps": 3, "lr": 1e-3, "warmup": 1, "batch_size": 4, "trainable": ["projector", "llm"],
             "losses": {"ce": 1.0, "res": 1.0}}
    path = tmp_path / "parts.yaml"
    path.write_text(yaml.safe_dump({"name": "parts", "model": {**spec, "vision_from": "teacher"}, "eval_every": 1000,
                                    "eval_samples": 4, "log_every": 1, "stages": [stage]}))
    train_student_run(path, kd_cache, tmp_path / "run", val=shapes_dir / "val.json")
    assert len(_terms(tmp_path / "run")) == 3
    # an LM with another tokenizer is refused, naming why
    other = train_tokenizer(["a completely different corpus of words"] * 4)
    other.save_pretrained(str(tmp_path / "lm"))
    with pytest.raises(ModelError, match="its tokenizer is not the teacher's"):
        build_model(spec, hf_tok)


def test_a_language_model_pretrained_inside_a_vlm_is_saved_as_a_causal_lm(hf_tok, tmp_path):
    """`save_language_model`: the VLM's LLM and head as an AutoModelForCausalLM that gives the VLM's own
    logits on text, and that `text_from` starts a new student from, weight for weight."""
    import torch
    from transformers import AutoModelForCausalLM

    from vlmkd.models.build import build_model, save_language_model

    spec = {k: v for k, v in STUDENT.items() if k != "vision_from"}
    vlm = build_model({**spec, "init_seed": 4}, hf_tok).eval()
    with torch.no_grad():
        for p in vlm.parameters():  # not the init's symmetric values: every tensor must be carried
            p.add_(torch.randn_like(p) * 0.02)
    save_language_model(vlm, hf_tok, tmp_path / "lm")
    lm = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm")).eval()
    ids = torch.tensor([hf_tok("a red circle at the top left.\nWhat color is the circle?")["input_ids"]])
    with torch.no_grad():
        want = vlm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    student = build_model({**spec, "text_from": str(tmp_path / "lm"), "init_seed": 9}, hf_tok)
    assert all(torch.equal(a, b) for a, b in zip(student.model.text_model.state_dict().values(),
                                                 vlm.model.text_model.state_dict().values(), strict=True))
    assert torch.equal(student.lm_head.weight, vlm.lm_head.weight)
