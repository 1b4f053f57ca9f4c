"""The teacher cache: codec against float64 references, stock readers, fidelity, and the faults."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
import zstandard

from vlmkd.cache import format as fmt
from vlmkd.cache.manifest import tokenizer_fingerprint, write_manifest
from vlmkd.cache.reader import CacheReader
from vlmkd.cache.writer import merge_parts
from vlmkd.errors import CacheError
from vlmkd.teacher.hf_backend import Extraction, topk_rows
from vlmkd.teacher.job import CacheJob, run_cache_job


def _job(model_dir, data, out, **kw):
    settings = Extraction(topk=kw.pop("topk", 16), score_visual=kw.pop("score_visual", True), batch_size=8,
                          hidden_points=["projector", "final"])
    return CacheJob(model_dir, data, out, settings, samples_per_shard=kw.pop("samples_per_shard", 7), **kw)


@pytest.fixture(scope="module")
def cache_dir(tiny_model_dir, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    run_cache_job(_job(tiny_model_dir, shapes_dir / "val.json", out))
    return out


def _full_reference(model_dir, data, score_visual=True):
    """float64 log-softmax of the teacher's logits at the scored positions, straight from transformers."""
    from vlmkd.data.dataset import collate, encode_samples, model_inputs
    from vlmkd.data.manifest import load_samples
    from vlmkd.models.build import data_tokenizer, load_model

    model, hf = load_model(model_dir)
    model.config.text_config._attn_implementation = "eager"
    tok, layout = data_tokenizer(model, hf)
    samples, _ = load_samples(data)
    items = encode_samples(samples, tok, layout)
    out = {}
    with torch.no_grad():
        for it in items:
            b = collate([it], layout, tok.pad_id)
            res = model(**model_inputs(b), output_attentions=True, output_hidden_states=True)
            out[it.sample.id] = (res, it)
    return out, model


def test_topk_codec_against_float64(tmp_path):
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    for V, k, R in [(437, 64, 13), (437, 437, 3), (70000, 16, 5), (262144, 32, 4)]:
        logits = torch.from_numpy(rng.normal(size=(R, V)) * rng.uniform(0.5, 4))
        ids, lps, tail = topk_rows(logits, k)
        blob = fmt.encode_topk(np.arange(R), ids.numpy(), lps.numpy(), tail.numpy(), V)
        dec = fmt.decode_topk(blob)
        full = torch.log_softmax(logits.double(), -1).numpy()
        assert np.array_equal(dec["pos"], np.arange(R))
        for r in range(R):
            assert set(dec["ids"][r]) == set(ids[r].tolist())  # ids exact, any V
            p = np.exp(dec["logprobs"][r].astype(np.float64))
            assert p.sum() + np.exp(float(dec["tail"][r])) == pytest.approx(1.0, abs=1e-5)
            ref = full[r, dec["ids"][r]]
            # sqrt(p / p_top1) within half a quantisation step (codes of 8 bits: 255 levels)
            u_ref = np.exp((ref - ref.max()) / 2)
            u_dec = np.exp((dec["logprobs"][r].astype(np.float64) - dec["logprobs"][r].max()) / 2)
            assert np.all(np.abs(u_dec - u_ref) <= 0.5 / 255 + 1e-6)
            # and the (k+1)-bucket distribution is within 1e-3 nats of the exact one
            p_true = np.exp(ref)
            tail_true = max(1 - p_true.sum(), 1e-300)
            kl = (p_true * (ref - dec["logprobs"][r])).sum() + (
                tail_true * (np.log(tail_true) - dec["tail"][r]) if k < V else 0.0)
            assert kl < 1e-3
        if k == V:
            assert np.all(np.isneginf(dec["tail"]))


def test_stock_readers_open_the_cache_without_vlmkd(cache_dir):
    """webdataset iterates every sample; members decode with numpy + zstandard as docs/FORMAT.md says."""
    import webdataset as wds

    manifest = json.loads((cache_dir / "manifest.json").read_text())
    urls = [str(cache_dir / s["name"]) for s in manifest["shards"]]
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        n += 1
        meta = json.loads(sample["meta.json"])
        tok = io.BytesIO(zstandard.ZstdDecompressor().decompress(sample["tokens.npy.zst"]))
        ids, flags = np.load(tok), np.load(tok)
        assert ids.dtype == np.int32 and len(ids) == meta["tokens"] == len(flags)
        raw = zstandard.ZstdDecompressor().decompress(sample["topk.bin.zst"])
        R, k, bits, layout = int(np.frombuffer(raw, "<u4", 1, 0)[0]), int(np.frombuffer(raw, "<u2", 1, 4)[0]), raw[6], raw[7]
        assert R == meta["scored"] and k == 16 and bits == 8 and layout == 2
        pos = np.cumsum(np.frombuffer(raw, "<i4", R, 8))  # delta-coded
        planes = np.frombuffer(raw, np.uint8, 4 * R * k, 8 + 6 * R).reshape(4, R * k)
        ids = np.cumsum(planes.T.copy().view("<u4").reshape(R, k).astype(np.int64) + 1, axis=1) - 1
        assert np.all(np.diff(ids, axis=1) > 0) and ids.max() < 440
        resp = np.flatnonzero(flags & 1)
        assert set(resp - 1) <= set(pos.tolist())
        h = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(sample["hidden.npy.zst"])))
        assert h.dtype == np.float16 and h.shape[:2] == (2, 9)
        assert sample["image"][:4] == b"\x89PNG"  # the stock reader: the member as it is
    assert n == manifest_samples(manifest) > 0


def manifest_samples(m):
    return sum(s["samples"] for s in m["shards"])


def test_fidelity_against_the_teacher_itself(cache_dir, tiny_model_dir, shapes_dir):
    ref, model = _full_reference(tiny_model_dir, shapes_dir / "val.json")
    reader = CacheReader(cache_dir, payloads=("tokens", "topk", "attn", "hidden"))
    kls = []
    for s in reader.samples():
        res, it = ref[s["id"]]
        assert np.array_equal(s["input_ids"], it.enc.input_ids)
        full = torch.log_softmax(res.logits[0].double(), -1)
        for r, pos in enumerate(s["pos"]):
            p = full[pos].exp()
            # KL(full || top-k + tail bucket): the sparse form keeps k ids and lumps the rest
            ids = torch.from_numpy(s["ids"][r])
            q_top = torch.from_numpy(s["logprobs"][r]).double()
            p_top = p[ids]
            p_tail = (1 - p_top.sum()).clamp_min(1e-300)
            kl = (p_top * (p_top.log() - q_top)).sum() + p_tail * (p_tail.log() - float(s["tail"][r]))
            kls.append(float(kl))
        # attention: layer 0, head mean, text queries over visual keys, vs transformers' eager maps
        att = res.attentions[0][0].mean(0).double()  # [T, T]
        vis = np.flatnonzero(s["visual"])
        ref_map = att[torch.from_numpy(s["qpos"])][:, torch.from_numpy(vis)].numpy()
        assert np.allclose(s["attn"][0, 0].astype(np.float64), ref_map, atol=2e-3, rtol=1e-2)
        # hidden: final-norm visual states reproduce the logits through the LM head
        final = torch.from_numpy(s["hidden"][1].astype(np.float32))
        logits_from_h = final @ model.lm_head.weight.T
        assert torch.allclose(logits_from_h, res.logits[0, torch.from_numpy(vis)].float(), atol=5e-2)
    assert np.mean(kls) < 1e-3, np.mean(kls)


def test_tokenizer_mismatch_is_refused(cache_dir, hf_tok):
    reader = CacheReader(cache_dir)
    reader.check_tokenizer(tokenizer_fingerprint(hf_tok))  # the teacher's own: fine
    from vlmkd.models.tokenizer import train_tokenizer

    other = train_tokenizer(["a completely different corpus of words"], vocab_size=300)
    with pytest.raises(CacheError, match="tokenizer"):
        reader.check_tokenizer(tokenizer_fingerprint(other), "student")


def test_rerun_does_nothing_and_other_settings_are_refused(cache_dir, tiny_model_dir, shapes_dir):
    before = (cache_dir / "manifest.json").read_bytes()
    run_cache_job(_job(tiny_model_dir, shapes_dir / "val.json", cache_dir))
    assert (cache_dir / "manifest.json").read_bytes() == before
    with pytest.raises(CacheError, match="extraction"):
        run_cache_job(_job(tiny_model_dir, shapes_dir / "val.json", cache_dir, topk=8))


def _shard_bytes(folder):
    m = json.loads((folder / "manifest.json").read_text())
    return [(s["name"], (folder / s["name"]).read_bytes()) for s in m["shards"]]


def test_interrupted_job_resumes_with_every_sample_once(cache_dir, tiny_model_dir, shapes_dir, tmp_path):
    out = tmp_path / "c"
    run_cache_job(_job(tiny_model_dir, shapes_dir / "val.json", out, stop_after_shards=2))
    assert json.loads((out / "manifest.json").read_text())["state"] == "writing"
    # a half-written shard left by the kill is never read and is cleaned up
    (out / "shard-000002.tar.tmp").write_bytes(b"half")
    run_cache_job(_job(tiny_model_dir, shapes_dir / "val.json", out))
    assert _shard_bytes(out) == _shard_bytes(cache_dir)  # same shards, same bytes as one clean run
    ids = [s["id"] for s in CacheReader(out, payloads=()).samples()]
    assert len(ids) == len(set(ids)) == 30


@pytest.mark.slow
@pytest.mark.parametrize("as_url", [False, True])
def test_sigkill_mid_job_then_rerun(cache_dir, tiny_model_dir, shapes_dir, tmp_path, as_url):
    """Killed between shard writes, the re-run resumes and writes one clean run's shards; with `as_url`
    through fsspec's local filesystem (--out file://...), the write path of every URL."""
    out = tmp_path / "k"
    cmd = [sys.executable, "-m", "vlmkd", "cache-teacher", "--teacher", str(tiny_model_dir), "--data",
           str(shapes_dir / "val.json"), "--out", f"file://{out}" if as_url else str(out), "--k", "16", "--score-visual", "--backend", "hf",
           "--samples-per-shard", "7", "--batch-size", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("shard-000001.tar")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "manifest.json").read_text())["state"] == "writing"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert _shard_bytes(out) == _shard_bytes(cache_dir)


def test_flipped_byte_and_truncation_are_named(cache_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(cache_dir, bad)
    m = json.loads((bad / "manifest.json").read_text())
    s0, s1 = m["shards"][0]["name"], m["shards"][1]["name"]
    data = bytearray((bad / s0).read_bytes())
    data[700] ^= 0x40
    (bad / s0).write_bytes(bytes(data))
    (bad / s1).write_bytes((bad / s1).read_bytes()[:1500])
    problems = CacheReader(bad).verify_all()
    assert any(s0 in p and "checksum" in p for p in problems)
    assert any(s1 in p for p in problems)
    out = subprocess.run([sys.executable, "-m", "vlmkd", "cache", "verify", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and s0 in out.stderr and s1 in out.stderr
    with pytest.raises(CacheError, match=s0):
        list(CacheReader(bad).samples())
    # without checksums the reader still names the shard when the bytes do not decode
    shutil.copy(cache_dir / s0, bad / s0)
    with pytest.raises(CacheError, match=s1):
        list(CacheReader(bad, verify=False).samples())


def test_hostile_members_are_refused(cache_dir, tmp_path):
    import shutil

    bad = tmp_path / "hostile"
    shutil.copytree(cache_dir, bad)
    m = json.loads((bad / "manifest.json").read_text())
    for name, make in [("../evil", "file"), ("0000000000.link", "symlink")]:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            ti = tarfile.TarInfo(name)
            if make == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(ti)
            else:
                ti.size = 3
                tar.addfile(ti, io.BytesIO(b"abc"))
        data = buf.getvalue()
        (bad / m["shards"][0]["name"]).write_bytes(data)
        m["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        write_manifest(bad / "manifest.json", m)
        with pytest.raises(CacheError, match="refused"):
            list(CacheReader(bad).samples())


def test_split_jobs_and_merge_equal_one_job(cache_dir, tiny_model_dir, shapes_dir, tmp_path):
    out = tmp_path / "split"
    for i in range(2):
        run_cache_job(_job(tiny_model_dir, shapes_dir / "val.json", out, num_parts=2, part_index=i))
    with pytest.raises(CacheError):
        CacheReader(out)  # not merged yet: no manifest.json
    merge_parts(out)
    a = {s["id"]: s for s in CacheReader(out, payloads=("topk",)).samples()}
    b = {s["id"]: s for s in CacheReader(cache_dir, payloads=("topk",)).samples()}
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k]["ids"], b[k]["ids"])


def test_reader_splits_by_rank_and_resumes(cache_dir):
    full = [s["id"] for s in CacheReader(cache_dir, payloads=(), shuffle_buffer=5, seed=3).samples(epoch=1)]
    assert len(full) == len(set(full)) == 30
    ranks = [[s["id"] for s in CacheReader(cache_dir, payloads=(), rank=r, world=2).samples()] for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) + len(ranks[1]) == 30
    again = [s["id"] for s in CacheReader(cache_dir, payloads=(), shuffle_buffer=5, seed=3).samples(epoch=1, skip=11)]
    assert again == full[11:]


def test_unknown_format_version_is_refused(cache_dir, tmp_path):
    import shutil

    d = tmp_path / "v"
    shutil.copytree(cache_dir, d)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 99
    write_manifest(d / "manifest.json", m)
    with pytest.raises(CacheError, match="version 99"):
        CacheReader(d)


def test_a_format_1_cache_still_reads_and_trains(cache_dir, shapes_dir, tmp_path):
    """Format 2 added one member (`images.bin`, for samples with several images) and a meta key
    (`images`): a format-1 cache, which has neither, reads and trains as it always did."""
    import shutil

    import yaml
    from conftest import TINY_IDEFICS3

    from vlmkd.train.student import train_student_run

    assert fmt.FORMAT_VERSION == 2 and 1 in fmt.KNOWN_VERSIONS
    d = tmp_path / "v1"
    shutil.copytree(cache_dir, d)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 1
    write_manifest(d / "manifest.json", m)
    for sh in m["shards"]:  # a format-1 shard: no images.bin member, no `images` in any meta
        with tarfile.open(d / sh["name"]) as tar:
            for ti in tar:
                assert not ti.name.endswith(".images.bin")
                if ti.name.endswith(".meta.json"):
                    assert "images" not in json.loads(tar.extractfile(ti).read())
    samples = list(CacheReader(d, payloads=("tokens", "image")).samples())
    assert samples and all(len(s["image"]) == 1 for s in samples if s["visual"].any())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "v1", "model": {**TINY_IDEFICS3, "vision_from": "teacher"},
                                      "eval_every": 1000, "eval_samples": 4, "log_every": 1, "stages": [{
                                          "name": "kd", "steps": 2, "lr": 1e-3, "batch_size": 4,
                                          "trainable": ["projector", "llm"], "losses": {"ce": 1.0, "res": 1.0}}]}))
    train_student_run(recipe, d, tmp_path / "run", val=shapes_dir / "val.json", seed=0)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert all(np.isfinite(r["loss_res"]) for r in rows if r["kind"] == "train")


def test_a_flipped_byte_in_the_manifest_is_named(cache_dir, tmp_path):
    """Regression (fault campaign): a flip inside a JSON string kept the manifest valid and went unseen."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(cache_dir, d)
    text = (d / "manifest.json").read_text()
    i = text.index("shapes-val-000003")
    (d / "manifest.json").write_text(text[:i] + "shapes-val-000004" + text[i + 17:])
    with pytest.raises(CacheError, match="manifest.json.*checksum"):
        CacheReader(d)
    out = subprocess.run([sys.executable, "-m", "vlmkd", "cache", "verify", str(d)], capture_output=True, text=True)
    assert out.returncode == 2 and "manifest.json" in out.stderr


def test_a_manifest_flip_into_invalid_utf8_is_named(cache_dir, tmp_path):
    """Regression (full fault campaign): such a flip escaped as a UnicodeDecodeError."""
    import shutil

    d = tmp_path / "u"
    shutil.copytree(cache_dir, d)
    data = bytearray((d / "manifest.json").read_bytes())
    data[100] = 0xF0  # a lead byte with no continuation bytes after it
    (d / "manifest.json").write_bytes(bytes(data))
    with pytest.raises(CacheError, match="manifest.json is not valid UTF-8 JSON"):
        CacheReader(d)


def test_a_pickled_member_is_refused_by_name(cache_dir, tmp_path):
    import shutil

    d = tmp_path / "p"
    shutil.copytree(cache_dir, d)
    m = json.loads((d / "manifest.json").read_text())
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    members = {"meta": json.dumps({"id": "x", "tokens": 1}).encode(),
               "tokens": fmt.encode_tokens(np.array([1]), np.array([False]), np.array([False])),
               "hidden": zstandard.ZstdCompressor().compress(pickled.getvalue())}
    from vlmkd.cache.store import Store
    from vlmkd.cache.writer import write_shard

    nbytes, digest, _ = write_shard(Store(d), m["shards"][0]["name"], [("0000000000", members)])
    m["shards"][0].update(bytes=nbytes, sha256=digest)
    write_manifest(d / "manifest.json", m)
    with pytest.raises(CacheError, match=r"0000000000\.hidden\.npy\.zst.*refused"):
        list(CacheReader(d, payloads=("tokens", "hidden")).samples())


@pytest.mark.parametrize("content_size", [True, False])
def test_a_zstd_bomb_is_a_named_cache_error(cache_dir, tmp_path, content_size):
    """A member of a few KB that decompresses to 64 MiB, with valid checksums (a hostile cache that
    rewrote them): refused from the sample's counts before the bytes are allocated, by the reader and
    by `cache verify`."""
    import shutil

    d = tmp_path / "bomb"
    shutil.copytree(cache_dir, d)
    m = json.loads((d / "manifest.json").read_text())
    bomb = zstandard.ZstdCompressor(write_content_size=content_size).compress(bytes(64 << 20))
    assert len(bomb) < 64 << 10
    members = {"meta": json.dumps({"id": "x", "tokens": 3, "scored": 1, "visual_tokens": 0}).encode(),
               "tokens": fmt.encode_tokens(np.array([1, 2, 3]), np.array([False] * 3), np.array([False] * 3)),
               "hidden": bomb}
    from vlmkd.cache.store import Store
    from vlmkd.cache.writer import write_shard

    nbytes, digest, _ = write_shard(Store(d), m["shards"][0]["name"], [("0000000000", members)])
    m["shards"][0].update(bytes=nbytes, sha256=digest, samples=1)
    write_manifest(d / "manifest.json", m)
    with pytest.raises(CacheError, match=r"0000000000\.hidden\.npy\.zst.*(zstd bomb|limit)"):
        for _ in CacheReader(d, payloads=("tokens", "hidden")).samples():  # shards come in a seeded order
            pass
    assert any("hidden" in p and ("bomb" in p or "limit" in p) for p in CacheReader(d, payloads=()).verify_all())


def test_the_validation_copy_takes_one_image_or_a_list_and_leaves_a_missing_file_named(tmp_path):
    """CACHE/val/: LLaVA's `image` path and LLaMA-Factory's `images` list are copied into the cache and
    renamed there; a missing file keeps its path (the reader rejects that row at use, naming it)."""
    from vlmkd.cache.store import Store
    from vlmkd.cache.writer import VAL_DIR, copy_validation

    src = tmp_path / "data"
    src.mkdir()
    for name, data in (("a.png", b"A"), ("b.jpg", b"B"), ("c.png", b"C")):
        (src / name).write_bytes(data)
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    rows = [{"id": "one", "image": "a.png", "conversations": conv},
            {"id": "two", "images": ["b.jpg", "gone.png", "c.png"], "conversations": conv},
            {"id": "text", "conversations": conv}]
    (src / "val.json").write_text(json.dumps(rows))
    out = tmp_path / "cache"
    assert copy_validation(src / "val.json", Store(out)) == (3, 3)
    kept = json.loads((out / VAL_DIR / "val.json").read_text())
    assert kept[0]["image"] == "images/0000000.png"
    assert kept[1]["images"] == ["images/0000001_0.jpg", "gone.png", "images/0000001_2.png"]
    assert "image" not in kept[2] and "images" not in kept[2]
    copied = {p: (out / VAL_DIR / p).read_bytes() for p in ("images/0000000.png", "images/0000001_0.jpg",
                                                             "images/0000001_2.png")}
    assert copied == {"images/0000000.png": b"A", "images/0000001_0.jpg": b"B", "images/0000001_2.png": b"C"}


def test_the_further_images_member_is_read_with_image_not_alone(cache_dir):
    with pytest.raises(CacheError, match="'images' is read with 'image'"):
        CacheReader(cache_dir, payloads=("tokens", "images"))
