"""Real tiny VLMs built from configs: HF round-trip, processor parity, both layouts."""

from __future__ import annotations

import json

import torch
from conftest import TINY_LLAVA
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmkd.data.dataset import collate, encode_samples, model_inputs
from vlmkd.data.images import normalize, to_uint8
from vlmkd.data.manifest import load_samples
from vlmkd.models.build import build_model, data_tokenizer, load_model, save_model


def _batch(model_dir_or_model, hf, shapes_dir, n=4):
    tok, layout = data_tokenizer(model_dir_or_model, hf)
    samples, _ = load_samples(shapes_dir / "val.json")
    items = encode_samples(samples[:n], tok, layout)
    return collate(items, layout, tok.pad_id), layout


def test_save_load_round_trip_gives_identical_logits(tiny_model_dir, shapes_dir, tmp_path):
    model, hf = load_model(tiny_model_dir)
    batch, _ = _batch(model, hf, shapes_dir)
    with torch.no_grad():
        a = model(**model_inputs(batch)).logits
    again = save_model(model, hf, tmp_path / "again")
    m2 = AutoModelForImageTextToText.from_pretrained(str(again))  # plain transformers, no vlmkd
    with torch.no_grad():
        b = m2(**model_inputs(batch)).logits
    assert torch.equal(a, b)
    files = {p.name for p in again.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= files or \
        {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= files
    assert json.loads((again / "config.json").read_text())["model_type"] == "idefics3"


def test_pixels_match_the_saved_hf_processor(tiny_model_dir, shapes_dir):
    model, hf = load_model(tiny_model_dir)
    _, layout = data_tokenizer(model, hf)
    proc = AutoProcessor.from_pretrained(str(tiny_model_dir))
    img = Image.open(shapes_dir / "images/val/000003.png").convert("RGB")
    ref = proc(images=[img], text=["<image>"], return_tensors="pt")
    mine = normalize(torch.from_numpy(to_uint8(img, layout.pixels)), layout.pixels)
    assert torch.allclose(mine, ref["pixel_values"][0, 0], atol=1e-6)
    # the processor's own image-token expansion is the one our tokenizer writes
    tok, _ = data_tokenizer(model, hf)
    assert ref["input_ids"][0].tolist() == layout.image_block


def test_llava_layout_trains_and_round_trips(hf_tok, shapes_dir, tmp_path):
    model = build_model(TINY_LLAVA, hf_tok)
    batch, layout = _batch(model, hf_tok, shapes_dir)
    assert layout.arch == "llava" and layout.num_image_tokens == 9
    assert batch["pixel_values"].shape == (4, 3, 96, 96)
    out = model(**model_inputs(batch))
    out.logits.sum().backward()
    d = save_model(model, hf_tok, tmp_path / "llava")
    m2, _ = load_model(d)
    with torch.no_grad():
        assert torch.allclose(model(**model_inputs(batch)).logits, m2(**model_inputs(batch)).logits)


def test_chat_template_and_processor_give_our_token_ids(shapes_dir, tmp_path):
    """For both image positions: HF's chat template + processor tokenise a sample exactly as vlmkd does."""
    import pytest as _pytest  # noqa: F401
    from conftest import TINY_IDEFICS3

    from vlmkd.models.tokenizer import train_tokenizer

    samples, _ = load_samples(shapes_dir / "val.json")
    s = samples[0]
    for pos in ("start", "end"):
        tok = train_tokenizer([t.text.replace("<image>", "") for x in samples for t in x.turns], image_position=pos)
        d = save_model(build_model(TINY_IDEFICS3, tok), tok, tmp_path / pos)
        model, hf = load_model(d)
        ours, _ = data_tokenizer(model, hf)
        enc = ours.encode(s)
        proc = AutoProcessor.from_pretrained(str(d))
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]},
                {"role": "assistant", "content": [{"type": "text", "text": s.answer}]}]
        text = proc.apply_chat_template(msgs, tokenize=False)
        ref = proc(images=[Image.open(s.image).convert("RGB")], text=[text], add_special_tokens=False)
        assert ref["input_ids"][0] == enc.input_ids.tolist(), pos


def test_llava_saved_under_the_hub_checkpoint_names(hf_tok, shapes_dir, tmp_path):
    """A LLaVA model is saved as LLaVA checkpoints are (`vision_tower.vision_model.*`, which vLLM's
    loader needs) and reads back into transformers with the same logits; the cache's copy of the
    tower (`vision_weights`) loads into the module."""
    from safetensors import safe_open

    from vlmkd.cache.writer import vision_weights
    from vlmkd.models.parts import vision_tower

    model = build_model(TINY_LLAVA, hf_tok)
    batch, _ = _batch(model, hf_tok, shapes_dir)
    with torch.no_grad():
        a = model(**model_inputs(batch)).logits
    out = save_model(model, hf_tok, tmp_path / "llava")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    tower = [k for k in keys if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    m2 = AutoModelForImageTextToText.from_pretrained(str(out))
    with torch.no_grad():
        assert torch.equal(a, m2(**model_inputs(batch)).logits)
    state = {k: torch.from_numpy(v) for k, v in vision_weights(out).items()}
    vision_tower(m2).load_state_dict(state)  # strict: every name the module has, and no other
