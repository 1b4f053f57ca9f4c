"""LLaVA-MoD's MoE student: upcycling keeps the dense logits, routing and the balance loss match
float64 references, and the MoE student saves and loads through transformers' Auto classes."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TINY_IDEFICS3

from vlmkd.errors import ModelError
from vlmkd.models.build import build_model, load_model, save_model
from vlmkd.models.moe import (
    active_parameters,
    expert_shares,
    is_moe,
    load_balance_loss,
    record_router_logits,
    upcycle,
)

SEED = int.from_bytes(os.urandom(4), "little")


@pytest.fixture(scope="module")
def dense(hf_tok):
    return build_model({**TINY_IDEFICS3, "init_seed": SEED % 1000}, hf_tok).double().eval()


def _inputs(n=12):
    g = torch.Generator().manual_seed(SEED)
    return {"input_ids": torch.randint(5, 200, (3, n), generator=g), "attention_mask": torch.ones(3, n, dtype=torch.long)}


def test_upcycled_student_computes_the_dense_logits(dense):
    moe = upcycle(dense, experts=4, top_k=2, seed=SEED % 97, experts_implementation="eager").eval()
    assert is_moe(moe) and not is_moe(dense)
    with torch.no_grad():
        a = dense(**_inputs()).logits
        b = moe(**_inputs()).logits
    # float64 weights; Mixtral renormalises the routing weights in float32, so they sum to one within
    # 1e-7 and the logits agree to that (everything else is exact)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    total, active = active_parameters(moe)
    d_total, d_active = active_parameters(dense)
    assert d_total == d_active and total > active > d_total  # top-2 of 4: two FFNs per token + routers
    with pytest.raises(ModelError, match="already"):
        upcycle(moe)
    with pytest.raises(ModelError, match="top_k"):
        upcycle(dense, experts=2, top_k=3)


def test_moe_block_routes_as_the_float64_reference(dense):
    """With experts made different, each token's output is sum over its top-k experts of the
    renormalised router probability times that expert's SwiGLU FFN, computed here by hand."""
    moe = upcycle(dense, experts=5, top_k=2, seed=1, experts_implementation="eager").eval()
    block = moe.model.text_model.layers[0].mlp
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(torch.randn(block.experts.gate_up_proj.shape, generator=g, dtype=torch.float64) * 0.2)
        block.experts.down_proj.copy_(torch.randn(block.experts.down_proj.shape, generator=g, dtype=torch.float64) * 0.2)
        block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=g, dtype=torch.float64))
    x = torch.randn(2, 7, block.gate.weight.shape[1], generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = block(x)
    want = torch.zeros_like(x)
    inter = block.experts.down_proj.shape[-1]
    for b in range(2):
        for t in range(7):
            v = x[b, t]
            probs = torch.softmax(block.gate.weight @ v, -1)
            top = sorted(range(5), key=lambda e: -float(probs[e]))[:2]
            norm = sum(float(probs[e]) for e in top)
            for e in top:
                gu = block.experts.gate_up_proj[e] @ v
                h = torch.nn.functional.silu(gu[:inter]) * gu[inter:]
                want[b, t] += float(probs[e]) / norm * (block.experts.down_proj[e] @ h)
    # Mixtral's router softmax and weight renormalisation run in float32: agreement to float32 rounding
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


def _balance_ref(logits_per_layer, top_k, mask):
    E = logits_per_layer[0].shape[-1]
    f = [0.0] * E
    p = [0.0] * E
    n = 0.0
    for logits in logits_per_layer:
        for row, keep in zip(logits.tolist(), mask.reshape(-1).tolist(), strict=True):
            if not keep:
                continue
            m = max(row)
            ex = [pow(2.718281828459045, v - m) for v in row]
            probs = [e / sum(ex) for e in ex]
            for e in sorted(range(E), key=lambda i: -probs[i])[:top_k]:
                f[e] += 1
            for e in range(E):
                p[e] += probs[e]
            n += 1
    return E * sum((f[e] / n) * (p[e] / n) for e in range(E))


def test_balance_loss_matches_float64_reference_and_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(SEED)
    layers = [torch.randn(3 * 9, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    mask = torch.rand(3, 9, generator=g) > 0.3
    mask[0, 0] = True
    got = load_balance_loss(layers, 2, mask)
    assert float(got) == pytest.approx(_balance_ref(layers, 2, mask), rel=1e-6)
    assert float(got) == pytest.approx(float(load_balancing_loss_func(tuple(layers), 6, 2, mask.long())), rel=1e-6)
    assert float(load_balance_loss(layers, 2)) == pytest.approx(_balance_ref(layers, 2, torch.ones_like(mask)), rel=1e-6)
    (grad,) = torch.autograd.grad(got, layers[0])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the gradient (through the router probabilities; the top-k choice is piecewise constant)
    assert torch.autograd.gradcheck(lambda x: load_balance_loss([x, *layers[1:]], 2, mask), (layers[0],))
    shares = expert_shares(layers, 2, mask)
    assert torch.allclose(shares.sum(-1), torch.ones(3, dtype=shares.dtype))


def test_moe_student_saves_and_loads_with_from_pretrained(dense, hf_tok, tmp_path):
    from transformers import AutoModelForImageTextToText

    moe = upcycle(dense.float(), experts=3, top_k=1)
    save_model(moe, hf_tok, tmp_path / "moe")
    again = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "moe"))
    loaded, _ = load_model(tmp_path / "moe")
    assert again.config.text_config.model_type == "mixtral" and again.config.text_config.num_local_experts == 3
    with torch.no_grad(), record_router_logits(loaded) as rl:
        a = moe.eval()(**_inputs()).logits
        b = loaded.eval()(**_inputs()).logits
    assert torch.equal(a, b) and len(rl) == TINY_IDEFICS3["text"]["layers"]


def test_mimic_distillation_upcycles_mid_run_and_resumes(kd_cache_moe, shapes_dir, tmp_path):
    """Stage 1 dense, stage 2 upcycled (balance loss and router loads logged); a run stopped inside the
    sparse stage resumes from its MoE checkpoint; the final student is a Mixtral-LLM VLM."""
    import json

    import yaml

    from vlmkd.train.student import train_student_run

    student = {**TINY_IDEFICS3, "vision_from": "teacher", "text": {"hidden": 32, "layers": 1, "heads": 2,
                                                                 "intermediate": 64}}
    kd = {"ce": 1.0, "res": 1.0, "vis": 1.0}
    stages = [{"name": "dense", "data": "questions", "steps": 4, "lr": 3e-3, "warmup": 1, "batch_size": 8,
               "trainable": ["projector", "llm"], "losses": kd},
              {"name": "sparse", "data": "questions", "steps": 6, "lr": 3e-3, "warmup": 1, "batch_size": 8,
               "trainable": ["projector", "llm"], "upcycle": {"experts": 3, "top_k": 2},
               "losses": {**kd, "balance": 0.01}}]
    recipe = tmp_path / "mod.yaml"
    recipe.write_text(yaml.safe_dump({"name": "mod", "model": student, "eval_every": 1000, "eval_samples": 8,
                                      "save_every": 2, "log_every": 1, "stages": stages}))
    run = tmp_path / "run"
    train_student_run(recipe, kd_cache_moe, run, val=shapes_dir / "val.json", stop_after=7)
    assert json.loads((run / "checkpoint" / "config.json").read_text())["text_config"]["model_type"] == "mixtral"
    res = train_student_run(recipe, kd_cache_moe, run, val=shapes_dir / "val.json")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [r["step"] for r in rows] == list(range(1, 11))
    sparse = [r for r in rows if r["stage"] == "sparse"]
    assert all("loss_balance" in r and 0 < r["moe_load_max"] <= 1 for r in sparse)
    assert not any("moe_load_max" in r for r in rows if r["stage"] == "dense")
    model, _ = load_model(res.model_dir)
    assert is_moe(model) and model.config.text_config.num_local_experts == 3


@pytest.fixture(scope="module")
def kd_cache_moe(trained_tiny_teacher, shapes_dir, tmp_path_factory):
    from vlmkd.teacher.hf_backend import Extraction
    from vlmkd.teacher.job import CacheJob, run_cache_job

    out = tmp_path_factory.mktemp("moecache")
    run_cache_job(CacheJob(trained_tiny_teacher, shapes_dir / "train.json", out,
                           Extraction(topk=16, score_visual=True, attn_layers=[], hidden_points=[], gram=False),
                           samples_per_shard=64))
    return out
