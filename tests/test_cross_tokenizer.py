"""A student with another tokenizer than the teacher's (#28): text-span alignment, the cross-tokenizer
logit terms against float64 references, the cache's text payload, and training end to end."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from reference import sparse_kd_ref

from vlmkd.cache import format as fmt
from vlmkd.cache.reader import CacheReader
from vlmkd.data.manifest import Sample, Turn
from vlmkd.data.template import Tokenizer
from vlmkd.errors import RecipeError
from vlmkd.losses import logit_kd
from vlmkd.losses.cross import cross_kd, exact_rows, uld_rows
from vlmkd.models.tokenizer import IMAGE, train_tokenizer
from vlmkd.teacher.hf_backend import Extraction
from vlmkd.teacher.job import CacheJob, run_cache_job
from vlmkd.train.cross import Retokenizer, align_sample, align_spans, vocab_map

SEED = random.SystemRandom().randrange(2**31)
print(f"test_cross_tokenizer seed {SEED}")


def _groups(t, s, n):
    return align_spans(np.array(t), np.array(s), n)


def test_alignment_by_hand():
    # " red circle": teacher " red" + " circle" + <end_of_utterance>; student " " + "red" + " c" + "ircle" + <|im_end|>
    assert _groups([(-1, 3), (3, 10), (10, 28)], [(-1, 0), (0, 3), (3, 5), (5, 10), (10, 20)], 10) == \
        [([0], [0, 1]), ([1], [2, 3]), ([2], [4])]
    # a merge across the other side's boundary: "ab" "cd" vs "a" "bc" "d" -> one span
    assert _groups([(0, 2), (2, 4), (4, 9)], [(0, 1), (1, 3), (3, 4), (4, 9)], 4) == [([0, 1], [0, 1, 2]), ([2], [3])]
    # byte fallback: "é" split into two byte tokens (both carry the character's span) then "!"
    assert _groups([(0, 1), (0, 1), (1, 2), (2, 9)], [(0, 2), (2, 9)], 2) == [([0, 1, 2], [0]), ([3], [1])]
    # the same split on both sides: each byte token is not a boundary, the character is
    assert _groups([(0, 1), (0, 1), (1, 2)], [(0, 1), (0, 1), (1, 2)], 2) == [([0, 1], [0, 1]), ([2], [2])]
    # identical tokenisations: one token per span
    assert _groups([(0, 3), (3, 5), (5, 9)], [(0, 3), (3, 5), (5, 9)], 5) == [([0], [0]), ([1], [1]), ([2], [2])]
    # only one side has an end-of-turn token: the last span closes on both
    assert _groups([(0, 3), (3, 9)], [(0, 3)], 3) == [([0, 1], [0])]


UNICODE = ["naïve café crème brûlée", "日本語のテキスト and ascii", "emoji 🙂🙃 mixed", "Ελληνικά κείμενα", "über straße",
           "a red circle above a blue square", "zero-width\u200bjoiner", "tab\tand  double  spaces"]


def _tok(vocab, texts):
    hf = train_tokenizer(texts, vocab_size=vocab)
    image = hf.convert_tokens_to_ids(IMAGE)
    return hf, Tokenizer(hf, [image], image, 4096)


def test_alignment_on_real_tokenisations_covers_the_same_text():
    """Two byte-level BPE vocabularies (300 and 420 ids) on unicode answers: every token in exactly
    one span, and each span's text is the same string read from either side's tokens."""
    rng = random.Random(SEED)
    corpus = UNICODE * 3 + ["".join(rng.choice("abcdéü日🙂 ") for _ in range(30)) for _ in range(20)]
    (hf_a, a), (hf_b, b) = _tok(300, corpus), _tok(420, corpus[::-1])
    for k in range(12):
        text = rng.choice(UNICODE) if k < 8 else "".join(rng.choice("abcdéü日🙂 ,.") for _ in range(rng.randrange(1, 25)))
        sample = Sample("s", (), (Turn("user", "say it"), Turn("assistant", text), Turn("user", "again"),
                                  Turn("assistant", text[::-1])))
        ea, eb = a.encode(sample), b.encode(sample)
        sa, sb = a.response_spans(sample), b.response_spans(sample)
        assert len(sa) == ea.labels_mask.sum() and len(sb) == eb.labels_mask.sum()
        groups = align_sample(sa, sb, [(t.role, t.text) for t in sample.turns])
        assert sorted(i for g in groups for i in g[0]) == list(range(len(sa)))
        assert sorted(i for g in groups for i in g[1]) == list(range(len(sb)))
        ids_a, ids_b = ea.input_ids[ea.labels_mask], eb.input_ids[eb.labels_mask]
        for ga, gb in groups:
            ta = hf_a.decode(ids_a[ga].tolist(), skip_special_tokens=True)
            tb = hf_b.decode(ids_b[gb].tolist(), skip_special_tokens=True)
            assert ta == tb, (text, ta, tb)


def _uld_ref(z, lps, tail):
    """Per row, in float64 loops: softmax, sort, the first n ranks one by one, the rest as one bin."""
    out = []
    for r in range(z.shape[0]):
        row = [float(v) for v in z[r]]
        mx = max(row)
        ex = [math.exp(v - mx) for v in row]
        q = sorted((e / sum(ex) for e in ex), reverse=True)
        p = sorted((math.exp(float(v)) for v in lps[r] if math.isfinite(float(v))), reverse=True)
        n = len(p)
        qi = q[:n] + [0.0] * max(0, n - len(q))
        val = sum(abs(a - b) for a, b in zip(qi, p, strict=True))
        val += abs((1 - sum(qi)) - (math.exp(float(tail[r])) if math.isfinite(float(tail[r])) else 0.0))
        out.append(val)
    return torch.tensor(out, dtype=torch.float64)


def _teacher_rows(g, R, k, V_t, pad=True):
    """Random teacher top-k rows over a V_t vocabulary (some rows narrower: -inf padding), exact tails."""
    lps = torch.empty(R, k, dtype=torch.float64)
    ids = torch.zeros(R, k, dtype=torch.long)
    tail = torch.empty(R, dtype=torch.float64)
    for r in range(R):
        full = torch.log_softmax(torch.randn(V_t, generator=g, dtype=torch.float64) * 2, -1)
        n = int(torch.randint(1, k + 1, (1,), generator=g)) if pad else k
        top = full.topk(n)
        ids[r, :n], lps[r, :n] = top.indices, top.values
        lps[r, n:] = float("-inf")
        rest = full.clone()
        rest[top.indices] = float("-inf")
        tail[r] = torch.logsumexp(rest, -1)
    return ids, lps, tail


@pytest.mark.parametrize("V_s,k", [(37, 8), (5, 8), (64, 1)])
def test_uld_against_float64_reference_and_gradcheck(V_s, k):
    g = torch.Generator().manual_seed(SEED)
    R = 7
    _, lps, tail = _teacher_rows(g, R, k, V_t=29)
    z = torch.randn(R, V_s, generator=g, dtype=torch.float64) * 1.5
    assert torch.allclose(uld_rows(z, lps, tail), _uld_ref(z, lps, tail), atol=1e-12)
    # the order of the teacher's slots does not matter (ranks are what ULD compares)
    perm = torch.randperm(k, generator=g)
    assert torch.allclose(uld_rows(z, lps[:, perm], tail), _uld_ref(z, lps, tail), atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: uld_rows(x, lps, tail), (z.clone().requires_grad_(),))
    # float32 logits: the same within float32 rounding
    assert torch.allclose(uld_rows(z.float(), lps.float(), tail.float()).double(), _uld_ref(z, lps, tail), atol=1e-5)


def test_hybrid_against_float64_reference_and_gradcheck():
    """Shared single-token spans: the sparse KL over the teacher's ids mapped into the student's
    vocabulary (unmapped ids' mass in the tail bucket), checked with the same-tokenizer reference;
    the other spans ULD; the mean over spans."""
    g = torch.Generator().manual_seed(SEED + 1)
    R, k, V_t, V_s = 9, 6, 40, 31
    ids, lps, tail = _teacher_rows(g, R, k, V_t)
    mapping = torch.full((V_t,), -1, dtype=torch.long)  # injective, partial: some teacher ids have no counterpart
    mapping[torch.randperm(V_t, generator=g)[:V_s]] = torch.randperm(V_s, generator=g)
    mapping[torch.rand(V_t, generator=g) < 0.2] = -1
    mids = mapping[ids]
    keep = (mids >= 0) & torch.isfinite(lps)
    lost = torch.where(torch.isfinite(lps) & ~keep, lps.exp(), torch.zeros_like(lps)).sum(-1)
    mtail = torch.logaddexp(tail, lost.log())
    mlp = torch.where(keep, lps, torch.full_like(lps, float("-inf")))
    mids = torch.where(keep, mids, torch.zeros_like(mids))
    exact = torch.rand(R, generator=g) < 0.5
    exact[0], exact[1] = True, False
    z = torch.randn(R, V_s, generator=g, dtype=torch.float64)
    uld = _uld_ref(z, lps, tail)
    want = []
    for r in range(R):
        if exact[r]:
            want.append(sparse_kd_ref(z[r][None, None], mids[r][None, None], mlp[r][None, None],
                                      torch.ones(1, 1, dtype=torch.bool), "fkl", tail=mtail[r][None, None]))
        else:
            want.append(float(uld[r]))
    got = cross_kd(z, lps, tail, exact, mids, mlp, mtail)
    assert abs(float(got) - sum(want) / R) < 1e-10
    assert torch.allclose(exact_rows(z[exact], mids[exact], mlp[exact], mtail[exact]),
                          torch.tensor([w for w, e in zip(want, exact.tolist(), strict=True) if e], dtype=torch.float64),
                          atol=1e-10)
    assert torch.autograd.gradcheck(lambda x: cross_kd(x, lps, tail, exact, mids, mlp, mtail),
                                    (z.clone().requires_grad_(),))
    assert float(cross_kd(z, lps, tail)) == pytest.approx(float(uld.mean()), abs=1e-10)


def test_text_payload_round_trip():
    spans = np.array([[1, -1, 3], [1, 3, 10], [3, 0, 2]])
    turns = [("user", "<image>What?"), ("assistant", "red circle"), ("user", "naïve 🙂"), ("assistant", "ok")]
    got = fmt.decode_text(fmt.encode_text(turns, spans))
    assert got["text_turns"] == turns and np.array_equal(got["text_spans"], spans)
    assert fmt.member_name("0000000001", "text") == "0000000001.text.json.zst"
    with pytest.raises(ValueError, match="turns"):
        fmt.decode_text(fmt._zstd(json.dumps({"turns": [["user", 3]], "spans": []}).encode()))


def _cache(model_dir, data, out, keep_text=True):
    settings = Extraction(topk=16, score_visual=True, batch_size=8, attn_layers=[0],
                          hidden_points=["projector", "final"], keep_text=keep_text)
    run_cache_job(CacheJob(model_dir, data, out, settings, backend="hf", samples_per_shard=16))
    return out


@pytest.fixture(scope="module")
def mixed_data(shapes_dir, tmp_path_factory):
    from test_real_data import _mixed_rows, _write

    d = tmp_path_factory.mktemp("mixed")
    return _write(d / "mixed.jsonl", _mixed_rows(shapes_dir, "train", 24), jsonl=True)


@pytest.fixture(scope="module")
def text_cache(trained_tiny_teacher, mixed_data, tmp_path_factory):
    return _cache(trained_tiny_teacher, mixed_data, tmp_path_factory.mktemp("textcache"))


@pytest.fixture(scope="module")
def other_tok_dir(shapes_dir, tmp_path_factory):
    """A student tokenizer trained here with another vocabulary size (384, the teacher's 512)."""
    from vlmkd.data.manifest import load_samples

    samples, _ = load_samples(shapes_dir / "train.json")
    texts = [t.text.replace("<image>", "") for s in samples for t in s.turns]
    out = tmp_path_factory.mktemp("tok384")
    train_tokenizer(texts[::-1], vocab_size=384).save_pretrained(str(out))
    return out


def test_same_tokenizer_retokenised_is_res(text_cache, hf_tok):
    """With the teacher's own tokenizer the student re-tokenises to the cache's ids, every span is one
    shared token, and the hybrid equals the ordinary response KL (res, fkl) on the same logits."""
    from conftest import TINY_IDEFICS3

    from vlmkd.models.build import build_model, data_tokenizer
    from vlmkd.train.kd_data import collate_kd

    image = hf_tok.convert_tokens_to_ids(IMAGE)
    reader = CacheReader(text_cache, payloads=("tokens", "topk", "text", "image"))
    samples = list(reader.samples())
    assert len(samples) == 25 and {len(s["text_turns"]) for s in samples} >= {2, 4}
    _, layout = data_tokenizer(build_model(TINY_IDEFICS3, hf_tok), hf_tok)
    tok = Tokenizer(hf_tok, layout.image_block, image, 4096)
    retok = Retokenizer(tok, vocab_map(hf_tok, hf_tok))
    for s in samples:
        r = retok(dict(s))
        assert np.array_equal(r["input_ids"], s["input_ids"]) and np.array_equal(r["response"], s["response"])
        assert r["x_exact"].all() and len(r["x_pos"]) == s["response"].sum()
    plain = [dict(s) for s in samples[:6]]
    cross = [retok(dict(s)) for s in samples[:6]]
    for s in plain + cross:
        s.pop("image", None)
    a, b = collate_kd(plain, layout, tok.pad_id), collate_kd(cross, layout, tok.pad_id)
    assert torch.equal(a["input_ids"], b["input_ids"])
    g = torch.Generator().manual_seed(SEED)
    logits = torch.randn(*a["input_ids"].shape, len(hf_tok), generator=g, dtype=torch.float64)
    res = logit_kd(logits, a["t_ids"], a["t_lp"].double(), a["t_res"], teacher_tail=a["t_tail"].double())
    rows = logits.reshape(-1, logits.shape[-1])[b["x_rows"]]
    hyb = cross_kd(rows, b["x_lp"].double(), b["x_tail"].double(), b["x_exact"], b["x_mids"], b["x_mlp"].double(),
                   b["x_mtail"].double())
    assert abs(float(res) - float(hyb)) < 1e-9


def _recipe(tmp_path, losses, tokenizer=None, steps=3):
    import yaml
    from conftest import TINY_IDEFICS3

    model = {**TINY_IDEFICS3, "vision_from": "teacher", "text": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}}
    if tokenizer:
        model["tokenizer"] = str(tokenizer)
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "model": model, "eval_every": 1000, "eval_samples": 4,
                                    "save_every": 1000, "log_every": 1, "stages": [{
                                        "name": "kd", "steps": steps, "lr": 3e-3, "warmup": 1, "batch_size": 4,
                                        "trainable": ["projector", "llm"], "losses": losses}]}))
    return path


def test_student_with_another_tokenizer_trains(text_cache, other_tok_dir, shapes_dir, tmp_path):
    from transformers import AutoTokenizer

    from vlmkd.train.student import prepare_student, train_student_run

    other = AutoTokenizer.from_pretrained(str(other_tok_dir))
    assert len(other) != 512
    run = prepare_student(_recipe(tmp_path, {"ce": 1.0, "uld": 1.0, "feat": 0.5}, other_tok_dir), text_cache,
                          val=shapes_dir / "val.json", seed=0)
    batch = next(run.source.batches(0, run.recipe.stages[0], 0))
    G = len(batch["x_rows"])
    assert G > 0 and 0 < int(batch["x_exact"].sum()) <= G
    assert int(batch["input_ids"].max()) < len(other)
    # the student's own tokens: its labels are its tokenisation of the answers
    assert int(batch["labels_mask"].sum()) >= G
    out = tmp_path / "run"
    train_student_run(_recipe(tmp_path, {"ce": 1.0, "uld": 1.0, "feat": 0.5}, other_tok_dir), text_cache, out,
                      val=shapes_dir / "val.json", seed=0)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3 and all(math.isfinite(r["loss_uld"]) and r["loss_uld"] > 0 for r in train)


def test_cross_tokenizer_refusals(text_cache, trained_tiny_teacher, mixed_data, other_tok_dir, shapes_dir, tmp_path):
    from vlmkd.train.student import prepare_student

    with pytest.raises(RecipeError, match=r"\['res'\].*uld"):
        prepare_student(_recipe(tmp_path, {"ce": 1.0, "res": 1.0}, other_tok_dir), text_cache, val=shapes_dir / "val.json")
    old = _cache(trained_tiny_teacher, mixed_data, tmp_path / "old", keep_text=False)
    assert "keep_text" not in json.loads((old / "manifest.json").read_text())["extraction"]
    with pytest.raises(RecipeError, match="--keep-text"):
        prepare_student(_recipe(tmp_path, {"ce": 1.0, "uld": 1.0}, other_tok_dir), old, val=shapes_dir / "val.json")
    with pytest.raises(RecipeError, match="--keep-text"):  # uld with the teacher's tokenizer: still needs the text
        prepare_student(_recipe(tmp_path, {"ce": 1.0, "uld": 1.0}), old, val=shapes_dir / "val.json")


def test_llava_student_with_another_tokenizer(hf_tok, mixed_data, other_tok_dir, shapes_dir, tmp_path):
    """The LLaVA layout too: a LLaVA teacher's --keep-text cache of the mixed manifest (text-only,
    multi-turn, LLaMA-Factory rows), and a LLaVA student with the 384-id tokenizer trains from it."""
    import yaml
    from conftest import TINY_LLAVA

    from vlmkd.models.build import build_model, save_model
    from vlmkd.train.student import train_student_run

    torch.manual_seed(SEED)
    teacher = save_model(build_model(TINY_LLAVA, hf_tok), hf_tok, tmp_path / "llava")
    cache = _cache(teacher, mixed_data, tmp_path / "cache")
    recipe = _recipe(tmp_path, {"ce": 1.0, "uld": 1.0, "rel": 0.5}, other_tok_dir, steps=2)
    doc = yaml.safe_load(recipe.read_text())
    doc["model"] = {**doc["model"], "arch": "llava", "vision": TINY_LLAVA["vision"]}
    recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    train_student_run(recipe, cache, out, val=shapes_dir / "val.json", seed=0)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r["loss_uld"]) and math.isfinite(r["loss_rel"]) for r in train)
