"""Read a VLM's internals during an ordinary forward pass: chosen layers' attention probabilities and
hidden states at named points. Used by the teacher cache and, with gradients, by the student losses.

Attention is recomputed only for the chosen layers, from the inputs their attention module received
(eager math: q, k with RoPE, causal + padding mask, softmax in float32), so the forward itself keeps
its fast kernel everywhere. Hidden points:
- "projector": the visual tokens as the language model receives them: its input embeddings at the
  image-token positions (the connector's output after whatever the family does to it on the way:
  LLaVA-NeXT's unpadding and newline tokens, Qwen2.5-VL's window order undone);
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
from vlmkd.models.parts import text_model


@dataclass
class Probe:
    attn: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, T, T] probabilities
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)  # point -> [B, T, D]


def _attention_probs(module, hidden_states, position_embeddings, padding_mask: torch.Tensor,
                     layer_mask: torch.Tensor | None = None) -> torch.Tensor:
    B, T, _ = hidden_states.shape
    shape = (B, T, -1, module.head_dim)
    q = module.q_proj(hidden_states).view(shape)
    k = module.k_proj(hidden_states).view(shape)
    if getattr(module, "q_norm", None) is not None:  # per-head query/key norms (Qwen3, Gemma 3), before RoPE
        q, k = module.q_norm(q), module.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, module.num_key_value_groups)
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * module.scaling
    cap = getattr(module, "attn_logit_softcapping", None)
    if cap:  # Gemma 2's soft cap on the logits
        scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~allowed_keys(module, layer_mask, padding_mask, T), float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def allowed_keys(module, layer_mask, padding_mask: torch.Tensor, T: int) -> torch.Tensor:
    """[B, 1|H, T, T] bool, which keys each query attends to: the mask the layer's attention itself
    received where it is a tensor (eager's additive mask, SDPA's boolean one: so a family's own rules,
    Gemma 3's bidirectional image blocks and sliding windows, hold as the model applies them); where the
    model passes none (SDPA's plain causal case, other kernels), causal + padding + the layer's window."""
    if isinstance(layer_mask, torch.Tensor) and layer_mask.dim() == 4:
        m = layer_mask[..., -T:, -T:]
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        return allowed & padding_mask[:, None, None, :].bool()
    idx = torch.arange(T, device=padding_mask.device)
    allowed = idx[None, :] <= idx[:, None]
    window = getattr(module, "sliding_window", None)
    if window:
        allowed = allowed & (idx[:, None] - idx[None, :] < window)
    return allowed[None, None] & padding_mask[:, None, None, :].bool()


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
            out.attn[li] = _attention_probs(mod, hs, kwargs["position_embeddings"], attention_mask,
                                            kwargs.get("attention_mask"))

        handles.append(layers[li].self_attn.register_forward_hook(hook, with_kwargs=True))
    for point in hidden_points:
        if point == "projector":
            def phook(mod, args, kwargs, point=point):
                out.hidden[point] = kwargs["inputs_embeds"]

            handles.append(tm.register_forward_pre_hook(phook, with_kwargs=True))
            continue
        if point == "final":
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


def visual_states(probe_out: Probe, point: str, image_mask: torch.Tensor) -> list[torch.Tensor]:
    """[N_b, D] hidden states of each row's visual tokens at `point`, for the rows with an image, in row
    order; N_b may differ per row (a processor family's image sizes)."""
    h = probe_out.hidden[point]
    return [h[b][image_mask[b]] for b in range(len(image_mask)) if bool(image_mask[b].any())]


def visual_rows(probe_out: Probe, point: str, image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B_v, N_max, D] hidden states of the visual tokens at `point`, for the B_v rows of the batch that
    have an image (text-only rows have none), in row order, zero-padded to the batch's largest count as the
    cache's payloads are; and the [B_v, N_max] mask of real tokens, or None when every row has N_max (the
    terms then take their unmasked path, so equal-count batches compute exactly what they always did)."""
    h = probe_out.hidden[point]
    states = visual_states(probe_out, point, image_mask)
    if not states:
        return h.new_zeros((0, 0, h.shape[-1])), None
    counts = [len(x) for x in states]
    if len(set(counts)) == 1:
        return torch.stack(states), None
    return torch.nn.utils.rnn.pad_sequence(states, batch_first=True), visual_mask(image_mask)


def visual_mask(image_mask: torch.Tensor) -> torch.Tensor:
    """[B_v, N_max] bool: token j of image row r is real (j < that row's visual-token count)."""
    counts = image_mask.sum(1)
    counts = counts[counts > 0]
    return torch.arange(int(counts.max()), device=image_mask.device)[None, :] < counts[:, None]
