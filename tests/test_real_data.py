"""Real data as it comes: every format people's manifests are in, odd files, odd images, text-only rows
mixed with image rows through cache-teacher, train-student and eval, multi-turn eval, and stages that
select their samples by a manifest field."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_IDEFICS3, TINY_LLAVA
from PIL import Image
from typer.testing import CliRunner

from vlmkd.cache.reader import CacheReader
from vlmkd.cli import app
from vlmkd.data.dataset import collate, encode_samples
from vlmkd.data.images import load_image
from vlmkd.data.manifest import Reject, Sample, derived_id, load_samples, read_manifest
from vlmkd.data.select import accepts
from vlmkd.errors import CacheError, DataError
from vlmkd.eval.run import exchanges
from vlmkd.eval.score import choice_letter, matches, normalised
from vlmkd.models.build import build_model, data_tokenizer, load_model
from vlmkd.teacher.hf_backend import Extraction
from vlmkd.teacher.job import CacheJob, run_cache_job
from vlmkd.train.kd_data import CacheSource, collate_kd, student_pixels
from vlmkd.train.objectives import KDObjective, cache_facts
from vlmkd.train.recipe import parse_recipe
from vlmkd.train.student import train_student_run

Q, A = "What color is the circle?", "red"


def _write(path, rows, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" if jsonl else json.dumps(rows))
    return path


# ---- formats -----------------------------------------------------------------------------------

FORMATS = {
    # LLaVA's own (LLaVA-1.5 instruction mix)
    "llava": {"id": "x", "image": "img.png",
              "conversations": [{"from": "human", "value": f"<image>\n{Q}"}, {"from": "gpt", "value": A}]},
    # ShareGPT / OpenAI roles
    "sharegpt": {"id": "x", "image": "img.png",
                 "conversations": [{"role": "user", "content": f"<image>\n{Q}"}, {"role": "assistant", "content": A}]},
    # LLaMA-Factory's sharegpt format for multimodal data (data/mllm_demo.json)
    "llamafactory": {"id": "x", "messages": [{"role": "user", "content": f"<image>\n{Q}"},
                                             {"role": "assistant", "content": A}], "images": ["img.png"]},
    # OpenAI content parts (Hugging Face chat datasets)
    "parts": {"id": "x", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "img.png"}, {"type": "text", "text": f"\n{Q}"}]},
        {"role": "assistant", "content": [{"type": "text", "text": A}]}]},
    # alpaca (LLaMA-Factory), the image tag placed by the reader
    "alpaca": {"id": "x", "instruction": Q, "input": "", "output": A, "images": ["img.png"]},
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_reads_to_the_same_sample(tmp_path, fmt):
    (tmp_path / "img.png").write_bytes(b"")
    (s,), rejects = load_samples(_write(tmp_path / "m.json", [FORMATS[fmt]]))
    assert not rejects
    assert s.id == "x" and s.images == ((tmp_path / "img.png").resolve(),)
    assert [(t.role, t.text) for t in s.turns] == [("user", f"<image>\n{Q}"), ("assistant", A)]
    assert s.question == Q and s.answer == A


def test_alpaca_history_system_and_input(tmp_path):
    row = {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief.",
           "history": [["hi", "hello"]]}
    (s,), _ = load_samples(_write(tmp_path / "a.jsonl", [row], jsonl=True))
    assert [(t.role, t.text) for t in s.turns] == [("system", "Be brief."), ("user", "hi"), ("assistant", "hello"),
                                                  ("user", "Translate\nchat"), ("assistant", "cat")]
    assert s.images == () and s.id_derived and s.id == derived_id(row)


def test_dataset_info_column_mapping(tmp_path):
    """LLaMA-Factory's dataset_info.json renames columns and role tags for a file."""
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {
        "file_name": "m.json", "formatting": "sharegpt",
        "columns": {"messages": "dialog", "images": "pics"},
        "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "Q", "assistant_tag": "A"}}}))
    row = {"id": "1", "pics": ["img.png"], "dialog": [{"speaker": "Q", "text": Q}, {"speaker": "A", "text": A}]}
    (s,), rejects = load_samples(_write(tmp_path / "m.json", [row]))
    assert not rejects and s.answer == A and s.turns[0].text == f"<image>\n{Q}" and len(s.images) == 1


def test_files_as_they_come(tmp_path):
    rows = [FORMATS["llava"] | {"id": f"r{i}"} for i in range(3)]
    body = "\n".join(json.dumps(r) for r in rows).encode()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + body)  # the first row must not be lost
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    (tmp_path / "upper.JSONL").write_bytes(body)  # recognised by content, not the suffix's case
    (tmp_path / "rows.txt").write_bytes(body)
    (tmp_path / "utf16.json").write_bytes(json.dumps(rows).encode("utf-16"))
    for name in ("bom.jsonl", "bom.json", "upper.JSONL", "rows.txt", "utf16.json"):
        samples, rejects = load_samples(tmp_path / name)
        assert [s.id for s in samples] == ["r0", "r1", "r2"] and not rejects, name
    latin = [json.dumps(rows[0]).encode(), json.dumps(rows[1] | {"conversations": [
        {"from": "human", "value": "Qu'est-ce que c'est, caf\xe9?"}, {"from": "gpt", "value": "x"}]},
        ensure_ascii=False).encode("latin-1"), json.dumps(rows[2]).encode()]
    (tmp_path / "latin.jsonl").write_bytes(b"\n".join(latin))
    samples, (bad,) = load_samples(tmp_path / "latin.jsonl")  # one bad line, named; the others read
    assert [s.id for s in samples] == ["r0", "r2"]
    assert "latin.jsonl: line 2 is not UTF-8 (byte 0xe9" in bad.reason and "iconv" in bad.reason
    (tmp_path / "latin.json").write_bytes(b"[" + b",".join(latin) + b"]")
    with pytest.raises(DataError, match=r"latin.json: line 1 is not UTF-8"):
        load_samples(tmp_path / "latin.json")


def test_ids_derived_stably_and_repeats_named(tmp_path):
    row = {"image": "a.png", "conversations": FORMATS["llava"]["conversations"]}
    other = {**row, "image": "b.png"}
    out = list(read_manifest(_write(tmp_path / "m.jsonl", [row, other, row], jsonl=True)))
    assert isinstance(out[0], Sample) and out[0].id_derived and out[0].id == derived_id(row)
    assert out[1].id != out[0].id
    assert isinstance(out[2], Reject) and "duplicate sample id" in out[2].reason and "content repeats" in out[2].reason
    again = list(read_manifest(tmp_path / "m.jsonl"))
    assert [o.sample_id if isinstance(o, Reject) else o.id for o in again] == \
           [o.sample_id if isinstance(o, Reject) else o.id for o in out]


@pytest.mark.parametrize("row, needle", [
    ({"id": "u", "image": "https://example.com/cat.jpg", "conversations": FORMATS["llava"]["conversations"]},
     "is a URL; vlmkd reads image files only"),
    ({"id": "m", "images": ["a.png", "b.png"], "conversations": FORMATS["llava"]["conversations"]},
     "1 <image> tags for 2 image(s)"),
    ({"id": "n", "conversations": FORMATS["llava"]["conversations"]}, "but the sample has no 'image'"),
    ({"id": "i", "image": ["a.png", 3], "conversations": FORMATS["llava"]["conversations"]},
     "an image must be a non-empty path string"),
    ({"id": True, "conversations": FORMATS["llava"]["conversations"]}, "'id' must be a non-empty string"),
    ({"id": "p", "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "a content part must be"),
])
def test_bad_rows_are_named(tmp_path, row, needle):
    (item,) = read_manifest(_write(tmp_path / "m.json", [row]))
    assert isinstance(item, Reject) and needle in item.reason, item


def test_plural_images_without_a_tag_are_placed_first(tmp_path):
    row = {"id": "p", "images": ["a.png"], "conversations": [{"from": "human", "value": Q},
                                                             {"from": "gpt", "value": A}]}
    (s,), _ = load_samples(_write(tmp_path / "m.json", [row]))
    assert s.turns[0].text == f"<image>\n{Q}" and len(s.images) == 1  # not silently text-only


# ---- images --------------------------------------------------------------------------------------

def test_exif_orientation_is_applied(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (20, 32, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.png", exif=exif)
    got = np.asarray(load_image(tmp_path / "r.png", "s"))
    assert got.shape == (32, 20, 3)
    assert np.array_equal(got, np.rot90(a, k=-1))  # by hand: a quarter turn clockwise


def test_sixteen_bit_and_alpha_images_convert_by_their_depth(tmp_path):
    rng = np.random.default_rng(1)
    a16 = rng.integers(0, 65536, (16, 24), dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    got = np.asarray(load_image(tmp_path / "g16.png", "s"))
    by_hand = np.round(a16.astype(np.float64) / 65535 * 255).astype(np.uint8)
    assert np.array_equal(got[..., 0], by_hand) and np.array_equal(got[..., 2], by_hand)
    assert (got == 255).mean() < 0.05  # not PIL's clipped 98 % white
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent: white, as a viewer shows it
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = np.asarray(load_image(tmp_path / "a.png", "s"))
    assert tuple(got[0, 0]) == (200, 0, 0) and tuple(got[1, 1]) == (255, 255, 255)
    # the student reads the cache's bytes through the same conversion
    from vlmkd.data.images import PixelSpec
    from vlmkd.data.layout import Layout
    lay = Layout("llava", 0, 1, [0], PixelSpec(16, (0.5,) * 3, (0.5,) * 3), 64, 1)
    px = student_pixels([(tmp_path / "g16.png").read_bytes()], lay, "s")
    ref = np.asarray(load_image(tmp_path / "g16.png", "s").resize((16, 16), Image.Resampling.BICUBIC))
    assert np.array_equal(px, ref.transpose(2, 0, 1))


def test_decompression_bomb_limit_is_kept_and_named(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="decompression-bomb limit"):
        load_image(tmp_path / "big.png", "s")


# ---- mixed text-only and image rows -----------------------------------------------------------------

def _mixed_rows(shapes_dir, split, n, seed=0):
    """Shapes rows in several formats, every third one text-only, one multi-turn; all JSONL-able."""
    rows = json.loads((shapes_dir / f"{split}.json").read_text())
    rows = [r for r in rows if r.get("kind") == "questions"][:n]
    out = []
    for i, r in enumerate(rows):
        img = str(shapes_dir / r["image"])
        q, a = r["conversations"][0]["value"].replace("<image>\n", ""), r["conversations"][1]["value"]
        extra = {"question_type": r.get("question_type"), "kind": "questions"}
        if i % 3 == 1:  # text-only (ScienceQA-like): no image at all
            out.append({"id": f"t{i}", "conversations": [{"from": "human", "value": q},
                                                         {"from": "gpt", "value": a}], **extra})
        elif i % 3 == 2:
            out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                        "images": [img], **extra})  # LLaMA-Factory, no id
        else:
            out.append({"id": f"l{i}", "image": img, "conversations": [
                {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}], **extra})
    out.append({"id": "multi", "image": str(shapes_dir / rows[0]["image"]), "kind": "questions", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many squares are there?"}, {"from": "gpt", "value": "two"}]})
    random.Random(seed).shuffle(out)
    return out


@pytest.mark.parametrize("cfg", [TINY_IDEFICS3, TINY_LLAVA], ids=["idefics3", "llava"])
def test_a_mixed_batch_gives_each_row_its_own_logits(cfg, hf_tok, shapes_dir, tmp_path):
    """A text-only row between image rows: every row's logits equal its one-sample batch's."""
    torch.manual_seed(0)
    model = build_model(cfg, hf_tok).eval()
    tok, layout = data_tokenizer(model, hf_tok)
    samples, _ = load_samples(_write(tmp_path / "m.jsonl", _mixed_rows(shapes_dir, "val", 6), jsonl=True))
    items = encode_samples(samples, tok, layout, strict=True)
    assert {it.pixels is None for it in items} == {True, False}
    batch = collate(items, layout, tok.pad_id)
    assert batch["pixel_values"].shape[0] == sum(it.pixels is not None for it in items)
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"]).logits
        for i, it in enumerate(items):
            one = collate([it], layout, tok.pad_id)
            alone = model(**{k: one[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in one}).logits
            n = len(it.enc.input_ids)
            assert torch.allclose(together[i, :n], alone[0], atol=1e-5), (i, it.sample.id)


@pytest.fixture(scope="module")
def mixed(trained_tiny_teacher, shapes_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    train = _write(d / "train.jsonl", _mixed_rows(shapes_dir, "train", 60), jsonl=True)
    val = _write(d / "val.json", _mixed_rows(shapes_dir, "val", 12, seed=1))
    cache = d / "cache"
    settings = Extraction(topk=16, score_visual=True, attn_layers=[0, 1], hidden_points=["projector", "final"])
    man = run_cache_job(CacheJob(trained_tiny_teacher, train, cache, settings, samples_per_shard=16, val=val))
    return {"dir": d, "train": train, "val": val, "cache": cache, "manifest": man}


def test_mixed_manifest_caches_every_row(mixed):
    man = mixed["manifest"]
    assert man["counts"] == {"rows": 61, "samples": 61, "rejects": 0}
    reader = CacheReader(mixed["cache"], payloads=("tokens", "topk", "image", "attn", "hidden"))
    seen = list(reader.samples())
    assert len(seen) == 61 and len({s["id"] for s in seen}) == 61
    text_only = [s for s in seen if not s["visual"].any()]
    assert len(text_only) == 20
    for s in text_only:
        assert "image" not in s and "attn" not in s and "hidden" not in s and s["fields"]["kind"] == "questions"
    assert all("image" in s and "attn" in s for s in seen if s["visual"].any())


def _objective_batch(model_dir, cache, ids, losses, shift=0):
    recipe = parse_recipe({"model": {"path": str(model_dir)}, "stages": [
        {"name": "kd", "steps": 1, "batch_size": 8, "losses": losses,
         "loss_args": {"attn_kind": "mse", "feat_point": "final"}}]})
    model, hf_tok = load_model(model_dir)
    model.eval()
    tok, layout = data_tokenizer(model, hf_tok)
    obj = KDObjective(model, cache_facts(CacheReader(cache, payloads=())), recipe.stages)
    for m in obj.proj.values():
        torch.nn.init.eye_(m.weight)
    reader = CacheReader(cache, payloads=obj.payloads)
    by_id = {s["id"]: s for s in reader.samples()}
    for s in by_id.values():
        if "image" in s:
            s["pixels"] = student_pixels(s.pop("image"), layout, s["id"])
    out = []
    for group in ids:
        batch = collate_kd([by_id[i] for i in group], layout, tok.pad_id)
        with torch.no_grad():
            out.append({k: float(v) for k, v in obj(recipe.stages[0], model, batch).items()})
    return out


VISUAL = {"rel": 1.0, "attn": 1.0, "align": 1.0, "feat": 1.0}


def test_visual_terms_skip_text_only_rows(mixed, tiny_model_dir):
    """The visual terms of [image, text-only, image] equal those of [image, image]; on text-only rows
    alone they are 0; the teacher distilled into itself on mixed batches gives ~0 for every term."""
    seen = list(CacheReader(mixed["cache"], payloads=("tokens",)).samples())
    img = [s["id"] for s in seen if s["visual"].any()][:2]
    txt = [s["id"] for s in seen if not s["visual"].any()][:2]
    with_text, without, only_text = _objective_batch(tiny_model_dir, mixed["cache"],
                                                     [[img[0], txt[0], img[1]], img, txt], VISUAL)
    print(with_text, without, only_text)
    for k in VISUAL:
        assert with_text[k] == pytest.approx(without[k], rel=1e-5, abs=1e-7), k
        assert without[k] > 1e-4 and only_text[k] == 0.0, k
    (same,) = _objective_batch(mixed["manifest"]["teacher_path"], mixed["cache"], [[img[0], txt[0], img[1], txt[1]]],
                               {**VISUAL, "res": 1.0, "vis": 1.0})
    print("self:", same)
    assert same["res"] < 2e-3 and same["vis"] < 2e-3
    assert all(abs(same[k]) < 1e-4 for k in VISUAL), same


def test_mixed_rows_train_validate_and_evaluate(mixed, tmp_path):
    stage = {"name": "kd", "data": "questions", "steps": 6, "lr": 3e-3, "warmup": 1, "batch_size": 8,
             "trainable": ["projector", "llm"], "losses": {"ce": 1.0, "res": 1.0, "attn": 1.0, "align": 1.0},
             "loss_args": {"attn_layers": [0]}}
    student = {**TINY_IDEFICS3, "vision_from": "teacher", "text": {"hidden": 32, "layers": 1, "heads": 2,
                                                                   "intermediate": 64}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "mixed", "model": student, "eval_every": 3, "eval_samples": 13,
                                      "save_every": 100, "log_every": 1, "stages": [stage]}))
    res = train_student_run(recipe, mixed["cache"], tmp_path / "run")  # the cache's own mixed val manifest
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if r["kind"] == "eval"], "validation ran on the mixed manifest"
    assert all(np.isfinite(r["loss_attn"]) for r in rows if r["kind"] == "train")
    out = tmp_path / "scores.json"
    r = CliRunner().invoke(app, ["eval", "--model", str(res.model_dir), "--data", str(mixed["val"]),
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    scores = json.loads(out.read_text())
    assert scores["rows"] == 13 == scores["samples"] + scores["rejected_rows"]
    assert scores["exchanges"] == 14 == scores["n"] + scores["rejected_exchanges"]  # "multi" has two answers
    assert out.with_suffix(".rejects.jsonl").is_file()
    assert set(scores["per_type"]) <= {"color_of_shape", "shape_at_position", "count_shape", "exists_color_shape",
                                       "color_at_position"} and scores["per_type"]


def test_zero_usable_rows_is_an_error_everywhere(trained_tiny_teacher, tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"id": "a", "image": "missing.png",
                                           "conversations": FORMATS["llava"]["conversations"]},
                                          {"id": "b", "conversations": []}], jsonl=True)
    def cli(*args):  # the real command line: vlmkd's errors are one line and exit 2
        return subprocess.run([sys.executable, "-m", "vlmkd", *args], capture_output=True, text=True)

    r = cli("cache-teacher", "--teacher", str(trained_tiny_teacher), "--data", str(bad), "--out", str(tmp_path / "c"),
            "--backend", "hf")
    assert r.returncode == 2 and "(2 rows = 0 samples + 2 rejected" in r.stderr, r.stderr
    assert "missing.png does not exist" in r.stderr and "non-empty list of turns" in r.stderr
    r = cli("eval", "--model", str(trained_tiny_teacher), "--data", str(bad), "--json", str(tmp_path / "e.json"))
    assert r.returncode == 2 and "no usable sample" in r.stderr, r.stderr
    assert "missing.png does not exist" in (tmp_path / "e.rejects.jsonl").read_text()
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    r = cli("cache-teacher", "--teacher", str(trained_tiny_teacher), "--data", str(empty), "--out", str(tmp_path / "c2"),
            "--backend", "hf")
    assert r.returncode == 2 and "0 rows = 0 samples" in r.stderr, r.stderr


def test_several_images_per_sample_are_refused_by_name(trained_tiny_teacher, shapes_dir, tmp_path):
    img = str(shapes_dir / "images/train/000000.png")
    rows = [{"id": "two", "images": [img, img], "conversations": [
        {"from": "human", "value": "<image><image>\nSame?"}, {"from": "gpt", "value": "yes"}]},
        FORMATS["llava"] | {"image": img}]
    man = run_cache_job(CacheJob(trained_tiny_teacher, _write(tmp_path / "m.json", rows), tmp_path / "c",
                                 Extraction(topk=8, attn_layers=[], hidden_points=[])))
    assert man["counts"] == {"rows": 2, "samples": 1, "rejects": 1}
    (rej,) = [json.loads(x) for x in (tmp_path / "c" / "rejects.jsonl").read_text().splitlines()]
    assert rej["id"] == "two" and "2 images" in rej["reason"] and "one image per sample" in rej["reason"]


# ---- multi-turn eval and answer matching ---------------------------------------------------------

def test_each_answer_is_scored_against_its_own_prefix(tiny_model_dir, shapes_dir, tmp_path):
    model, hf = load_model(tiny_model_dir)
    tok, layout = data_tokenizer(model, hf)
    row = _mixed_rows(shapes_dir, "val", 3)
    (multi,) = [s for s in load_samples(_write(tmp_path / "m.json", row))[0] if s.id == "multi"]
    prompts, refs = exchanges([multi])
    assert refs == ["red", "two"] and [p.id for p in prompts] == ["multi", "multi#1"]
    first, second = encode_samples(prompts, tok, layout, strict=True, with_answer=False)
    full = tok.encode(multi)
    lab = full.labels_mask.astype(int)
    starts = np.flatnonzero(np.diff(np.r_[0, lab]) == 1)  # where each answer's tokens begin
    # exchange k's prompt is exactly the conversation's tokens up to answer k
    assert np.array_equal(first.enc.input_ids, full.input_ids[: starts[0]])
    assert np.array_equal(second.enc.input_ids, full.input_ids[: starts[1]])


@pytest.mark.parametrize("pred, ref, rule, ok", [
    ("Red.", "red", "first_word", True), ("red circle", "red", "first_word", True),
    ("The cat", "cat", "normalised", True), ("a  Cat!", "the cat", "normalised", True),
    ("cat", "dog", "normalised", False), ("(B) a cat", "B", "choice", True), ("The answer is C.", "C", "choice", True),
    ("B", "(A) a dog", "choice", False), ("red", "red ", "exact", True), ("Red", "red", "exact", False),
])
def test_match_rules(pred, ref, rule, ok):
    assert matches(pred, ref, rule) is ok
    assert normalised("The  Answer, an apple!") == "answer apple" and choice_letter("d) four") == "D"


# ---- stages select by a manifest field ----------------------------------------------------------

def test_stage_data_is_a_manifest_field(shapes_dir):
    rows = json.loads((shapes_dir / "train.json").read_text())
    kinds = {r["kind"] for r in rows}
    assert kinds == {"questions", "captions"}  # the shapes generator writes them; vlmkd reads no wording
    assert accepts("captions", "kind", None, {"kind": "captions"}, "anything")
    assert not accepts("captions", "kind", None, {"kind": "questions"}, "Describe the image.")
    assert accepts("captions", "kind", None, {}, "x")  # a row without the field: every stage takes it
    assert accepts("all", "kind", r"^How", {"kind": "x"}, "How many?") and not accepts("all", "kind", r"^How", {}, "Is")
    # a cache from before per-sample fields: its shapes kind read back from the prompt, as stages did then
    assert accepts("captions", "kind", None, None, "Describe the image.")
    assert not accepts("captions", "kind", None, None, "What color is the circle?")
    with pytest.raises(CacheError, match="predates per-sample fields"):
        accepts("color_of_shape", "question_type", None, None, "x")


def test_a_stage_selects_by_another_field(mixed, tiny_model_dir, tmp_path):
    facts = CacheReader(mixed["cache"], payloads=())
    recipe = parse_recipe({"model": {"path": str(tiny_model_dir)}, "stages": [
        {"name": "color", "steps": 1, "batch_size": 4, "data": "color_of_shape", "data_field": "question_type",
         "losses": {"ce": 1.0}}]})
    model, hf = load_model(tiny_model_dir)
    tok, layout = data_tokenizer(model, hf)
    obj = KDObjective(model, cache_facts(facts), recipe.stages)
    reader = CacheReader(mixed["cache"], payloads=obj.payloads)
    batch = next(CacheSource(reader, layout, tok.pad_id, workers=0).batches(0, recipe.stages[0], 0))
    by_id = {s["id"]: s for s in CacheReader(mixed["cache"], payloads=("tokens",)).samples()}
    types = {by_id[i]["fields"].get("question_type") for i in batch["sample_ids"]}
    assert types <= {"color_of_shape", None}  # "multi" has no type field: taken, and said so


def test_a_stage_reads_its_own_cache(mixed, trained_tiny_teacher, shapes_dir, tmp_path):
    """LLaVA's way: pre-training captions in one file, instructions in another; the DPT-like stage
    names its own cache (relative to the recipe), the other stage reads the run's."""
    rows = [r for r in json.loads((shapes_dir / "train.json").read_text()) if r["kind"] == "captions"][:24]
    for r in rows:
        r["image"] = str(shapes_dir / r["image"])
    caps = tmp_path / "caps_cache"
    run_cache_job(CacheJob(trained_tiny_teacher, _write(tmp_path / "captions.json", rows), caps,
                           Extraction(topk=16, attn_layers=[0], hidden_points=["projector"])))
    student = {**TINY_IDEFICS3, "vision_from": "teacher", "text": {"hidden": 32, "layers": 1, "heads": 2,
                                                                   "intermediate": 64}}
    stages = [{"name": "dpt", "cache": "caps_cache", "steps": 3, "batch_size": 4, "lr": 3e-3, "warmup": 1,
               "losses": {"ce": 1.0, "res": 1.0, "align": 1.0}},
              {"name": "sft", "data": "questions", "steps": 3, "batch_size": 4, "lr": 3e-3, "warmup": 1,
               "losses": {"ce": 1.0, "res": 1.0}}]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "two", "model": student, "eval_every": 100, "eval_samples": 4,
                                      "save_every": 100, "log_every": 1, "stages": stages}))
    parsed = parse_recipe(yaml.safe_load(recipe.read_text()), str(recipe))
    assert parsed.stages[0].cache == str(caps.resolve())
    res = train_student_run(recipe, mixed["cache"], tmp_path / "run")
    assert res.model_dir.is_dir()
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in logged if r["kind"] == "train"} == {"dpt", "sft"}
    # the stages' batches come from their own caches
    model, hf = load_model(res.model_dir)
    tok, layout = data_tokenizer(model, hf)
    src = CacheSource(CacheReader(mixed["cache"], payloads=("tokens", "image")), layout, tok.pad_id, workers=0,
                      stage_readers={"dpt": CacheReader(caps, payloads=("tokens", "image"))})
    caption_ids = {r["id"] for r in rows}
    assert set(next(src.batches(0, parsed.stages[0], 0))["sample_ids"]) <= caption_ids
    assert not set(next(src.batches(1, parsed.stages[1], 0))["sample_ids"]) & caption_ids
    stages[0]["cache"] = "no_such_cache"
    recipe.write_text(yaml.safe_dump({"name": "two", "model": student, "stages": stages}))
    with pytest.raises(CacheError, match="no_such_cache"):
        train_student_run(recipe, mixed["cache"], tmp_path / "run2")


def test_a_batch_of_text_only_rows_caches(trained_tiny_teacher, tmp_path):
    """No image in a whole teacher batch: no connector runs, and no visual payload is asked of it."""
    rows = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "What is 2+2?"},
                                              {"from": "gpt", "value": "four"}]} for i in range(3)]
    man = run_cache_job(CacheJob(trained_tiny_teacher, _write(tmp_path / "t.jsonl", rows, jsonl=True), tmp_path / "c",
                                 Extraction(topk=8, attn_layers=[0], hidden_points=["projector", "final"])))
    assert man["counts"] == {"rows": 3, "samples": 3, "rejects": 0}
    got = list(CacheReader(tmp_path / "c", payloads=("tokens", "topk", "attn", "hidden")).samples())
    assert len(got) == 3 and not any("hidden" in s or "attn" in s for s in got)
