"""The model-family layer on the processor families (Qwen2-VL, Qwen2.5-VL): tiny random models built
from each family's config class, with the family's special tokens in a locally trained tokenizer and
its chat template. Ids, label masks and pixels equal the family processor's; the attention probe
equals the model's own eager attentions; the transformers cache builds with per-sample visual-token
counts; a student of the family trains from it and its export loads in plain transformers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vlmkd.data.dataset import collate, encode_samples, model_inputs
from vlmkd.data.manifest import Sample, Turn
from vlmkd.data.processor import messages_of
from vlmkd.errors import DataError, ModelError
from vlmkd.models.build import build_model, data_tokenizer, load_model, save_model
from vlmkd.models.families import family_of, supported
from vlmkd.models.probe import probe, visual_states
from vlmkd.models.tokenizer import train_family_tokenizer

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


def _torchvision_reason() -> str | None:
    try:
        import torchvision  # noqa: F401
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


# transformers builds Qwen's processors only with torchvision (their video slot); the default install has
# none (tools/install_vllm.sh), the --torchvision install has it: there these tests run
needs_torchvision = pytest.mark.skipif(_torchvision_reason() is not None,
                                       reason=f"Qwen processors need torchvision ({_torchvision_reason()}); "
                                              "install with tools/install_vllm.sh .venv --torchvision")
WORDS = ("what color is the shape circle square triangle red green blue yellow left right top bottom "
         "how many shapes are there one two three describe the image a small large").split()
SIZES = [(96, 96), (200, 120), (40, 300), (1000, 700)]  # square, wide, tall, large (resized down)


def _spec(arch: str, text_hidden: int = 64, layers: int = 2) -> dict:
    return {"arch": arch, "max_positions": 1024,
            "vision": {"hidden": 32, "layers": 2, "heads": 2, "patch": 8, "merge": 2, "intermediate": 64},
            "text": {"hidden": text_hidden, "layers": layers, "heads": 2, "intermediate": 2 * text_hidden}}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    seed = int(os.environ.get("VLMKD_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
    print(f"image seed {seed}")
    rng = np.random.default_rng(seed)
    out = tmp_path_factory.mktemp("family_images")
    paths = []
    for i, (w, h) in enumerate(SIZES):
        p = out / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    arch = request.param
    tok = train_family_tokenizer([" ".join(WORDS)] * 4, family_of(arch).tokens, vocab_size=400)
    out = tmp_path_factory.mktemp(arch) / "model"
    save_model(build_model(_spec(arch), tok), tok, out)
    return arch, out


def _samples(images) -> list[Sample]:
    out = []
    for i, p in enumerate(images):
        turns = (Turn("user", "<image>\nWhat color is the circle?"), Turn("assistant", "red"))
        if i % 2:
            turns += (Turn("user", "how many shapes are there?"), Turn("assistant", "two small shapes"))
        out.append(Sample(f"s{i}", (p,), turns))
    out.append(Sample("text", (), (Turn("system", "describe"), Turn("user", "what color is red?"),
                                   Turn("assistant", "red"))))
    return out


def _reference_labels(ids: np.ndarray, tok) -> np.ndarray:
    """Independent of the prefix method: every token after `<|im_start|>assistant\\n` up to and including
    the next `<|im_end|>` (how Qwen's template writes an assistant turn)."""
    head = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    lab = np.zeros(len(ids), dtype=bool)
    i = 0
    while i < len(ids):
        if ids[i: i + len(head)].tolist() == head:
            j = i + len(head)
            while ids[j] != end:
                j += 1
            lab[i + len(head): j + 1] = True
            i = j
        i += 1
    return lab


def test_an_unknown_model_type_is_refused_naming_the_supported_list():
    with pytest.raises(ModelError, match="'gemma9' is not supported.*idefics3.*llava.*qwen2_5_vl.*qwen2_vl"):
        family_of("gemma9")
    assert {"idefics3", "llava", "qwen2_vl", "qwen2_5_vl"} <= set(supported())


@needs_torchvision
def test_ids_label_masks_and_pixels_equal_the_family_processor(family_model, images):
    from transformers import AutoProcessor

    arch, path = family_model
    model, tok = load_model(path)
    enc, lay = data_tokenizer(model, tok)
    proc = AutoProcessor.from_pretrained(str(path))  # the processor as a user loads it from the checkpoint
    samples = _samples(images)
    items = encode_samples(samples, enc, lay, strict=True)
    counts = set()
    for s, it in zip(samples, items, strict=True):
        imgs = [Image.open(p).convert("RGB") for p in s.images]
        text = proc.apply_chat_template(messages_of(s.turns), tokenize=False)
        ref = proc(text=[text], images=imgs or None, return_tensors="pt")
        assert it.enc.input_ids.tolist() == ref["input_ids"][0].tolist(), s.id
        np.testing.assert_array_equal(it.enc.labels_mask, _reference_labels(it.enc.input_ids, tok))
        assert tok.decode(it.enc.input_ids[it.enc.labels_mask]).count("<|im_end|>") == len(s.exchanges())
        if imgs:
            torch.testing.assert_close(it.pixels["pixel_values"], ref["pixel_values"], rtol=0, atol=0)
            assert it.pixels["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
            counts.add(int(it.enc.image_mask.sum()))
        else:
            assert it.pixels is None and not it.enc.image_mask.any()
    assert len(counts) == len(images)  # every image size gives its own visual-token count
    prompt = enc.encode(samples[0], with_answer=False)
    text = proc.apply_chat_template(messages_of(samples[0].turns[:1]), tokenize=False, add_generation_prompt=True)
    ref = proc(text=[text], images=[Image.open(images[0]).convert("RGB")], return_tensors="np")
    assert prompt.input_ids.tolist() == ref["input_ids"][0].tolist() and not prompt.labels_mask.any()


@needs_torchvision
def test_a_sample_whose_images_and_placeholders_disagree_is_refused(family_model, images):
    arch, path = family_model
    model, tok = load_model(path)
    enc, lay = data_tokenizer(model, tok)
    bad = Sample("two", (images[0],), (Turn("user", "<image> and <image>"), Turn("assistant", "red")))
    with pytest.raises(DataError, match="sample two: 1 images and 2 <image> placeholders"):
        enc.encode(bad)


@needs_torchvision
def test_probe_equals_the_models_eager_attentions_and_visual_tokens(family_model, images):
    arch, path = family_model
    model, tok = load_model(path)
    model.eval()
    model.config._attn_implementation = "eager"
    model.config.text_config._attn_implementation = "eager"
    enc, lay = data_tokenizer(model, tok)
    items = encode_samples(_samples(images[:3]), enc, lay, strict=True)
    b = collate(items, lay, enc.pad_id)  # mixed visual-token counts, right padding, a text-only row
    layers = list(range(model.config.text_config.num_hidden_layers))
    with torch.no_grad(), probe(model, b["attention_mask"], layers, ["projector", "final"]) as pr:
        out = model(**model_inputs(b), output_attentions=True)
    valid = b["attention_mask"].bool()
    for li in layers:
        ref = out.attentions[li]
        for r in range(len(items)):
            m = valid[r]
            diff = (pr.attn[li][r][:, m][:, :, m] - ref[r][:, m][:, :, m]).abs().max()
            assert float(diff) <= 1e-5, (arch, li, r, float(diff))
    with torch.no_grad():
        feats = model.model.get_image_features(b["pixel_values"], b["image_grid_thw"]).pooler_output
    mine = visual_states(pr, "projector", b["image_mask"])
    assert [len(x) for x in mine] == [int(it.enc.image_mask.sum()) for it in items if it.pixels is not None]
    for a, ref in zip(mine, feats, strict=True):
        torch.testing.assert_close(a, ref, rtol=0, atol=0)


@pytest.fixture(scope="module")
def family_cache(family_model, images, tmp_path_factory):
    from vlmkd.teacher.hf_backend import Extraction
    from vlmkd.teacher.job import CacheJob, run_cache_job

    arch, path = family_model
    root = tmp_path_factory.mktemp(f"{arch}_data")
    rows = []
    for i in range(24):
        img = images[i % 3]
        conv = [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": WORDS[8 + i % 4]}]
        rows.append({"id": f"r{i}", "image": str(img), "conversations": conv})
    rows.append({"id": "t0", "conversations": [{"from": "human", "value": "how many shapes are there?"},
                                               {"from": "gpt", "value": "two"}]})
    rows.append({"id": "missing", "image": str(root / "nope.png"), "conversations": rows[0]["conversations"]})
    (root / "train.json").write_text(json.dumps(rows))
    (root / "val.json").write_text(json.dumps(rows[:6]))
    settings = Extraction(topk=8, score_visual=True, attn_layers=[0, 1], hidden_points=["projector", "final"])
    out = tmp_path_factory.mktemp(f"{arch}_cache")
    summary = run_cache_job(CacheJob(path, root / "train.json", out, settings, samples_per_shard=10))
    return arch, path, root, out, summary


@needs_torchvision
def test_the_transformers_cache_builds_with_per_sample_visual_counts(family_cache, images):
    from vlmkd.cache.reader import CacheReader

    arch, path, root, out, summary = family_cache
    reader = CacheReader(out, payloads=("tokens", "topk", "attn", "hidden"))
    samples = list(reader.samples(0))
    counts_ = reader.manifest["counts"]  # 26 rows = 25 samples + 1 reject (the missing image)
    assert len(samples) == 25 and counts_ == {"rows": 26, "samples": 25, "rejects": 1}
    model, tok = load_model(path)
    enc, lay = data_tokenizer(model, tok)
    counts = {}
    for s in samples:
        n = int(s["visual"].sum())
        if s["id"].startswith("r"):
            assert n and s["hidden"].shape[:2] == (2, n) and s["attn"].shape[-1] == n
            counts.setdefault(int(s["id"][1:]) % 3, set()).add(n)
        else:
            assert n == 0 and "hidden" not in s
    assert len({next(iter(c)) for c in counts.values()}) == 3  # three image sizes, three counts


@needs_torchvision
@pytest.mark.parametrize("losses,args,batch", [
    ({"ce": 1.0, "res": 1.0, "vis": 1.0}, {}, 4),  # mixed visual-token counts in a batch
    ({"ce": 1.0, "res": 1.0, "rel": 1.0, "attn": 1.0, "feat": 1.0}, {"attn_kind": "mse", "attn_layers": [0]}, 1),
])
def test_a_student_of_the_family_trains_and_its_export_loads_and_generates(family_cache, tmp_path, losses, args, batch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmkd.train.student import train_student_run

    arch, path, root, out, _ = family_cache
    stage = {"name": "kd", "steps": 5, "lr": 1e-3, "warmup": 1, "batch_size": batch,
             "trainable": ["projector", "llm"], "losses": losses, "loss_args": args}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "fam", "model": {**_spec(arch, 32, 1), "vision_from": "teacher"},
                                      "eval_every": 1000, "eval_samples": 4, "log_every": 1, "stages": [stage]}))
    res = train_student_run(recipe, out, tmp_path / "run", val=root / "val.json")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 5 and all(np.isfinite(r[f"loss_{t}"]) for r in train for t in losses)
    model = AutoModelForImageTextToText.from_pretrained(str(res.model_dir))
    proc = AutoProcessor.from_pretrained(str(res.model_dir))
    assert type(proc).__name__ == type(AutoProcessor.from_pretrained(str(path))).__name__
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    inputs = proc(text=[text], images=[Image.new("RGB", (120, 80), (200, 30, 30))], return_tensors="pt")
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    new = gen[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 3 and (len(new) == 3 or int(new[-1]) == proc.tokenizer.eos_token_id)


@needs_torchvision
def test_a_mixed_count_batch_for_a_visual_row_term_is_refused_clearly(family_cache, tmp_path):
    from vlmkd.train.student import train_student_run

    arch, path, root, out, _ = family_cache
    stage = {"name": "kd", "steps": 2, "lr": 1e-3, "batch_size": 6, "trainable": ["llm"],
             "losses": {"ce": 1.0, "rel": 1.0}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "fam", "model": _spec(arch, 32, 1), "eval_every": 1000,
                                      "eval_samples": 4, "stages": [stage]}))
    with pytest.raises(ModelError, match="visual-token counts"):
        train_student_run(recipe, out, tmp_path / "run", val=root / "val.json")


@pytest.mark.skipif(_torchvision_reason() is None, reason="torchvision imports here: nothing to refuse")
def test_without_torchvision_a_qwen_model_is_refused_saying_how_to_install_it(tmp_path):
    tok = train_family_tokenizer([" ".join(WORDS)], family_of("qwen2_vl").tokens, vocab_size=300)
    model = build_model(_spec("qwen2_vl"), tok)
    with pytest.raises(ModelError, match="needs torchvision.*install_vllm.sh .venv --torchvision"):
        data_tokenizer(model, tok)
