"""Several teachers: the mixture of sparse distributions against a float64 reference, padded slots in
every loss path, and a student trained from two caches built by two different teachers."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from reference import sparse_kd_ref

from vlmkd.errors import CacheError, RecipeError
from vlmkd.kernels import linear_sparse_kd, triton_usable
from vlmkd.losses import LOSSES, logit_kd
from vlmkd.losses.mixture import mix_topk

SEED = int.from_bytes(os.urandom(4), "little")


def _teacher_rows(rng, P, V, k):
    logits = rng.normal(size=(P, V)) * 2.5
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-lp, -1)[:, :k]
    top = np.take_along_axis(lp, ids, -1)
    tail = np.log1p(-np.exp(top).sum(-1))
    return ids, top, tail


def _mix_ref(rows, weights, mode):
    """Per position, by hand: dicts of id -> probability."""
    w = [x / sum(weights) for x in weights]
    out = []
    for p in range(rows[0][0].shape[0]):
        if mode == "confidence":
            t = max(range(len(rows)), key=lambda t: max(rows[t][1][p]))
            d = {int(i): math.exp(v) for i, v in zip(rows[t][0][p], rows[t][1][p], strict=True)}
            out.append((d, math.exp(rows[t][2][p])))
            continue
        d: dict[int, float] = {}
        for wt, (ids, lps, _) in zip(w, rows, strict=True):
            for i, v in zip(ids[p], lps[p], strict=True):
                d[int(i)] = d.get(int(i), 0.0) + wt * math.exp(v)
        out.append((d, sum(wt * math.exp(r[2][p]) for wt, r in zip(w, rows, strict=True))))
    return out


@pytest.mark.parametrize("mode", ["average", "confidence"])
@pytest.mark.parametrize("ks,weights", [((4, 4), (0.7, 0.3)), ((3, 6, 2), (1.0, 2.0, 1.0)), ((5,), (1.0,))])
def test_mixture_equals_float64_reference(mode, ks, weights):
    rng = np.random.default_rng(SEED)
    V, P = 11, 9
    rows = [_teacher_rows(rng, P, V, k) for k in ks]
    ids, lps, tail = mix_topk(rows, list(weights), mode)
    for p, (d, t) in enumerate(_mix_ref(rows, weights, mode)):
        got = {int(i): math.exp(v) for i, v in zip(ids[p], lps[p], strict=True) if np.isfinite(v)}
        assert got.keys() == d.keys()
        for i in d:
            assert got[i] == pytest.approx(d[i], rel=1e-12)
        assert math.exp(tail[p]) == pytest.approx(t, rel=1e-12, abs=1e-15)
        assert sum(got.values()) + math.exp(tail[p]) == pytest.approx(1.0, abs=1e-12)  # no mass made or lost
        assert len(set(ids[p][np.isfinite(lps[p])])) == len(got)  # every id once


def _padded_case(seed, N=7, V=19, k=6):
    """Rows with a varying number of real slots: the rest padded (-inf), their ids repeating a real id."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 1.5
    t = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
    lps, ids = t.topk(k, -1)
    tail = torch.logsumexp(t.scatter(-1, ids, float("-inf")), -1)
    real = torch.randint(1, k + 1, (N,), generator=g)
    pad = torch.arange(k)[None] >= real[:, None]
    lps = lps.masked_fill(pad, float("-inf"))
    tail = torch.logaddexp(tail, torch.logsumexp(t.gather(-1, ids).masked_fill(~pad, float("-inf")), -1))
    ids = torch.where(pad, ids[:, :1].expand(-1, k), ids)  # pads name the row's top id again
    return z, ids, lps, tail, real


@pytest.mark.parametrize("loss", LOSSES)
def test_padded_slots_are_no_slots(loss):
    """A padded row gives the float64 reference's value on its real ids alone, and the same gradient as
    the same row stored without padding."""
    z, ids, lps, tail, real = _padded_case(SEED)
    mask = torch.ones(1, len(z), dtype=torch.bool)
    ref = sparse_kd_ref(z[None], ids[None], lps[None], mask, loss, 1.4, 0.3, 0.2, tail=tail[None])
    zz = z.clone().requires_grad_(True)
    got = logit_kd(zz[None], ids[None], lps[None], mask, loss=loss, temperature=1.4, beta=0.3, alpha=0.2,
                   teacher_tail=tail[None])
    assert float(got) == pytest.approx(ref, rel=1e-10)
    (g,) = torch.autograd.grad(got, zz)
    for r in range(len(z)):  # each row alone, unpadded
        zr = z[r : r + 1].clone().requires_grad_(True)
        n = int(real[r])
        one = logit_kd(zr[None], ids[None, r : r + 1, :n], lps[None, r : r + 1, :n], torch.ones(1, 1, dtype=torch.bool),
                       loss=loss, temperature=1.4, beta=0.3, alpha=0.2, teacher_tail=tail[None, r : r + 1])
        (gr,) = torch.autograd.grad(one, zr)
        assert torch.allclose(g[r] * len(z), gr[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fused_paths_take_padded_slots(impl):
    if impl == "triton" and not triton_usable():
        pytest.skip("triton is not installed")
    dev = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(SEED + 1)
    N, D, V, k = 7, 5, 19, 6
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64)
    _, ids, lps, tail, _ = _padded_case(SEED + 2, N, V, k)
    mask = torch.ones(1, N, dtype=torch.bool)
    for loss in ("fkl", "rkl", "jsd"):
        hh, ww = h.clone().to(dev).requires_grad_(True), w.clone().to(dev).requires_grad_(True)
        got = linear_sparse_kd(hh, ww, ids.to(dev), lps.to(dev), tail.to(dev), loss=loss, temperature=1.2, chunk=3,
                               impl=impl)
        gh, gw = torch.autograd.grad(got, (hh, ww))
        rh, rw = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ref = logit_kd((rh @ rw.T)[None], ids[None], lps[None], mask, loss=loss, temperature=1.2,
                       teacher_tail=tail[None])
        nh, nw = torch.autograd.grad(ref, (rh, rw))
        assert float(got) == pytest.approx(float(ref), rel=1e-9)
        assert torch.allclose(gh.cpu(), nh, rtol=1e-8, atol=1e-11) and torch.allclose(gw.cpu(), nw, rtol=1e-8, atol=1e-11)
    hh = h.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: linear_sparse_kd(a, w, ids, lps, tail, loss="fkl", chunk=4), (hh,))


def test_mixture_target_trains_against_the_reference():
    """The mixture as a loss target: logit_kd on mix_topk's padded output equals the float64 reference."""
    rng = np.random.default_rng(SEED + 3)
    V, P = 13, 6
    rows = [_teacher_rows(rng, P, V, k) for k in (3, 5)]
    ids, lps, tail = (torch.from_numpy(x) for x in mix_topk(rows, [0.6, 0.4]))
    z = torch.from_numpy(rng.normal(size=(1, P, V)))
    mask = torch.ones(1, P, dtype=torch.bool)
    for loss in LOSSES:
        ref = sparse_kd_ref(z, ids[None], lps[None], mask, loss, tail=tail[None])
        got = logit_kd(z, ids[None], lps[None], mask, loss=loss, teacher_tail=tail[None])
        assert float(got) == pytest.approx(ref, rel=1e-10)


def test_mix_modes_and_weights_are_checked():
    rng = np.random.default_rng(0)
    rows = [_teacher_rows(rng, 2, 7, 3)]
    with pytest.raises(RecipeError, match="choose one of"):
        mix_topk(rows, [1.0], "max")


# ---- two caches built by two different teachers ------------------------------------------------------


@pytest.fixture(scope="module")
def two_caches(trained_tiny_teacher, second_tiny_teacher, shapes_dir, tmp_path_factory):
    from vlmkd.teacher.hf_backend import Extraction
    from vlmkd.teacher.job import CacheJob, run_cache_job

    out = {}
    for name, teacher, data in (("a", trained_tiny_teacher, "train"), ("b", second_tiny_teacher, "train"),
                                ("val", second_tiny_teacher, "val")):
        d = tmp_path_factory.mktemp(f"cache_{name}")
        settings = Extraction(topk=6, attn_layers=[], hidden_points=[])
        run_cache_job(CacheJob(teacher, shapes_dir / f"{data}.json", d, settings, samples_per_shard=64))
        out[name] = d
    return out


def test_two_teacher_student_trains_and_refuses_other_samples(two_caches, shapes_dir, tmp_path):
    import json

    import yaml
    from conftest import TINY_IDEFICS3

    from vlmkd.cache.join import TeacherMix
    from vlmkd.cache.reader import CacheReader
    from vlmkd.train.student import train_student_run

    a, b = CacheReader(two_caches["a"]), CacheReader(two_caches["b"])
    mix = TeacherMix(a, [b], [0.5, 0.5])
    s = next(CacheReader(two_caches["a"], payloads=("tokens", "topk")).samples())
    m = mix.apply(s)
    assert m["ids"].shape[1] >= s["ids"].shape[1]  # the union of both teachers' top-6
    total = np.exp(m["logprobs"].astype(np.float64)).sum(-1) + np.exp(m["tail"].astype(np.float64))
    assert np.allclose(total, 1.0, atol=1e-5)

    student = {**TINY_IDEFICS3, "vision_from": "teacher", "text": {"hidden": 32, "layers": 1, "heads": 2,
                                                                    "intermediate": 64}}
    recipe = tmp_path / "two.yaml"
    recipe.write_text(yaml.safe_dump({"name": "two", "model": student, "eval_every": 1000, "eval_samples": 8,
                                      "save_every": 1000, "log_every": 1, "stages": [
                                          {"name": "kd", "data": "questions", "steps": 25, "lr": 3e-3, "warmup": 2,
                                           "batch_size": 8, "trainable": ["projector", "llm"],
                                           "losses": {"ce": 1.0, "res": 1.0}, "loss_args": {"logit_loss": "jsd"}}]}))
    run = tmp_path / "run"
    train_student_run(recipe, [two_caches["a"], two_caches["b"]], run, val=shapes_dir / "val.json",
                      teacher_weights=[0.7, 0.3])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    res = [r["loss_res"] for r in rows if r["kind"] == "train"]
    assert sum(res[-5:]) < sum(res[:5])

    with pytest.raises(CacheError, match="hold different samples"):
        train_student_run(recipe, [two_caches["a"], two_caches["val"]], tmp_path / "bad", val=shapes_dir / "val.json")


def test_allow_partial_trains_on_the_shared_samples_and_records_the_rest(two_caches, tmp_path):
    import json

    from vlmkd.cache.join import TeacherMix
    from vlmkd.cache.reader import CacheReader
    from vlmkd.data.rejects import RejectLog

    a, other = CacheReader(two_caches["a"]), CacheReader(two_caches["val"])
    mix = TeacherMix(a, [other], allow_partial=True, rejects=RejectLog(tmp_path / "rejects.jsonl"))
    recorded = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert len(recorded) == len(a) and not mix.keep  # train and val share no sample: all recorded once
    s = next(CacheReader(two_caches["a"], payloads=("tokens", "topk")).samples())
    assert mix.apply(s) is None
    with pytest.raises(RecipeError, match="2 non-negative weights"):
        TeacherMix(a, [other], weights=[1.0], allow_partial=True)
