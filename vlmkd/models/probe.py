"""Read a VLM's internals during an ordinary forward pass: chosen layers' attention probabilities and
hidden states at named points. Used by the teacher cache and, with gradients, by the student losses.

Attention is recomputed only for the chosen layers, from the inputs their attention module received
(eager math: q, k with RoPE, causal + padding mask, softmax in float32), so the forward itself keeps
its fast kernel everywhere. Hidden points:
- "projector": the connector's output (the visual tokens as the LLM receives them);
- "layer:i": the output of decoder layer i (0-based);
- "final": the final norm's output, i.e. what the LM head sees (Y = final @ W^T).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from vlmkd.errors import ModelError
from vlmkd.models.parts import connector, text_model


@dataclass
class Probe:
    attn: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, T, T] probabilities
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)  # point -> [B, T, D] (projector: [B*, N, D])


def _attention_probs(module, hidden_states, position_embeddings, padding_mask: torch.Tensor) -> torch.Tensor:
    B, T, _ = hidden_states.shape
    shape = (B, T, -1, module.head_dim)
    q = module.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = module.k_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, module.num_key_value_groups)
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * module.scaling
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    allowed = causal[None, None] & padding_mask[:, None, None, :].bool()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


@contextlib.contextmanager
def probe(model, attention_mask: torch.Tensor, attn_layers=(), hidden_points=()):
    """Context manager: run the model's forward inside it; the Probe fills with what was asked."""
    tm = text_model(model)
    layers = tm.layers
    out = Probe()
    handles = []
    for li in attn_layers:
        if not 0 <= li < len(layers):
            raise ModelError(f"attention layer {li} asked, the model has {len(layers)} layers")

        def hook(mod, args, kwargs, result, li=li):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            out.attn[li] = _attention_probs(mod, hs, kwargs["position_embeddings"], attention_mask)

        handles.append(layers[li].self_attn.register_forward_hook(hook, with_kwargs=True))
    for point in hidden_points:
        if point == "projector":
            mod = connector(model)
        elif point == "final":
            mod = tm.norm
        elif m := re.fullmatch(r"layer:(\d+)", point):
            i = int(m.group(1))
            if i >= len(layers):
                raise ModelError(f"hidden point {point} asked, the model has {len(layers)} layers")
            mod = layers[i]
        else:
            raise ModelError(f"unknown hidden point {point!r}; use projector, final or layer:i")

        def hhook(mod, args, result, point=point):
            out.hidden[point] = result[0] if isinstance(result, tuple) else result

        handles.append(mod.register_forward_hook(hhook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def visual_rows(probe_out: Probe, point: str, image_mask: torch.Tensor) -> torch.Tensor:
    """[B_v, N_v, D] hidden states of the visual tokens at `point`, for the B_v rows of the batch that
    have an image (text-only rows have none), in row order; every such row has N_v of them."""
    h = probe_out.hidden[point]
    rows = image_mask.any(1)
    bv = int(rows.sum())
    if point == "projector":
        # the connector's output is already one row per visual token: [images, N_v, D]
        return h.reshape(bv, -1, h.shape[-1])
    if bv == 0:
        return h.new_zeros((0, 0, h.shape[-1]))
    n = int(image_mask[rows][0].sum())
    return h[image_mask].reshape(bv, n, h.shape[-1])
