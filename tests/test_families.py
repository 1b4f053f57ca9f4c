"""The model-family layer on every processor family (`FAMILIES`: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3,
InternVL, LLaVA-NeXT, LLaVA-OneVision, SmolVLM2, Mistral 3, PaliGemma) and on the demo families as real
checkpoints ship them (`CHECKPOINTS`): tiny random models built from each family's config class, with the
family's special tokens in a locally trained tokenizer and its chat template. Ids, label masks and pixels
equal what the family processor's `apply_chat_template` gives (PaliGemma's `processor(text, images,
suffix)`); the attention probe equals the model's own eager attentions (Gemma 3's
sliding windows and bidirectional image blocks included); the transformers cache builds with
per-sample visual-token counts; a student of the family trains from it and its export loads in plain
transformers; a batch of mixed counts gives the per-sample losses."""

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
from vlmkd.models.build import (
    attach_processor,
    build_model,
    data_tokenizer,
    load_model,
    save_model,
    saved_processor,
)
from vlmkd.models.families import family_of, supported
from vlmkd.models.families.idefics3 import checkpoint_processor as idefics3_checkpoint_processor
from vlmkd.models.families.llava import CHECKPOINT_TOKENS as LLAVA_TOKENS
from vlmkd.models.families.smolvlm import tokens as smolvlm_tokens
from vlmkd.models.probe import probe, visual_states
from vlmkd.models.tokenizer import train_family_tokenizer

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "internvl", "llava_next", "llava_onevision", "smolvlm", "mistral3", "paligemma", "idefics3", "llava"]
DYNAMIC = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mistral3"}  # any visual-token count per image
TILED = {"internvl", "llava_next", "llava_onevision", "smolvlm", "idefics3"}  # a count per tile grid (the aspect ratio's)
PREFIX = {"paligemma"}  # a prefix-LM without a chat template: one exchange with its image per sample
# a demo family as a real checkpoint ships it (its own chat template and processor, not vlmkd's), as
# (TokenSpec, the processor it is saved with): idefics3 is a SmolVLM (v1) checkpoint, image splitting
# on; llava a LLaVA-1.5-hf one (its template, CLIP's centre crop)
CHECKPOINTS = {"idefics3": (smolvlm_tokens(), idefics3_checkpoint_processor), "llava": (LLAVA_TOKENS, None)}
VIDEO_SLOT = {f for f in FAMILIES if family_of(f).needs_torchvision}  # processors with a video slot: torchvision
# how each family's template writes an assistant turn: the text before its tokens, and its end-of-turn marker
TURN = {"gemma3": ("<start_of_turn>model\n", "<end_of_turn>"), "smolvlm": ("Assistant:", "<end_of_utterance>"),
        "idefics3": ("Assistant:", "<end_of_utterance>"), "llava": ("ASSISTANT:", None),
        "mistral3": ("[/INST]", "</s>"), "paligemma": (None, "<eos>")}
QWEN_TURN = ("<|im_start|>assistant\n", "<|im_end|>")


def _torchvision_reason() -> str | None:
    try:
        import torchvision  # noqa: F401
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


WORDS = ("what color is the shape circle square triangle red green blue yellow left right top bottom "
         "how many shapes are there one two three describe the image a small large").split()
SIZES = [(96, 96), (200, 120), (40, 300), (1000, 700)]  # square, wide, tall, large (resized down)


def _spec(arch: str, text_hidden: int = 64, layers: int = 2) -> dict:
    # gemma3 reads image_size, kv_heads, sliding_window (shorter than a sample, so the probe meets it) and
    # global_every; the Qwen families read none of them
    # (Mistral 3's tower fits the longest edge; at 64 a 40 x 300 image would be one patch wide: no tokens)
    return {"arch": arch, "max_positions": 1024, "image_size": 128 if arch == "mistral3" else 64,
            "vision": {"hidden": 32, "layers": 2, "heads": 2, "patch": 8, "merge": 2, "intermediate": 64},
            "text": {"hidden": text_hidden, "layers": layers, "heads": 2, "kv_heads": 1, "intermediate": 2 * text_hidden,
                     "sliding_window": 12, "global_every": 2}}


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
    if arch in VIDEO_SLOT and _torchvision_reason() is not None:
        pytest.skip(f"{arch}'s processor needs torchvision ({_torchvision_reason()}); install with "
                    "tools/install_vllm.sh .venv --torchvision")
    tokens, make_processor = CHECKPOINTS.get(arch, (family_of(arch).tokens, None))
    tok = train_family_tokenizer([" ".join(WORDS)] * 4, tokens, vocab_size=400)
    out = tmp_path_factory.mktemp(arch) / "model"
    model = build_model(_spec(arch), tok)
    save_model(model, tok, out, processor=make_processor(model.config, tok) if make_processor else None)
    return arch, out


def _samples(images, arch: str = "") -> list[Sample]:
    """One sample per image (every other one with a second exchange) and a text-only one with a system
    turn; for a prefix-LM (PaliGemma), which takes one exchange with its image, single exchanges only."""
    out = []
    for i, p in enumerate(images):
        turns = (Turn("user", "<image>\nWhat color is the circle?"), Turn("assistant", "red"))
        if i % 2 and arch not in PREFIX:
            turns += (Turn("user", "how many shapes are there?"), Turn("assistant", "two small shapes"))
        out.append(Sample(f"s{i}", (p,), turns))
    if arch not in PREFIX:
        out.append(Sample("text", (), (Turn("system", "describe"), Turn("user", "what color is red?"),
                                       Turn("assistant", "red"))))
    return out


def _two(images, arch: str) -> Sample:
    """Two images in one sample, in two exchanges (one for a prefix-LM)."""
    turns = (Turn("user", "<image> and <image>\nWhat color is the circle?"), Turn("assistant", "red"))
    if arch not in PREFIX:
        turns += (Turn("user", "how many shapes are there?"), Turn("assistant", "two"))
    return Sample("two", (images[1], images[2]), turns)


def _reference_labels(ids: np.ndarray, tok, arch: str, ref) -> np.ndarray:
    """Independent of the prefix method: every token after the family's assistant-turn head (Qwen's
    `<|im_start|>assistant\\n`, Gemma's `<start_of_turn>model\\n`) up to and including the next end-of-turn;
    for a prefix-LM, the suffix its processor marks (`token_type_ids`)."""
    if arch in PREFIX:
        return ref["token_type_ids"][0].numpy().astype(bool)
    head_text, end_text = TURN.get(arch, QWEN_TURN)
    head = tok(head_text, add_special_tokens=False)["input_ids"]
    if end_text is None:  # no end-of-turn marker (LLaVA-1.5): up to the next user turn, its spaces not learnt
        user = tok("USER:", add_special_tokens=False)["input_ids"]
        at = lambda j, seq: ids[j: j + len(seq)].tolist() == seq  # noqa: E731
        lab = np.zeros(len(ids), dtype=bool)
        for i in range(len(ids)):
            if at(i, head):
                j = i + len(head)
                while j < len(ids) and not at(j, user):
                    j += 1
                while j > i + len(head) and not tok.decode([int(ids[j - 1])]).strip():
                    j -= 1
                lab[i + len(head): j] = True
        return lab
    end = tok.convert_tokens_to_ids(end_text)
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


def _reference(proc, turns, images, generation_prompt=False):
    """What the family's processor gives for a conversation, the way a user calls it: the images in
    the messages, `apply_chat_template(..., tokenize=True)` (which also decides the BOS); a prefix-LM's
    (PaliGemma: no chat template) `processor(text=prompt, images=..., suffix=answer)` as its docs call it."""
    if type(proc).__name__ == "PaliGemmaProcessor":
        prompt = " ".join(p.strip() for p in turns[0].text.split("<image>") if p.strip())
        extra = {} if generation_prompt else {"suffix": turns[1].text}
        return proc(text=prompt, images=[list(images)], return_tensors="pt", **extra)
    left = list(images)
    msgs = [{**m, "content": [{**c, "image": left.pop(0)} if c["type"] == "image" else c for c in m["content"]]}
            for m in messages_of(turns)]
    return proc.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt",
                                    add_generation_prompt=generation_prompt)


def _several(arch: str, proc, singles: list[int]) -> int:
    """The visual tokens of a sample with these images: each its own count, but LLaVA-OneVision reads
    the images of a several-image sample as base views only (its tokens and one newline each)."""
    if arch == "llava_onevision":
        return len(singles) * (proc.num_image_tokens + 1)
    return sum(singles)


def test_an_unknown_model_type_is_refused_naming_the_supported_list():
    with pytest.raises(ModelError, match="'gemma9' is not supported.*gemma3.*idefics3.*llava.*qwen2_5_vl.*qwen2_vl.*qwen3_vl"):
        family_of("gemma9")
    assert {"idefics3", "llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3"} <= set(supported())


def test_ids_label_masks_and_pixels_equal_the_family_processor(family_model, images):
    from transformers import AutoProcessor

    arch, path = family_model
    model, tok = load_model(path)
    enc, lay = data_tokenizer(model, tok)
    proc = AutoProcessor.from_pretrained(str(path))  # the processor as a user loads it from the checkpoint
    samples = _samples(images, arch)
    items = encode_samples(samples, enc, lay, strict=True)
    counts = set()
    for s, it in zip(samples, items, strict=True):
        imgs = [Image.open(p).convert("RGB") for p in s.images]
        ref = _reference(proc, s.turns, imgs)
        assert it.enc.input_ids.tolist() == ref["input_ids"][0].tolist(), s.id
        np.testing.assert_array_equal(it.enc.labels_mask, _reference_labels(it.enc.input_ids, tok, arch, ref))
        end = TURN.get(arch, QWEN_TURN)[1]
        assert end is None or tok.decode(it.enc.input_ids[it.enc.labels_mask]).count(end) == len(s.exchanges())
        if imgs:
            assert set(it.pixels) == set(lay.visual.keys)
            for k in lay.visual.keys:  # pixel_values (and Qwen's image_grid_thw), bit for bit
                torch.testing.assert_close(it.pixels[k], ref[k], rtol=0, atol=0)
            counts.add(int(it.enc.image_mask.sum()))
        else:
            assert it.pixels is None and not it.enc.image_mask.any()
    # dynamic resolution: every image size gives its own visual-token count; tiling: a count per tile
    # grid (several sizes share one); else one count per image
    assert len(counts) == len(images) if arch in DYNAMIC else len(counts) >= 2 if arch in TILED else len(counts) == 1
    # several images in one sample, in two turns: each placed where its placeholder stands
    two = _two(images, arch)
    it = encode_samples([two], enc, lay, strict=True)[0]
    ref = _reference(proc, two.turns, [Image.open(p).convert("RGB") for p in two.images])
    assert it.enc.input_ids.tolist() == ref["input_ids"][0].tolist()
    np.testing.assert_array_equal(it.enc.labels_mask, _reference_labels(it.enc.input_ids, tok, arch, ref))
    for k in lay.visual.keys:
        torch.testing.assert_close(it.pixels[k], ref[k], rtol=0, atol=0)
    one = {int(x.enc.image_mask.sum()) for x in items[1:3]}
    assert int(it.enc.image_mask.sum()) == _several(arch, proc, [int(x.enc.image_mask.sum()) for x in items[1:3]]), one
    prompt = enc.encode(samples[0], with_answer=False)
    ref = _reference(proc, samples[0].turns[:1], [Image.open(images[0]).convert("RGB")], generation_prompt=True)
    assert prompt.input_ids.tolist() == ref["input_ids"][0].tolist() and not prompt.labels_mask.any()


def test_a_sample_whose_images_and_placeholders_disagree_is_refused(family_model, images):
    arch, path = family_model
    model, tok = load_model(path)
    enc, lay = data_tokenizer(model, tok)
    bad = Sample("two", (images[0],), (Turn("user", "<image> and <image>"), Turn("assistant", "red")))
    with pytest.raises(DataError, match="sample two: 1 images and 2 <image> placeholders"):
        enc.encode(bad)


def test_a_prefix_lm_refuses_the_samples_its_format_has_no_place_for(images):
    """PaliGemma (no chat template: one prompt, its images, one answer) refuses a multi-turn, a
    system-turn and a text-only sample naming the sample and what to do, instead of flattening them."""
    tok = train_family_tokenizer([" ".join(WORDS)] * 4, family_of("paligemma").tokens, vocab_size=400)
    enc, _ = data_tokenizer(build_model(_spec("paligemma"), tok), tok)
    q, a = Turn("user", "<image>\nWhat color is the circle?"), Turn("assistant", "red")
    for sid, imgs, turns in (("multi", (images[0],), (q, a, Turn("user", "and?"), a)),
                             ("sys", (images[0],), (Turn("system", "be brief"), q, a)),
                             ("text", (), (Turn("user", "what color is red?"), a))):
        with pytest.raises(DataError, match=f"sample {sid}: a prefix-LM .*one user turn.*split it into single"):
            enc.encode(Sample(sid, imgs, turns))
    assert enc.encode(Sample("ok", (images[0],), (q, a))).labels_mask.any()


@pytest.mark.parametrize("arch", ["gemma3", "llava_onevision", "qwen2_vl"])
def test_a_familys_language_model_saved_alone_gives_its_logits_or_is_refused_by_name(arch, tmp_path):
    """`save_language_model` (the pretrained regime's student LLM, for `text_from`) on other families than the
    demo's: Gemma 3's and OneVision's LLMs come back as their causal LMs with the VLM's own text logits;
    Qwen2-VL's LLM (multimodal rotary positions) has no text-only class and is refused saying what to do."""
    import torch
    from transformers import AutoModelForCausalLM

    from vlmkd.errors import ModelError
    from vlmkd.models.build import save_language_model

    tok = train_family_tokenizer([" ".join(WORDS)] * 4, family_of(arch).tokens, vocab_size=400)
    torch.manual_seed(5)
    model = build_model(_spec(arch), tok).eval()
    if arch == "qwen2_vl":
        with pytest.raises(ModelError, match="qwen2_vl model's language model .* cannot be saved alone for `text_from`"):
            save_language_model(model, tok, tmp_path / "lm")
        return
    save_language_model(model, tok, tmp_path / "lm")
    lm = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm")).eval()
    ids = torch.tensor([tok(" ".join(WORDS[:12]))["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


def test_probe_equals_the_models_eager_attentions_and_visual_tokens(family_model, images):
    arch, path = family_model
    model, tok = load_model(path)
    model.eval()
    model.config._attn_implementation = "eager"
    model.config.text_config._attn_implementation = "eager"
    enc, lay = data_tokenizer(model, tok)
    items = encode_samples(_samples(images[:3], arch), enc, lay, strict=True)
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
        feats = model.model.get_image_features(**{k: b[k] for k in lay.visual.keys}).pooler_output
    mine = visual_states(pr, "projector", b["image_mask"])
    assert [len(x) for x in mine] == [int(it.enc.image_mask.sum()) for it in items if it.pixels is not None]
    # per image (Qwen), per image of a fixed count (Gemma 3) or per tile (InternVL): each row's tokens in order
    feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]).split([len(x) for x in mine])
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
    rows.append({"id": "m0", "images": [str(images[0]), str(images[1])], "messages": [  # LLaMA-Factory, two images
        {"role": "user", "content": "<image><image>What color is the circle?"}, {"role": "assistant", "content": "red"}]})
    (root / "train.json").write_text(json.dumps(rows))
    (root / "val.json").write_text(json.dumps(rows[:6]))
    settings = Extraction(topk=8, score_visual=True, attn_layers=[0, 1], hidden_points=["projector", "final"])
    out = tmp_path_factory.mktemp(f"{arch}_cache")
    summary = run_cache_job(CacheJob(path, root / "train.json", out, settings, samples_per_shard=10))
    return arch, path, root, out, summary


def test_the_transformers_cache_builds_with_per_sample_visual_counts(family_cache, images):
    from transformers import AutoProcessor

    from vlmkd.cache.reader import CacheReader

    arch, path, root, out, summary = family_cache
    reader = CacheReader(out, payloads=("tokens", "topk", "attn", "hidden", "image"))
    samples = list(reader.samples(0))
    counts_ = reader.manifest["counts"]  # 27 rows = 26 samples + 1 reject (the missing image)
    # (a prefix-LM takes no text-only sample: that row is rejected too, and recorded)
    text_rejected = int(arch in PREFIX)
    assert len(samples) == 26 - text_rejected
    assert counts_ == {"rows": 27, "samples": 26 - text_rejected, "rejects": 1 + text_rejected}
    model, tok = load_model(path)
    enc, lay = data_tokenizer(model, tok)
    counts = {}
    for s in samples:
        n = int(s["visual"].sum())
        if s["id"].startswith("r"):
            assert n and s["hidden"].shape[:2] == (2, n) and s["attn"].shape[-1] == n
            counts.setdefault(int(s["id"][1:]) % 3, set()).add(n)
        elif s["id"] == "m0":  # two images: both files in the shard as on disk, their tokens in one run each
            assert s["image"] == [images[0].read_bytes(), images[1].read_bytes()]
            assert s["hidden"].shape[:2] == (2, n) and s["attn"].shape[-1] == n
            multi = n
        else:
            assert n == 0 and "hidden" not in s
    assert multi == _several(arch, AutoProcessor.from_pretrained(str(path)), [next(iter(counts[0])), next(iter(counts[1]))])
    # the student's pixels, from the shard's image files alone, are the processor's for the sample
    from vlmkd.train.kd_data import student_pixels

    for s in samples:
        if s["id"] in ("r0", "r1", "r2", "m0"):
            files = s["image"] if isinstance(s["image"], list) else [s["image"]]
            want = enc.encode_item(Sample(s["id"], tuple(images[:2] if s["id"] == "m0" else [images[int(s["id"][1:])]]),
                                          (Turn("user", "<image>" * len(files) + "hi"), Turn("assistant", "red"))))[1]
            got = student_pixels(files, lay, s["id"])
            assert set(got) == set(want)
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    # three image sizes: three counts under dynamic resolution, two tile grids or more, else one
    distinct = len({next(iter(c)) for c in counts.values()})
    assert distinct == 3 if arch in DYNAMIC else distinct >= 2 if arch in TILED else distinct == 1


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
    msgs[0]["content"][0]["image"] = Image.new("RGB", (120, 80), (200, 30, 30))
    if arch in PREFIX:  # no chat template: the prompt as its docs give it
        inputs = proc(text="What color is the circle?", images=msgs[0]["content"][0]["image"], return_tensors="pt")
    else:
        inputs = proc.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt",
                                          add_generation_prompt=True)
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    new = gen[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 3 and (len(new) == 3 or int(new[-1]) == proc.tokenizer.eos_token_id)


@pytest.mark.parametrize("attn_kind", ["mse", "kl"])
def test_a_mixed_count_batch_gives_the_per_sample_losses_of_one_sample_batches(family_cache, attn_kind):
    """Rows of several visual-token counts (three image sizes, a two-image row) and a text-only row in
    one batch: each visual term equals its
    one-sample batches combined as the term reduces an equal-count batch (rel, align: the row mean; feat,
    vis: weighted by visual tokens; attn: by scored text queries); contrast (across the batch, so not
    per sample) equals InfoNCE over each row's own mean visual state, computed here from the probe."""
    from vlmkd.cache.reader import CacheReader
    from vlmkd.losses import info_nce
    from vlmkd.train.kd_data import collate_kd, student_pixels
    from vlmkd.train.objectives import KDObjective, cache_facts
    from vlmkd.train.recipe import parse_recipe

    arch, path, root, out, _ = family_cache
    seed = int(os.environ.get("VLMKD_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
    print(f"student seed {seed}")
    _, hf_tok = load_model(path)
    model = build_model({**_spec(arch), "init_seed": seed}, hf_tok).eval()  # the teacher's family and width
    attach_processor(model, saved_processor(path))  # the teacher's processor, as train-student gives a student
    assert seed == 0 or not torch.equal(model.lm_head.weight, load_model(path)[0].lm_head.weight)
    tok, layout = data_tokenizer(model, hf_tok)
    visual = ["vis", "rel", "attn", "align", "feat", "contrast"]
    recipe = parse_recipe({"model": {"path": str(path)}, "stages": [
        {"name": "kd", "steps": 1, "batch_size": 4, "losses": dict.fromkeys(visual, 1.0),
         "loss_args": {"attn_kind": attn_kind, "feat_point": "final", "logit_impl": "full"}}]})
    obj = KDObjective(model, cache_facts(CacheReader(out, payloads=())), recipe.stages)
    for m in obj.proj.values():
        if hasattr(m, "weight"):
            torch.nn.init.eye_(m.weight)
    by_id = {s["id"]: s for s in CacheReader(out, payloads=obj.payloads).samples()}
    for s in by_id.values():
        if "image" in s:
            s["pixels"] = student_pixels(s.pop("image"), layout, s["id"])

    def losses(ids):
        b = collate_kd([by_id[i] for i in ids], layout, tok.pad_id)
        with torch.no_grad():
            return b, {k: float(v) for k, v in obj(recipe.stages[0], model, b).items()}

    mixed_ids = ["r0", "r1", "t0", "m0", "r2"]  # r0, r1, r2: the three image sizes; m0: two images
    if arch in PREFIX:
        mixed_ids.remove("t0")
    b, mixed = losses(mixed_ids)
    # Qwen: four counts; Gemma 3 (a fixed count per image): two, m0's twice the others'
    assert len(set(b["image_mask"].sum(1).tolist()) - {0}) >= (3 if arch in DYNAMIC else 2)
    singles = [losses([i]) for i in ("r0", "r1", "m0", "r2")]
    weights = {"rel": [1.0] * 4, "align": [1.0] * 4,
               "feat": [float(sb["image_mask"].sum()) for sb, _ in singles],
               "vis": [float(sb["t_vis"].sum()) for sb, _ in singles],  # the visual rows the teacher scored
               "attn": [float(sb["t_qmask"].sum()) for sb, _ in singles]}
    for term, w in weights.items():
        want = sum(wi * one[term] for wi, (_, one) in zip(w, singles, strict=True)) / sum(w)
        # a student other than the teacher: every loss far above float32 noise (squared attention gaps are
        # small, and so are squared gaps of visual tokens whose projector ends in a freshly initialised linear)
        assert mixed[term] > (1e-10 if term == "attn" else 1e-8 if term == "align" else 1e-4), (term, mixed[term])
        assert mixed[term] == pytest.approx(want, rel=1e-4), (term, mixed[term], [o[term] for _, o in singles])
    # contrast: the probe's own per-row visual states, each row's mean, against the cache's own rows
    with torch.no_grad(), probe(model, b["attention_mask"], (), ["final"]) as pr:
        model(**model_inputs(b))
    s_vec = torch.stack([x.mean(0) for x in visual_states(pr, "final", b["image_mask"])])
    point = CacheReader(out, payloads=()).manifest["extraction"]["hidden_points"].index("final")
    t_vec = torch.stack([torch.from_numpy(by_id[i]["hidden"][point].astype(np.float32)).mean(0)
                         for i in mixed_ids if i != "t0"])
    assert mixed["contrast"] == pytest.approx(float(info_nce(s_vec, t_vec, 0.07, True)), rel=1e-4)


@pytest.mark.skipif(_torchvision_reason() is None, reason="torchvision imports here: nothing to refuse")
def test_without_torchvision_a_qwen_model_is_refused_saying_how_to_install_it(tmp_path):
    tok = train_family_tokenizer([" ".join(WORDS)], family_of("qwen2_vl").tokens, vocab_size=300)
    model = build_model(_spec("qwen2_vl"), tok)
    with pytest.raises(ModelError, match="needs torchvision.*install_vllm.sh .venv --torchvision"):
        data_tokenizer(model, tok)
