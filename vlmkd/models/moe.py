"""LLaVA-MoD's sparse student: a dense student's LLM upcycled into a Mixture of Experts.

The MoE LLM is transformers' Mixtral (registered with the Auto classes, so a saved student loads with
`from_pretrained` and vLLM serves it): the same attention, norms and rotary embedding as the dense
Llama, and in each layer E experts that start as copies of the dense FFN, a linear router, and top-k
routing with weights renormalised over the chosen k. Because the experts are identical at step 0 and
the routing weights sum to one, the upcycled model computes the dense model's logits exactly; the
router (seeded small init) and the experts then diverge in training.

Defaults from LLaVA-MoD (Shu et al., 2024): E = 4 experts, top-2 routing. The Switch-Transformer
load-balancing loss and the per-expert token shares come from the routers' logits, recorded by hooks
(the VLM wrappers do not pass Mixtral's own `router_logits` through).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import MixtralConfig

from vlmkd.errors import ModelError
from vlmkd.models.parts import text_model

DEFAULT_EXPERTS = 4
DEFAULT_TOP_K = 2


def is_moe(model) -> bool:
    return model.config.text_config.model_type == "mixtral"


def moe_text_config(dense, experts: int, top_k: int, aux_coef: float,
                    experts_implementation: str | None = None) -> MixtralConfig:
    """A Mixtral config with the dense Llama config's every shared field."""
    d = dense.to_dict()
    if d.get("mlp_bias") or d.get("attention_bias"):
        raise ModelError("upcycling needs a bias-free Llama (mlp_bias and attention_bias false)")
    if not 1 <= top_k <= experts:
        raise ModelError(f"top_k {top_k} must be between 1 and the number of experts ({experts})")
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
            "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "pad_token_id", "bos_token_id",
            "eos_token_id", "attention_dropout")
    return MixtralConfig(**{k: d[k] for k in keep if k in d}, num_local_experts=experts,
                         num_experts_per_tok=top_k, router_aux_loss_coef=aux_coef, sliding_window=None,
                         router_jitter_noise=0.0, output_router_logits=False,
                         experts_implementation=experts_implementation)


def upcycle(model, experts: int = DEFAULT_EXPERTS, top_k: int = DEFAULT_TOP_K, aux_coef: float = 0.01,
            router_std: float = 0.02, seed: int = 0, experts_implementation: str | None = None):
    """A new VLM whose LLM is the dense one's, with each FFN turned into `experts` copies + a router.
    `experts_implementation`: transformers' expert kernel (None: its default, grouped matmuls, which
    take float32/bf16/fp16; "eager": a loop over experts, any dtype)."""
    if is_moe(model):
        raise ModelError("the model is already a mixture of experts")
    if model.config.text_config.model_type != "llama":
        raise ModelError(f"upcycling takes a Llama LLM, not {model.config.text_config.model_type!r}")
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.text_config = moe_text_config(model.config.text_config, experts, top_k, aux_coef, experts_implementation)
    new = model.__class__(cfg).to(next(model.parameters()).dtype)
    new.generation_config = model.generation_config
    dense = model.state_dict()
    moe_prefixes = tuple(_mlp_prefix(new, i) + "." for i in range(len(text_model(model).layers)))
    state = {name: dense[name] for name in new.state_dict() if not name.startswith(moe_prefixes)}
    for i, layer in enumerate(text_model(model).layers):
        prefix = _mlp_prefix(new, i)
        gate_up = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight], 0)
        state[f"{prefix}.experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(experts, 1, 1)
        state[f"{prefix}.experts.down_proj"] = layer.mlp.down_proj.weight.unsqueeze(0).repeat(experts, 1, 1)
        g = torch.Generator().manual_seed(seed * 1000 + i)
        w = torch.randn(experts, cfg.text_config.hidden_size, generator=g) * router_std
        state[f"{prefix}.gate.weight"] = w.to(layer.mlp.down_proj.weight.dtype)
    new.load_state_dict(state, strict=True)
    return new


def _mlp_prefix(model, layer: int) -> str:
    text = text_model(model)
    names = [n for n, mod in model.named_modules() if mod is text.layers[layer].mlp]
    if len(names) != 1:
        raise ModelError(f"cannot find the LLM's layer {layer} MLP ({names})")
    return names[0]


def routers(model) -> list[torch.nn.Module]:
    return [m for m in text_model(model).modules() if m.__class__.__name__ == "MixtralTopKRouter"]


@contextlib.contextmanager
def record_router_logits(model) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward appends every layer's router logits [tokens, E] to the list."""
    logits: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: logits.append(out[0])) for r in routers(model)]
    try:
        yield logits
    finally:
        for h in hooks:
            h.remove()


def load_balance_loss(router_logits: list[torch.Tensor], top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over all layers (Mixtral's convention): E * sum_e f_e * P_e,
    with f_e the mean number of a token's top-k slots taken by expert e and P_e the mean router
    probability of e, over the (unpadded) tokens of every layer. It is top_k when routing is uniform
    and grows as load concentrates; its gradient flows through P."""
    first = router_logits[0]
    E = first.shape[-1]
    acc = torch.promote_types(first.dtype, torch.float32)  # half precision is summed in float32
    w = (torch.ones(len(first), device=first.device) if mask is None else mask.reshape(-1)).to(acc)[:, None]
    f = torch.zeros(E, dtype=acc, device=first.device)
    p = torch.zeros(E, dtype=acc, device=first.device)
    for logits in router_logits:
        probs = torch.softmax(logits.to(acc), dim=-1)
        chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)
        f = f + (chosen * w).sum(0)
        p = p + (probs * w).sum(0)
    n = w.sum() * len(router_logits)
    return E * ((f / n) * (p / n)).sum()


def expert_shares(router_logits: list[torch.Tensor], top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[layers, E]: the share of each layer's top-k assignments that each expert received."""
    out = []
    first = router_logits[0]
    keep = torch.ones(len(first), dtype=torch.bool, device=first.device) if mask is None else mask.reshape(-1)
    for logits in router_logits:
        chosen = logits.topk(top_k, dim=-1).indices
        counts = torch.bincount(chosen[keep].reshape(-1), minlength=logits.shape[-1]).float()
        out.append(counts / counts.sum().clamp_min(1))
    return torch.stack(out)


def active_parameters(model) -> tuple[int, int]:
    """(total, active per token) parameter counts: a token uses top_k of the E experts of each layer."""
    total = sum(p.numel() for p in model.parameters())
    if not is_moe(model):
        return total, total
    tc = model.config.text_config
    expert = sum(p.numel() for n, p in text_model(model).named_parameters() if ".experts." in n)
    return total, total - expert + expert * tc.num_experts_per_tok // tc.num_local_experts
