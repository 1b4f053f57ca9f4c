"""LLaVA-MoD preference distillation: shapes preference pairs, the cache scoring both answers with
the teacher's own log-probs, and a student trained with the DPO-style term from the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_IDEFICS3

from vlmkd.cache.reader import CacheReader
from vlmkd.data.shapes import COLORS, COUNT_WORDS, SHAPES, add_preference_pairs, wrong_answer
from vlmkd.teacher.hf_backend import Extraction
from vlmkd.teacher.job import CacheJob, run_cache_job


def test_wrong_answers_are_plausible_and_seeded():
    rng = np.random.default_rng(0)
    kinds = {"color_of_shape": set(COLORS), "color_at_position": {*COLORS, "nothing"},
             "shape_at_position": {*SHAPES, "nothing"}, "count_shape": set(COUNT_WORDS), "exists_color_shape": {"yes", "no"}}
    for qtype, pool in kinds.items():
        for answer in pool:
            w = wrong_answer(qtype, answer, rng)
            assert w != answer and w in pool
    recs = [{"id": "a", "image": "x.png", "question_type": "count_shape",
             "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "two"}]},
            {"id": "cap", "image": "x.png", "conversations": [{"from": "human", "value": "Describe."},
                                                              {"from": "gpt", "value": "..."}]}]
    one, two = add_preference_pairs(recs, 3), add_preference_pairs(recs[:1], 3)
    assert one[0]["rejected"] == two[0]["rejected"] != "two" and "rejected" not in one[1]


@pytest.fixture(scope="module")
def pref_cache(trained_tiny_teacher, shapes_dir, tmp_path_factory):
    records = json.loads((shapes_dir / "train.json").read_text())
    questions = [r for r in records if r.get("question_type")][:48]
    manifest = shapes_dir / "train_pref.json"  # beside the images it refers to
    manifest.write_text(json.dumps(add_preference_pairs(questions, 0)))
    out = tmp_path_factory.mktemp("prefcache")
    run_cache_job(CacheJob(trained_tiny_teacher, manifest, out, Extraction(topk=8, attn_layers=[], hidden_points=[],
                                                                           gram=False), samples_per_shard=32))
    return out, manifest


def test_cached_preference_scores_are_the_teachers_own(pref_cache, trained_tiny_teacher):
    from dataclasses import replace

    from vlmkd.data.dataset import collate, encode_samples, model_inputs
    from vlmkd.data.manifest import Turn, load_samples
    from vlmkd.models.build import data_tokenizer, load_model

    cache, manifest = pref_cache
    model, hf = load_model(trained_tiny_teacher)
    model.eval()
    tok, layout = data_tokenizer(model, hf)
    by_id = {s.id: s for s in load_samples(manifest)[0]}

    def own(sample):
        (it,) = encode_samples([sample], tok, layout)
        with torch.no_grad():
            logits = model(**model_inputs(collate([it], layout, tok.pad_id))).logits[0].double()
        t = np.flatnonzero(it.enc.labels_mask)
        lp = torch.log_softmax(logits, -1)[torch.from_numpy(t - 1), torch.from_numpy(it.enc.input_ids[t]).long()]
        return lp.numpy(), it.enc.input_ids

    n = 0
    for s in CacheReader(cache, payloads=("tokens", "pref")).samples():
        sample = by_id[s["id"]]
        chosen, _ = own(sample)
        wrong = replace(sample, turns=(sample.turns[0], Turn("assistant", sample.extra["rejected"])))
        rejected, r_ids = own(wrong)
        assert np.allclose(s["pref_chosen_lp"], chosen, rtol=1e-5, atol=1e-5)
        assert np.allclose(s["pref_rejected_lp"], rejected, rtol=1e-5, atol=1e-5)
        assert np.array_equal(s["r_input_ids"], r_ids) and s["r_response"].sum() == len(rejected)
        n += 1
    assert n == 48


def test_student_trains_with_the_preference_term(pref_cache, shapes_dir, tmp_path):
    from vlmkd.train.student import train_student_run

    cache, _ = pref_cache
    student = {**TINY_IDEFICS3, "vision_from": "teacher", "text": {"hidden": 32, "layers": 1, "heads": 2,
                                                                 "intermediate": 64}}
    recipe = tmp_path / "pref.yaml"
    recipe.write_text(yaml.safe_dump({"name": "pref", "model": student, "eval_every": 1000, "eval_samples": 8,
                                      "save_every": 1000, "log_every": 1, "stages": [{
                                          "name": "pref", "data": "questions", "steps": 30, "lr": 3e-3, "warmup": 2,
                                          "batch_size": 8, "trainable": ["projector", "llm"],
                                          "losses": {"ce": 1.0, "res": 1.0, "pref": 1.0},
                                          "loss_args": {"pref_beta": 0.5}}]}))
    run = tmp_path / "run"
    train_student_run(recipe, cache, run, val=shapes_dir / "val.json")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    pref = [r["loss_pref"] for r in rows if r["kind"] == "train"]
    assert len(pref) == 30 and sum(pref[-5:]) < sum(pref[:5])


def test_sequence_logprob_against_float64_loop_and_gradcheck():
    """The student side of the pref term: the summed log-prob of each row's response tokens."""
    from vlmkd.train.terms.pref import sequence_logprob

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 3:5] = mask[1, 1] = mask[2, 5] = True
    got = sequence_logprob(logits, ids, mask)
    want = [sum(float(torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]]) for t in range(1, 6) if mask[b, t])
            for b in range(3)]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: sequence_logprob(x, ids, mask), (logits,))


def test_paired_questions_beside_unpaired_captions_in_one_cache(trained_tiny_teacher, shapes_dir, tmp_path):
    """One cache for every row (tools/ablations.py): questions with preference pairs beside captions
    without. A run whose other stage reads the captions trains; a pref stage whose batch would mix
    paired and unpaired samples is refused naming the sample, not misread."""
    from vlmkd.errors import CacheError
    from vlmkd.train.student import train_student_run

    records = json.loads((shapes_dir / "train.json").read_text())
    questions = add_preference_pairs([r for r in records if r.get("question_type")][:24], 0)
    captions = [r for r in records if r.get("kind") == "captions"][:16]
    manifest = shapes_dir / "train_mixed_pairs.json"
    manifest.write_text(json.dumps(questions + captions))
    cache = tmp_path / "cache"
    run_cache_job(CacheJob(trained_tiny_teacher, manifest, cache, Extraction(topk=8, attn_layers=[], hidden_points=[],
                                                                             gram=False), samples_per_shard=16))
    paired = {s["id"]: "r_input_ids" in s for s in CacheReader(cache, payloads=("tokens", "pref")).samples()}
    assert len(paired) == 40 and sum(paired.values()) == 24
    student = {**TINY_IDEFICS3, "vision_from": "teacher", "text": {"hidden": 32, "layers": 1, "heads": 2,
                                                                 "intermediate": 64}}
    stage = {"lr": 3e-3, "warmup": 1, "batch_size": 8, "trainable": ["projector", "llm"]}

    def recipe(name, stages):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "model": student, "eval_every": 1000, "eval_samples": 8,
                                        "save_every": 1000, "log_every": 1, "stages": stages}))
        return path

    ok = recipe("ok", [{**stage, "name": "pt", "data": "captions", "steps": 3, "losses": {"ce": 1.0}},
                       {**stage, "name": "pref", "data": "questions", "steps": 3,
                        "losses": {"ce": 1.0, "pref": 1.0}}])
    train_student_run(ok, cache, tmp_path / "ok", val=shapes_dir / "val.json")
    rows = [json.loads(x) for x in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows if r["kind"] == "train" and "loss_pref" in r] == ["pref"] * 3
    mixed = recipe("mixed", [{**stage, "name": "pref", "data": "all", "steps": 3, "losses": {"ce": 1.0, "pref": 1.0}}])
    with pytest.raises(CacheError, match="has no preference pair"):
        train_student_run(mixed, cache, tmp_path / "mixed", val=shapes_dir / "val.json")
