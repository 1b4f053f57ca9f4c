"""Shared fixtures: a small shapes data set and tiny models built from configs, made once per session."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("VLMKD_TEST_THREADS", "2")))


if not torch.cuda.is_available():
    # without a GPU, vlmkd's Triton kernels run in Triton's interpreter on CPU tensors; the interpreter
    # reads the flag when kernels are decorated and again when they run, so it is set for the session
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_IDEFICS3 = {
    "arch": "idefics3",
    "image_size": 96,
    "scale_factor": 2,
    "max_positions": 128,
    "vision": {"hidden": 32, "layers": 1, "heads": 2, "patch": 16, "intermediate": 64},
    "text": {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128},
}
TINY_LLAVA = {**TINY_IDEFICS3, "arch": "llava", "vision": {**TINY_IDEFICS3["vision"], "patch": 32}}


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    from vlmkd.data.shapes import write_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, {"train": 120, "val": 30, "test": 30}, seed=1, questions_per_image={"train": 2},
                  caption_every={"train": 3})
    return out


@pytest.fixture(scope="session")
def hf_tok(shapes_dir):
    from vlmkd.data.manifest import load_samples
    from vlmkd.models.tokenizer import train_tokenizer

    samples, _ = load_samples(shapes_dir / "train.json")
    return train_tokenizer([t.text.replace("<image>", "") for s in samples for t in s.turns])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, hf_tok):
    from vlmkd.models.build import build_model, save_model

    model = build_model(TINY_IDEFICS3, hf_tok)
    return save_model(model, hf_tok, tmp_path_factory.mktemp("tiny") / "model")


def _train_tiny_teacher(tmp_path_factory, hf_tok, shapes_dir, seed: int, steps: int):
    from vlmkd.data.items import load_items
    from vlmkd.data.rejects import RejectLog
    from vlmkd.models.build import build_model, data_tokenizer
    from vlmkd.train.loop import ItemSource, train
    from vlmkd.train.recipe import parse_recipe

    recipe = parse_recipe({"name": "tiny_teacher", "model": {**TINY_IDEFICS3, "init_seed": seed}, "seed": seed,
                           "eval_every": 1000, "save_every": 1000,
                           "stages": [{"name": "sft", "steps": steps, "lr": 3e-3, "warmup": 5, "batch_size": 16}]})
    model = build_model(recipe.model, hf_tok)
    tok, layout = data_tokenizer(model, hf_tok)
    items = load_items(shapes_dir / "train.json", tok, layout, RejectLog(None), show=False)
    val = load_items(shapes_dir / "val.json", tok, layout, RejectLog(None), show=False)
    run = tmp_path_factory.mktemp(f"tiny_teacher{seed}")
    res = train(recipe, model, hf_tok, tok, layout, ItemSource(items, layout, tok.pad_id, seed), val[:8], run,
                model_out=run / "teacher")
    return res.model_dir


@pytest.fixture(scope="session")
def trained_tiny_teacher(tmp_path_factory, hf_tok, shapes_dir):
    """A tiny teacher trained briefly, so that its distributions carry something to distil."""
    return _train_tiny_teacher(tmp_path_factory, hf_tok, shapes_dir, seed=0, steps=60)


@pytest.fixture(scope="session")
def second_tiny_teacher(tmp_path_factory, hf_tok, shapes_dir):
    """Another teacher (other initialisation, other data order, fewer steps): several-teacher tests."""
    return _train_tiny_teacher(tmp_path_factory, hf_tok, shapes_dir, seed=1, steps=40)
