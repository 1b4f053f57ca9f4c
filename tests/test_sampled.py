"""Random-Sampling KD: the sampled cache mode, its codec, the unbiased estimator, the loss, the
refusals, and a student trained from a sampled cache; plus the top-k codec at large vocabularies."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from reference import encode_topk_layout1, full_vocab_ref

from vlmkd.cache import format as fmt
from vlmkd.cache.reader import CacheReader
from vlmkd.errors import CacheError, RecipeError
from vlmkd.losses import sampled_kd
from vlmkd.teacher.hf_backend import Extraction, sample_seed, sampled_rows, topk_rows
from vlmkd.teacher.job import CacheJob, check_settings, run_cache_job

SEED = int.from_bytes(os.urandom(4), "little")


@pytest.mark.parametrize("V", [437, 131072, 200003, 262144, 1 << 22])
def test_topk_codec_round_trips_bit_exactly_at_any_vocabulary(V):
    """ids exact beyond 17 bits; decode -> encode reproduces the same bytes (codes are idempotent)."""
    rng = np.random.default_rng(SEED + V)
    R, k = 9, min(64, V)
    ids = np.stack([rng.choice(V, size=k, replace=False) for _ in range(R)])
    ids[0] = np.concatenate([[V - 1, 0], rng.choice(np.arange(1, V - 1), size=k - 2, replace=False)])  # both ends
    lp = np.log(rng.dirichlet(np.full(k, 0.3), size=R) * 0.9)
    tail = np.full(R, np.log(0.1))
    pos = np.sort(rng.choice(500, size=R, replace=False))
    blob = fmt.encode_topk(pos, ids, lp, tail, V)
    dec = fmt.decode_topk(blob)
    assert np.array_equal(dec["ids"], np.sort(ids, -1)) and np.array_equal(dec["pos"], pos)
    again = fmt.encode_topk(dec["pos"], dec["ids"], dec["logprobs"], dec["tail"], V)
    assert again == blob


def test_layout1_caches_still_read():
    rng = np.random.default_rng(SEED)
    logits = torch.from_numpy(rng.normal(size=(5, 300)) * 3)
    ids, lps, tail = topk_rows(logits, 16)
    old = fmt.decode_topk(encode_topk_layout1(np.arange(5), ids.numpy(), lps.numpy(), tail.numpy(), 300))
    new = fmt.decode_topk(fmt.encode_topk(np.arange(5), ids.numpy(), lps.numpy(), tail.numpy(), 300))
    assert np.array_equal(old["ids"], new["ids"])
    assert np.allclose(old["logprobs"], new["logprobs"], atol=0.2)  # layout 1: sqrt(32 d) / 255 nats apart


def test_sampled_codec_round_trips_bit_exactly():
    rng = np.random.default_rng(SEED)
    V = 300000
    ids, counts, lps = [], [], []
    for n in (1, 7, 50, 12):
        draws = rng.choice(V, size=50, p=None)[:50] if n == 50 else rng.choice(n * 1000, size=50) % (n * 97 + 1)
        u, c = np.unique(draws, return_counts=True)
        ids.append(u), counts.append(c), lps.append(-rng.random(len(u)) * 5)
    logz = rng.normal(size=4)
    blob = fmt.encode_sampled(np.array([3, 4, 9, 10]), ids, counts, 50, 0.7, lps, logz)
    dec = fmt.decode_sampled(blob)
    for r in range(4):
        n = len(ids[r])
        assert np.array_equal(dec["ids"][r, :n], ids[r])
        assert np.allclose(dec["logprobs"][r, :n], lps[r].astype(np.float16))
        w = counts[r] / 50 * np.exp(lps[r].astype(np.float16).astype(np.float64) * (1 - 1 / 0.7) + logz[r].astype(np.float32))
        assert np.allclose(dec["weights"][r, :n], w, rtol=1e-6)
        assert np.all(dec["weights"][r, n:] == 0)
    with pytest.raises(ValueError, match="logz"):
        fmt.encode_sampled(np.arange(1), ids[:1], counts[:1], 50, 0.7)


@pytest.mark.parametrize("t", [1.0, 0.6, 2.0])
def test_sampled_estimate_is_unbiased(t):
    """The mean of the decoded weights over many independent samplings converges to the teacher's
    probabilities (importance-weighted when the proposal temperature is not 1). Tolerance: 5 standard
    errors of the mean (from the estimator's exact variance: count ~ Binomial(N, pi)), plus 3e-3
    relative for the float16 log-probs in the weights."""
    g = torch.Generator().manual_seed(SEED)
    V, N, S = 40, 50, 1500
    logits = torch.randn(1, V, generator=g, dtype=torch.float64) * 2
    p = torch.softmax(logits, -1)[0].numpy()
    pi = torch.softmax(logits / t, -1)[0].numpy()
    acc = np.zeros(V)
    for s in range(S):
        ids, counts, lps, logz = sampled_rows(logits, N, t, seed=SEED + s)
        dec = fmt.decode_sampled(fmt.encode_sampled(np.zeros(1), ids, counts, N, t, lps,
                                                    logz if t != 1.0 else None))
        est = np.zeros(V)
        est[dec["ids"][0][dec["weights"][0] > 0]] = dec["weights"][0][dec["weights"][0] > 0]
        acc += est
    mean = acc / S
    se = (p / pi) * np.sqrt(pi * (1 - pi) / N / S)
    assert np.all(np.abs(mean - p) <= 5 * se + 3e-3 * p + 1e-12)
    if t == 1.0:
        assert abs(mean.sum() - 1) < 1e-6  # counts / N sum to one (float32 weights)


def test_sampled_kd_against_float64_reference_and_gradcheck():
    """With every id 'sampled' at weight p_v the estimate is the exact forward KL over the vocabulary."""
    g = torch.Generator().manual_seed(SEED)
    B, T, V = 2, 5, 23
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    p = torch.softmax(t_logits, -1)
    ids = torch.arange(V).expand(B, T, V)
    got = sampled_kd(z, ids, p, mask, teacher_logprobs=p.log())
    assert float(got) == pytest.approx(full_vocab_ref(z.detach(), t_logits, mask, "fkl"), rel=1e-9)
    # cross-entropy form: KL + H(p) averaged over the masked positions
    ent = float((-(p * p.log()).sum(-1))[mask].mean())
    assert float(sampled_kd(z, ids, p, mask)) == pytest.approx(float(got) + ent, rel=1e-9)
    # padding (weight 0) changes nothing
    pad = torch.cat([ids, torch.zeros(B, T, 3, dtype=torch.long)], -1)
    wpad = torch.cat([p, torch.zeros(B, T, 3, dtype=torch.float64)], -1)
    lpad = torch.cat([p.log(), torch.zeros(B, T, 3, dtype=torch.float64)], -1)
    assert float(sampled_kd(z, pad, wpad, mask, lpad)) == pytest.approx(float(got), rel=1e-12)
    assert torch.autograd.gradcheck(lambda x: sampled_kd(x, ids, p, mask, p.log()), (z,))


def test_sample_seed_depends_on_the_sample_only():
    assert sample_seed("a", 0) == sample_seed("a", 0) != sample_seed("b", 0)
    assert sample_seed("a", 0) != sample_seed("a", 1)


def test_sampled_mode_is_refused_on_vllm_and_bad_settings():
    with pytest.raises(CacheError, match="backend hf"):
        check_settings(Extraction(logits="sampled"), "vllm")
    with pytest.raises(CacheError, match="draws"):
        check_settings(Extraction(logits="sampled", draws=300), "hf")
    with pytest.raises(CacheError, match="topk or sampled"):
        check_settings(Extraction(logits="gumbel"), "hf")


@pytest.fixture(scope="module")
def sampled_cache(trained_tiny_teacher, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sampled")
    settings = Extraction(logits="sampled", draws=50, score_visual=True, attn_layers=[], hidden_points=[],
                          gram=False)
    run_cache_job(CacheJob(trained_tiny_teacher, shapes_dir / "train.json", out, settings, samples_per_shard=64))
    return out


def test_sampled_cache_holds_the_teachers_own_distribution(sampled_cache, trained_tiny_teacher, shapes_dir):
    """t = 1: counts / N sum to one and a second extraction draws the same ids (per-sample seeds).
    t != 1: the stored log-probs are the teacher's own (to float16) and the weights their importance
    weights."""
    from vlmkd.data.dataset import collate, encode_samples, model_inputs
    from vlmkd.data.manifest import load_samples
    from vlmkd.teacher.hf_backend import HFTeacher

    reader = CacheReader(sampled_cache, payloads=("tokens", "sampled"))
    assert reader.manifest["payload_backends"]["sampled"] == "hf"
    settings = dict(logits="sampled", draws=50, score_visual=True, attn_layers=[], hidden_points=[], gram=False)
    teacher = HFTeacher(trained_tiny_teacher, Extraction(**settings))
    tempered = HFTeacher(trained_tiny_teacher, Extraction(**settings, proposal_temperature=0.7))
    samples, _ = load_samples(shapes_dir / "train.json")
    by_id = {s.id: s for s in samples}
    n = 0
    for s in reader.samples():
        it = encode_samples([by_id[s["id"]]], teacher.tok, teacher.layout)[0]
        assert np.allclose(s["weights"].sum(-1), 1.0, atol=1e-6) and s["draws"] == 50
        assert np.isnan(s["logprobs"]).all()  # t = 1: not stored
        again = fmt.decode_sampled(teacher.extract([it])[0]["sampled"])
        assert np.array_equal(again["ids"], s["ids"]) and np.array_equal(again["weights"], s["weights"])
        with torch.no_grad():
            logits = teacher.model(**model_inputs(collate([it], teacher.layout, teacher.tok.pad_id))).logits[0]
        full = torch.log_softmax(logits.double(), -1)[torch.from_numpy(s["pos"])].numpy()
        t = fmt.decode_sampled(tempered.extract([it])[0]["sampled"])
        valid = t["weights"] > 0
        own = np.take_along_axis(full, t["ids"], -1)
        assert np.allclose(t["logprobs"][valid], own[valid], rtol=2e-3, atol=2e-3)
        logz = np.log(np.exp(full / 0.7).sum(-1))
        counts = np.rint(t["weights"] / np.exp(t["logprobs"].astype(np.float64) * (1 - 1 / 0.7) + logz[:, None]) * 50)
        assert np.allclose(np.nansum(np.where(valid, counts, 0), -1), 50)
        n += 1
        if n == 5:
            break
    assert n == 5


def test_student_trains_from_a_sampled_cache_and_refuses_biased_losses(sampled_cache, shapes_dir, tmp_path):
    import json

    import yaml
    from conftest import TINY_IDEFICS3

    from vlmkd.train.student import train_student_run

    student = {**TINY_IDEFICS3, "vision_from": "teacher", "text": {"hidden": 32, "layers": 1, "heads": 2,
                                                                 "intermediate": 64}}

    def recipe(name, args):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "model": student, "eval_every": 1000, "eval_samples": 8,
                                        "save_every": 1000, "log_every": 1, "stages": [{
                                            "name": "kd", "data": "questions", "steps": 30, "lr": 3e-3,
                                            "warmup": 2, "batch_size": 8, "trainable": ["projector", "llm"],
                                            "losses": {"ce": 1.0, "res": 1.0, "vis": 1.0}, "loss_args": args}]}))
        return path

    run = tmp_path / "run"
    train_student_run(recipe("ok", {}), sampled_cache, run, val=shapes_dir / "val.json")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    res = [r["loss_res"] for r in rows if r["kind"] == "train"]
    assert sum(res[-5:]) < sum(res[:5])
    for args, match in [({"logit_loss": "rkl"}, "biased"), ({"temperature": 2.0}, "temperature"),
                        ({"logit_impl": "torch"}, "fused")]:
        with pytest.raises(RecipeError, match=match):
            train_student_run(recipe("bad", args), sampled_cache, tmp_path / "bad", val=shapes_dir / "val.json")
