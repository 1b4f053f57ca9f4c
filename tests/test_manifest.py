"""LLaVA manifest readers on good and bad input, and the tokenisation's label and image masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlmkd.data.dataset import encode_samples
from vlmkd.data.manifest import Reject, Sample, load_samples, read_manifest
from vlmkd.data.rejects import RejectLog
from vlmkd.errors import DataError
from vlmkd.models.build import data_tokenizer, load_model


def _row(i, image="img.png", answer="red", **kw):
    return {"id": f"s{i}", "image": image,
            "conversations": [{"from": "human", "value": "<image>\nWhat color is the circle?"},
                              {"from": "gpt", "value": answer}], **kw}


def test_json_and_jsonl_read_the_same(tmp_path):
    rows = [_row(i) for i in range(3)]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a, ra = load_samples(tmp_path / "m.json")
    b, rb = load_samples(tmp_path / "m.jsonl")
    assert a == b and not ra and not rb
    assert a[0].image == (tmp_path / "img.png").resolve()  # relative to the manifest's folder
    assert a[0].question == "What color is the circle?" and a[0].answer == "red"


def test_bad_rows_become_named_rejects(tmp_path):
    lines = [
        json.dumps(_row(0)),
        "{not json",
        json.dumps({"id": "noconv", "image": "x.png"}),
        json.dumps(_row(3, answer="")),
        json.dumps({"id": "badrole", "conversations": [{"from": "robot", "value": "hi"}]}),
        json.dumps(_row(0)),  # duplicate id
        json.dumps([1, 2]),
        json.dumps({"id": "notext", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                      {"from": "gpt", "value": "x"}]}),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    out = list(read_manifest(tmp_path / "m.jsonl"))
    assert isinstance(out[0], Sample)
    rejects = [o for o in out if isinstance(o, Reject)]
    assert len(out) == 8 and len(rejects) == 7  # nothing silently dropped
    reasons = " | ".join(r.reason for r in rejects)
    for needle in ["m.jsonl:2", "not valid JSON", "conversations", "no non-empty assistant turn",
                   "unknown role 'robot'", "duplicate sample id 's0'", "JSON object", "no 'image'"]:
        assert needle in reasons, needle
    with pytest.raises(DataError, match="m.jsonl:2"):
        load_samples(tmp_path / "m.jsonl", strict=True)


def test_missing_manifest_and_non_list(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_samples(tmp_path / "nope.json")
    (tmp_path / "d.json").write_text(json.dumps({"id": 1}))  # one object: a one-row JSONL, whatever the suffix
    samples, (reject,) = load_samples(tmp_path / "d.json")
    assert not samples and "non-empty list of turns" in reject.reason
    (tmp_path / "p.json").write_text(json.dumps({"id": 1}, indent=1))  # pretty-printed: named as such
    _, rejects = load_samples(tmp_path / "p.json")
    assert "pretty-printed JSON object" in rejects[0].reason


def test_image_placeholder_added_when_absent(tmp_path):
    row = _row(0)
    row["conversations"][0]["value"] = "What color is the circle?"
    (tmp_path / "m.json").write_text(json.dumps([row]))
    (s,), _ = load_samples(tmp_path / "m.json")
    assert s.turns[0].text.startswith("<image>\n")


def test_label_mask_covers_exactly_the_answers(tiny_model_dir, tmp_path, shapes_dir):
    model, hf = load_model(tiny_model_dir)
    tok, layout = data_tokenizer(model, hf)
    row = {"id": "multi", "image": str(shapes_dir / "images/train/000000.png"),
           "conversations": [{"from": "human", "value": "<image>\nWhat color is the circle?"},
                             {"from": "gpt", "value": "red"},
                             {"from": "human", "value": "How many squares are there?"},
                             {"from": "gpt", "value": "two"}]}
    (tmp_path / "m.json").write_text(json.dumps([row]))
    (s,), _ = load_samples(tmp_path / "m.json")
    enc = tok.encode(s)
    labelled = enc.input_ids[enc.labels_mask]
    assert tok.decode(labelled).split() == ["red", "two"]
    assert hf.convert_ids_to_tokens(int(labelled[-1])) == "<end_of_utterance>"
    assert int(enc.image_mask.sum()) == layout.num_image_tokens == 9
    assert enc.input_ids[: enc.prompt_len][-1] == hf("Assistant:", add_special_tokens=False)["input_ids"][-1]
    # the image block sits where <image> was, as the HF Idefics3 processor writes it
    first_img = int(np.argmax(enc.image_mask))
    assert hf.convert_ids_to_tokens(enc.input_ids[first_img - 2 : first_img].tolist()) == [
        "<fake_token_around_image>", "<global-img>"]
    gen = tok.encode(s, with_answer=False)
    assert not gen.labels_mask.any() and tok.decode(gen.input_ids).rstrip().endswith("Assistant:")


def test_bad_images_and_overlong_samples_are_rejected_by_name(tiny_model_dir, tmp_path, shapes_dir):
    model, hf = load_model(tiny_model_dir)
    tok, layout = data_tokenizer(model, hf)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = str(shapes_dir / "images/train/000001.png")
    rows = [_row(0, image="missing.png"), _row(1, image="broken.png"), _row(2, image=good),
            _row(3, image=good, answer="word " * 400)]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    samples, _ = load_samples(tmp_path / "m.json")
    log = RejectLog(tmp_path / "rejects.jsonl")
    items = encode_samples(samples, tok, layout, log)
    assert [it.sample.id for it in items] == ["s2"]
    recorded = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recorded] == ["s0", "s1", "s3"]
    assert "missing.png does not exist" in recorded[0]["reason"]
    assert "broken.png cannot be decoded" in recorded[1]["reason"]
    assert "longer than the model's 128" in recorded[2]["reason"]
    with pytest.raises(DataError, match="sample s0"):
        encode_samples(samples, tok, layout, strict=True)
