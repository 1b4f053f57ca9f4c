"""`vlmkd generate`, sequence-level KD, on-policy rounds and preference pairs from real generations:
rows written in the input's format with provenance, exactly-once resume, the same greedy answers
through vLLM and transformers, and generate -> cache -> train on the tiny demo models."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmkd.cache.manifest import weights_fingerprint
from vlmkd.data.manifest import Sample, read_manifest
from vlmkd.errors import DataError, RecipeError
from vlmkd.generate.engines import HFEngine, Sampling
from vlmkd.generate.job import GenerateJob, paths, run_generate

SEED = random.randrange(2**31)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts(shapes_dir, tmp_path_factory):
    """Rows of every kind a user brings: LLaVA rows (with answers), a LLaVA row without one, ShareGPT
    messages with content parts, an alpaca prompt without output, a multi-turn conversation, a
    missing image and a malformed row."""
    rows = json.loads((shapes_dir / "train.json").read_text())[:30]
    img = rows[0]["image"]
    extra = [
        {"id": "no-answer", "image": img, "conversations": [{"from": "human", "value": "<image>\nWhat color is the circle?"}]},
        {"id": "sharegpt", "messages": [{"role": "user", "content": [{"type": "image", "image": img},
                                                                     {"type": "text", "text": "How many shapes?"}]},
                                        {"role": "assistant", "content": [{"type": "text", "text": "two"}]}]},
        {"id": "alpaca", "instruction": "Name a colour.", "input": ""},
        {"id": "multi", "image": img, "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "And the square?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "missing", "image": "nowhere/none.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]},
        {"id": "bad", "conversations": "not a list"},
    ]
    path = shapes_dir / "prompts.json"
    path.write_text(json.dumps(rows + extra))
    return path


def test_rows_keep_their_format_and_provenance(trained_tiny_teacher, prompts, tmp_path):
    print("seed", SEED)
    out = tmp_path / "elsewhere" / "answers.jsonl"
    st = run_generate(GenerateJob(trained_tiny_teacher, prompts, out, Sampling(max_new_tokens=6), "hf", batch_size=8))
    c = st["counts"]
    raw = json.loads(prompts.read_text())
    assert c["rows"] == len(raw) == c["prompts"] + c["rejected_rows"] + c["not_asked"]
    assert c["answers"] + c["empty_answers"] == c["prompts"]
    rejects = _lines(paths(out)["rejects"])
    by_reason = {r["id"]: r["reason"] for r in rejects}
    assert "none.png" in by_reason["missing"] and "bad" in by_reason
    written = {r["id"]: r for r in _lines(out)}
    src = {r["id"]: r for r in raw}
    for sid, row in written.items():
        g = row["generation"]
        orig = src[g["prompt_id"]]
        assert sid == f"{g['prompt_id']}-g0" and g["prompt_row"] == raw.index(orig)
        assert g["engine"] == "hf" and g["temperature"] == 0 and g["n"] == 1 and g["finish"] in ("stop", "length")
        assert g["model_sha256"] == weights_fingerprint(trained_tiny_teacher)
        assert set(orig) - {"rejected"} <= set(row)  # the row's own keys (its schema) are all still there
    assert written["multi-g0"]["conversations"][:3] == src["multi"]["conversations"][:3]
    assert written["multi-g0"]["generation"]["replaced"] == "blue"
    assert written["no-answer-g0"]["conversations"][1]["from"] == "gpt"
    assert written["no-answer-g0"]["generation"]["replaced"] is None
    assert written["sharegpt-g0"]["messages"][1]["role"] == "assistant"
    assert isinstance(written["sharegpt-g0"]["messages"][1]["content"], list)
    assert "output" in written["alpaca-g0"]
    # read back from its own folder: same images, same prompts, the answer where the reader finds it
    back = {s.id: s for s in read_manifest(out) if isinstance(s, Sample)}
    assert set(back) == {s for s in written}
    given = {s.id: s for s in read_manifest(prompts, prompts=True) if isinstance(s, Sample)}
    for sid, s in back.items():
        o = given[sid[:-3]]
        assert s.images == o.images
        last_user = max(i for i, t in enumerate(o.turns) if t.role == "user")
        assert s.turns[: last_user + 1] == o.turns[: last_user + 1]
        assert s.turns[-1].role == "assistant" and s.turns[-1].text.strip()


def test_resume_answers_every_prompt_exactly_once(trained_tiny_teacher, prompts, tmp_path):
    """Killed after one batch, with half a line written after it: the re-run truncates to the last
    recorded batch and writes what an uninterrupted run writes, byte for byte."""
    print("seed", SEED)
    s = Sampling(n=2, temperature=1.0, top_k=20, max_new_tokens=5, seed=SEED % 1000)
    engine = HFEngine(trained_tiny_teacher)
    whole = tmp_path / "whole.jsonl"
    run_generate(GenerateJob(trained_tiny_teacher, prompts, whole, s, "hf", batch_size=8), engine)
    part = tmp_path / "part.jsonl"
    st = run_generate(GenerateJob(trained_tiny_teacher, prompts, part, s, "hf", batch_size=8, stop_after=2), engine)
    assert st["state"] == "running" and st["cursor"] == 16
    with part.open("a") as f:
        f.write('{"id": "half a ro')  # the kill landed mid-write
    run_generate(GenerateJob(trained_tiny_teacher, prompts, part, s, "hf", batch_size=8), engine)
    assert part.read_bytes() == whole.read_bytes()
    assert paths(part)["rejects"].read_bytes() == paths(whole)["rejects"].read_bytes()
    rows = _lines(part)
    per_prompt = {}
    for r in rows:
        per_prompt.setdefault(r["generation"]["prompt_row"], set()).add(r["generation"]["sample"])
    empties = {(r["row"], r["sample"]) for r in _lines(paths(part)["rejects"]) if "sample" in r}
    for row, got in per_prompt.items():
        assert got | {j for (i, j) in empties if i == row} == {0, 1}
    assert len({r["id"] for r in rows}) == len(rows)
    # a complete job is not redone; another sampling on the same files is refused, naming what differs
    assert run_generate(GenerateJob(trained_tiny_teacher, prompts, part, s, "hf"), engine)["state"] == "complete"
    with pytest.raises(DataError, match="sampling"):
        run_generate(GenerateJob(trained_tiny_teacher, prompts, part, Sampling(max_new_tokens=5), "hf"), engine)


def test_sampling_is_seeded_per_row(trained_tiny_teacher, prompts, tmp_path):
    """A row's answers depend on its own seed only: another batch size gives the same answers, another
    job seed other ones."""
    s = Sampling(n=2, temperature=1.5, max_new_tokens=5, seed=3)
    engine = HFEngine(trained_tiny_teacher)
    a, b, c = (tmp_path / f"{k}.jsonl" for k in "abc")
    run_generate(GenerateJob(trained_tiny_teacher, prompts, a, s, "hf", batch_size=4), engine)
    run_generate(GenerateJob(trained_tiny_teacher, prompts, b, s, "hf", batch_size=11), engine)
    run_generate(GenerateJob(trained_tiny_teacher, prompts, c, Sampling(n=2, temperature=1.5, max_new_tokens=5, seed=4),
                             "hf", batch_size=4), engine)
    assert a.read_bytes() == b.read_bytes()
    ta = [r["conversations"][-1]["value"] for r in _lines(a) if "conversations" in r]
    tc = [r["conversations"][-1]["value"] for r in _lines(c) if "conversations" in r]
    assert ta != tc


def test_bad_settings_are_refused(trained_tiny_teacher, prompts, tmp_path):
    with pytest.raises(DataError, match="identical greedy"):
        Sampling(n=3)
    with pytest.raises(DataError, match="top-p"):
        Sampling(temperature=1.0, top_p=0)
    with pytest.raises(DataError, match=".jsonl"):
        run_generate(GenerateJob(trained_tiny_teacher, prompts, tmp_path / "x.csv", Sampling(), "hf"))
    (tmp_path / "taken.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="overwrite"):
        run_generate(GenerateJob(trained_tiny_teacher, prompts, tmp_path / "taken.jsonl", Sampling(), "hf"))


def test_json_list_output(trained_tiny_teacher, prompts, tmp_path):
    out = tmp_path / "answers.json"
    run_generate(GenerateJob(trained_tiny_teacher, prompts, out, Sampling(max_new_tokens=4), "hf"))
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows and not paths(out)["rows"].exists()
    assert sum(isinstance(s, Sample) for s in read_manifest(out)) == len(rows)


def test_greedy_answers_equal_model_generate(trained_tiny_teacher, prompts):
    """The engine's greedy answers (prompts batched by length) equal one-prompt `generate` calls of
    the model, decoded independently."""
    from vlmkd.data.dataset import collate, encode_samples, model_inputs

    engine = HFEngine(trained_tiny_teacher)
    samples = [s for s in read_manifest(prompts, prompts=True) if isinstance(s, Sample)][:12]
    items = encode_samples(samples, engine.tok, engine.layout, with_answer=False)
    got = engine.answer(items, list(range(len(items))), Sampling(max_new_tokens=6))
    for it, (c,) in zip(items, got, strict=True):
        b = collate([it], engine.layout, engine.tok.pad_id, prompt_only=True)
        with torch.no_grad():
            logits_ids = []
            ids = b["input_ids"]
            for _ in range(6):  # greedy by hand: argmax of the last position, appended
                inp = {**model_inputs(b), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
                nxt = int(engine.model(**inp).logits[0, -1].argmax())
                if nxt == engine.tok.eou_id:
                    break
                logits_ids.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert c.ids == logits_ids, it.sample.id


def test_seq_kd_generate_cache_train(trained_tiny_teacher, shapes_dir, prompts, tmp_path):
    """Teacher answers replace the data set's; cache-teacher scores them; a student trains on them."""
    from vlmkd.cache.reader import CacheReader
    from vlmkd.teacher.hf_backend import Extraction
    from vlmkd.teacher.job import CacheJob, run_cache_job
    from vlmkd.train.student import train_student_run

    answers = tmp_path / "teacher_answers.jsonl"
    st = run_generate(GenerateJob(trained_tiny_teacher, shapes_dir / "train.json", answers, Sampling(max_new_tokens=6),
                                  "hf"))
    cache = tmp_path / "cache"
    m = run_cache_job(CacheJob(trained_tiny_teacher, answers, cache, Extraction(topk=8, score_visual=True), "hf",
                               val=shapes_dir / "val.json"))
    assert m["counts"]["samples"] + m["counts"]["rejects"] == st["counts"]["answers"]
    ids = {s["id"] for s in CacheReader(cache, payloads=("tokens",)).samples()}
    assert all(i.endswith("-g0") for i in ids)
    recipe = tmp_path / "seqkd.yaml"
    recipe.write_text(json.dumps({"name": "seqkd", "model": _student_spec(), "eval_every": 1000, "save_every": 1000,
                                  "stages": [{"name": "kd", "steps": 5, "batch_size": 4, "losses": {"ce": 1.0, "res": 1.0}}]}))
    res = train_student_run(recipe, cache, tmp_path / "run")
    assert (res.model_dir / "config.json").is_file()


def _student_spec():
    from conftest import TINY_IDEFICS3

    return {**TINY_IDEFICS3, "text": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}}


def test_on_policy_rounds(trained_tiny_teacher, shapes_dir, tmp_path):
    """One round: the round-0 student answers its share of the prompts, the teacher scores them with
    the rest of the data set into the round's own cache, the student trains on from its weights."""
    from vlmkd.cache.reader import CacheReader
    from vlmkd.generate.rounds import run_rounds
    from vlmkd.teacher.hf_backend import Extraction
    from vlmkd.teacher.job import CacheJob, run_cache_job

    data = shapes_dir / "train.json"
    base = tmp_path / "base"
    run_cache_job(CacheJob(trained_tiny_teacher, data, base, Extraction(topk=8), "hf", val=shapes_dir / "val.json"))
    recipe = tmp_path / "op.yaml"
    recipe.write_text(json.dumps({"name": "op", "model": _student_spec(), "eval_every": 1000, "save_every": 1000,
                                  "on_policy": {"rounds": 1, "fraction": 0.25, "temperature": 1.0, "max_new_tokens": 4,
                                                "backend": "hf", "teacher_backend": "hf"},
                                  "stages": [{"name": "kd", "steps": 3, "batch_size": 4, "losses": {"res": 1.0}}]}))
    s = run_rounds(recipe, trained_tiny_teacher, str(base), tmp_path / "op")
    n_rows = len(json.loads(data.read_text()))
    r1 = s["rounds"][1]
    assert r1["generation"]["prompts"] + r1["generation"]["rejected_rows"] == round(0.25 * n_rows)
    assert r1["data"]["on_policy"] + r1["data"]["off_policy"] + r1["data"]["unanswered"] == n_rows
    ids = [x["id"] for x in CacheReader(r1["cache"], payloads=("tokens",)).samples()]
    assert sum(i.endswith("-g0") for i in ids) == r1["data"]["on_policy"]
    assert (tmp_path / "op" / "round-1" / "student" / "model" / "config.json").is_file()
    # the round's student started from round 0's weights
    import yaml

    model = yaml.safe_load((tmp_path / "op" / "round-1" / "recipe.yaml").read_text())["model"]
    assert model == {"path": str(tmp_path / "op" / "round-0" / "student" / "model")}
    with pytest.raises(RecipeError, match="on-policy"):
        from vlmkd.train.student import train_student_run

        train_student_run(recipe, base, tmp_path / "refused")
    with pytest.raises(RecipeError, match="fractoin"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(json.dumps({**json.loads(recipe.read_text()), "on_policy": {"fractoin": 0.5}}))
        run_rounds(bad, trained_tiny_teacher, str(base), tmp_path / "bad")


def test_pairs_from_sampled_answers(trained_tiny_teacher, shapes_dir, tmp_path):
    """The teacher rule picks the best- and worst-scored of each prompt's answers, by a score checked
    against a float64 log-softmax of one unbatched forward; the pairs cache and train with `pref`."""
    from vlmkd.data.dataset import collate, encode_samples, model_inputs
    from vlmkd.eval.score import first_word
    from vlmkd.generate.pairs import make_pairs
    from vlmkd.models.build import data_tokenizer, load_model
    from vlmkd.teacher.hf_backend import Extraction
    from vlmkd.teacher.job import CacheJob, run_cache_job
    from vlmkd.train.student import train_student_run

    print("seed", SEED)
    rows = json.loads((shapes_dir / "train.json").read_text())[:24]
    data = shapes_dir / "pair_prompts.json"  # beside the images it names
    data.write_text(json.dumps(rows))
    gen = tmp_path / "gen.jsonl"
    run_generate(GenerateJob(trained_tiny_teacher, data, gen, Sampling(n=4, temperature=2.0, max_new_tokens=3,
                                                                       seed=SEED % 997), "hf"))
    out = tmp_path / "pairs.jsonl"
    counts = make_pairs(trained_tiny_teacher, gen, out)
    assert counts["pairs"] + counts["rejects"] == counts["prompts"] == 24
    assert counts["pairs"] > 0
    model, hf_tok = load_model(trained_tiny_teacher)
    tok, layout = data_tokenizer(model, hf_tok)
    answers = {}
    for r in _lines(gen):
        answers.setdefault(r["generation"]["prompt_id"], []).append(r["conversations"][-1]["value"])

    def score(sample, text):  # float64 mean log p of the answer's tokens, one sequence, no batching
        from dataclasses import replace

        from vlmkd.data.manifest import Turn

        (it,) = encode_samples([replace(sample, turns=sample.turns[:-1] + (Turn("assistant", text),))], tok, layout)
        with torch.no_grad():
            lp = torch.log_softmax(model(**model_inputs(collate([it], layout, tok.pad_id))).logits[0].double(), -1)
        t = np.flatnonzero(it.enc.labels_mask)
        return float(lp[t - 1, it.enc.input_ids[t]].mean())

    samples = {s.id: s for s in read_manifest(data) if isinstance(s, Sample)}
    for p in _lines(out):
        pid = p["id"][: -len("-pair")]
        ref = {a: score(samples[pid], a) for a in set(answers[pid])}
        assert abs(ref[p["conversations"][-1]["value"]] - max(ref.values())) < 1e-5
        assert abs(ref[p["rejected"]] - min(ref.values())) < 1e-5
        assert abs(p["pair"]["chosen_score"] - max(ref.values())) < 1e-5
    cache = tmp_path / "pcache"
    run_cache_job(CacheJob(trained_tiny_teacher, out, cache, Extraction(topk=8), "hf", val=shapes_dir / "val.json"))
    recipe = tmp_path / "pd.yaml"
    recipe.write_text(json.dumps({"name": "pd", "model": _student_spec(), "eval_every": 1000, "save_every": 1000,
                                  "stages": [{"name": "pref", "steps": 3, "batch_size": 4,
                                              "losses": {"ce": 1.0, "pref": 1.0}}]}))
    assert (train_student_run(recipe, cache, tmp_path / "pd").model_dir / "config.json").is_file()
    # the reference rule: the data set's answer against the teacher's favourite wrong one
    ref_out = tmp_path / "ref_pairs.jsonl"
    make_pairs(trained_tiny_teacher, gen, ref_out, rule="reference")
    for p in _lines(ref_out):
        pid = p["id"][: -len("-pair")]
        assert p["conversations"][-1]["value"] == samples[pid].answer
        assert first_word(p["rejected"]) != first_word(samples[pid].answer)


@pytest.fixture(scope="module")
def vllm_engine(trained_tiny_teacher):
    pytest.importorskip("vllm")
    from vlmkd.generate.engines import VLLMEngine

    engine = VLLMEngine(trained_tiny_teacher)
    yield engine
    engine.close()


def test_greedy_answers_equal_through_vllm_and_transformers(trained_tiny_teacher, shapes_dir, prompts, tmp_path,
                                                            vllm_engine):
    """Temperature 0: the same answers, token for token, from vLLM's engine and transformers' generate
    (image rows, text-only rows, a multi-turn and a ShareGPT row), and the same files but for the engine."""
    rows = json.loads((shapes_dir / "train.json").read_text())[:80]
    text = [{"id": f"text-{k}", "conversations": [
        {"from": "human", "value": rows[k]["conversations"][0]["value"].replace("<image>", "").strip()}]}
        for k in range(0, 80, 8)]
    data = shapes_dir / "vllm_prompts.json"
    data.write_text(json.dumps(rows + text + json.loads(prompts.read_text())[30:]))
    s = Sampling(max_new_tokens=8)
    hf_out, vl_out = tmp_path / "hf.jsonl", tmp_path / "vllm.jsonl"
    run_generate(GenerateJob(trained_tiny_teacher, data, hf_out, s, "hf", batch_size=32))
    run_generate(GenerateJob(trained_tiny_teacher, data, vl_out, s, "vllm", batch_size=32), vllm_engine)
    a, b = _lines(hf_out), _lines(vl_out)
    assert len(a) == len(b) >= 90
    for x, y in zip(a, b, strict=True):
        assert x["generation"].pop("engine") == "hf" and y["generation"].pop("engine") == "vllm"
        assert x == y, x["id"]
    assert paths(hf_out)["rejects"].read_bytes() == paths(vl_out)["rejects"].read_bytes()


def test_vllm_sampling_resumes_exactly_once(trained_tiny_teacher, prompts, tmp_path, vllm_engine):
    """vLLM's sampling is seeded per request: a killed and resumed job writes an uninterrupted one's bytes."""
    s = Sampling(n=3, temperature=1.0, max_new_tokens=5, seed=SEED % 1000)
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    run_generate(GenerateJob(trained_tiny_teacher, prompts, whole, s, "vllm", batch_size=8), vllm_engine)
    run_generate(GenerateJob(trained_tiny_teacher, prompts, part, s, "vllm", batch_size=8, stop_after=1), vllm_engine)
    run_generate(GenerateJob(trained_tiny_teacher, prompts, part, s, "vllm", batch_size=8), vllm_engine)
    assert part.read_bytes() == whole.read_bytes()


def test_seq_kd_through_vllm(trained_tiny_teacher, shapes_dir, tmp_path, vllm_engine):
    """Generate with vLLM, score the answers with the vLLM teacher backend, train a student on them."""
    from vlmkd.teacher.hf_backend import Extraction
    from vlmkd.teacher.job import CacheJob, run_cache_job
    from vlmkd.train.student import train_student_run

    answers = tmp_path / "answers.jsonl"
    st = run_generate(GenerateJob(trained_tiny_teacher, shapes_dir / "train.json", answers, Sampling(max_new_tokens=6),
                                  "vllm"), vllm_engine)
    cache = tmp_path / "cache"
    m = run_cache_job(CacheJob(trained_tiny_teacher, answers, cache, Extraction(topk=8), "vllm",
                               val=shapes_dir / "val.json"))
    assert m["counts"]["samples"] + m["counts"]["rejects"] == st["counts"]["answers"]
    recipe = tmp_path / "seqkd.yaml"
    recipe.write_text(json.dumps({"name": "seqkd", "model": _student_spec(), "eval_every": 1000, "save_every": 1000,
                                  "stages": [{"name": "kd", "steps": 5, "batch_size": 4, "losses": {"ce": 1.0, "res": 1.0}}]}))
    assert (train_student_run(recipe, cache, tmp_path / "run").model_dir / "config.json").is_file()


def test_killed_cli_job_resumes_exactly_once(trained_tiny_teacher, prompts, tmp_path):
    """`vlmkd generate` killed with SIGKILL once its first batches are recorded; the re-run answers the
    rest, and the files equal an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["--model", str(trained_tiny_teacher), "--data", str(prompts), "--n", "2", "--temperature", "1.0",
            "--max-new-tokens", "6", "--seed", str(SEED % 1000), "--batch-size", "2", "--backend", "hf", "--threads", "1"]
    cli = [str(Path(sys.executable).with_name("vlmkd")), "generate"]
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    subprocess.run(cli + args + ["--out", str(whole)], check=True, capture_output=True)
    proc = subprocess.Popen(cli + args + ["--out", str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = paths(part)["state"]
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["cursor"] >= 4:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    st = json.loads(state.read_text())
    assert st["state"] == "running" and 0 < st["cursor"] < len(json.loads(prompts.read_text())), st
    subprocess.run(cli + args + ["--out", str(part)], check=True, capture_output=True)
    assert part.read_bytes() == whole.read_bytes()
    assert paths(part)["rejects"].read_bytes() == paths(whole)["rejects"].read_bytes()
