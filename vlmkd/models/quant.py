"""Quantisation-aware distillation: the student's LLM linear layers trained through fake-quantised
weights, then exported as real integer weights that transformers loads.

Quantiser (weights only, symmetric, the round-to-nearest scheme that compressed-tensors decodes):
per output channel, or per group of `group_size` input columns, scale s = max|w| / qmax with
qmax = 2^(bits-1) - 1, q = clamp(round(w / s), -qmax - 1, qmax), w_hat = q s. Training sees w_hat in the
forward pass and passes the gradient straight through the rounding to the float master weights
(straight-through estimator, Bengio et al., 2013; the scales follow the weights).

Export: compressed-tensors' `pack-quantized` format (int4 or int8 values packed into int32, one scale
per channel or group, `quantization_config` in config.json). transformers loads it through its
compressed-tensors integration when that package is installed (`pip install vlmkd[quant]`); on a CPU
the weights are unpacked to floats at the first forward (no integer kernels), so the files are
smaller and the outputs equal the fake-quantised model's, not faster.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from vlmkd.errors import RecipeError
from vlmkd.models.parts import text_model


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int | None = 32  # None: one scale per output channel

    @classmethod
    def parse(cls, raw: dict) -> QuantSpec:
        unknown = set(raw) - {"bits", "group_size"}
        if unknown:
            raise RecipeError(f"qat: unknown key(s) {sorted(unknown)}; use bits (4 or 8) and group_size (or null)")
        spec = cls(**raw)
        if spec.bits not in (4, 8):
            raise RecipeError(f"qat: bits must be 4 or 8, not {spec.bits}")
        if spec.group_size is not None and spec.group_size < 1:
            raise RecipeError(f"qat: group_size must be positive or null (per channel), not {spec.group_size}")
        return spec

    @property
    def tag(self) -> str:
        return f"w{self.bits}" + (f"g{self.group_size}" if self.group_size else "c")


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [out, in] integers as w's dtype, scale [out, groups]) for a weight w [out, in]."""
    n_out, n_in = w.shape
    G = spec.group_size or n_in
    if n_in % G:
        raise RecipeError(f"qat: group_size {G} does not divide a layer's {n_in} input features")
    qmax = 2 ** (spec.bits - 1) - 1
    wg = w.reshape(n_out, n_in // G, G)
    scale = (wg.abs().amax(-1) / qmax).clamp_min(torch.finfo(w.dtype).tiny)
    q = torch.clamp(torch.round(wg / scale[..., None]), -qmax - 1, qmax)
    return q.reshape(n_out, n_in), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [out, in] times its row's group scale, scale [out, groups]: the weight the model computes with."""
    n_out, n_in = q.shape
    return (q.reshape(n_out, scale.shape[1], -1) * scale[..., None]).reshape(n_out, n_in)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w_hat = dequantised q in the forward pass; identity gradient (straight-through)."""
    w_hat = dequantize(*quantize_weight(w.detach(), spec))
    return w + (w_hat - w).detach()


class FakeQuant(torch.nn.Module):
    """A weight parametrization: the layer computes with fake_quantize(weight)."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.spec)


def quant_layers(model) -> dict[str, torch.nn.Linear]:
    """The layers QAT quantises: every linear layer of the LLM's decoder (not the LM head, not the
    vision tower or connector), by their names in `model`."""
    tm = text_model(model)
    inside = {id(m) for m in tm.layers.modules()}
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) in inside}


def add_fake_quant(model, spec: QuantSpec) -> int:
    layers = quant_layers(model)
    for name, lin in layers.items():  # a group size that does not fit is refused before any change, by layer
        try:
            quantize_weight(lin.weight.detach(), spec)
        except RecipeError as e:
            raise RecipeError(f"layer {name}: {e}") from e
    for lin in layers.values():
        parametrize.register_parametrization(lin, "weight", FakeQuant(spec))
    return len(layers)


def fake_quant_spec(model) -> QuantSpec | None:
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations["weight"]:
                if isinstance(p, FakeQuant):
                    return p.spec
    return None


def plain_state_dict(model, baked: bool = False) -> dict | None:
    """The model's weights under their plain names (what transformers saves and loads): the float
    master weights, or (`baked`) the fake-quantised weights the model computes with. None when the
    model has no fake quantisation."""
    if fake_quant_spec(model) is None:
        return None
    sd = {}
    for k, v in model.state_dict().items():
        if ".parametrizations.weight.original" in k:
            name = k.replace(".parametrizations.weight.original", "")
            mod = model.get_submodule(name)
            sd[name + ".weight"] = mod.weight.detach().clone() if baked else v
        else:
            sd[k] = v
    return sd


def export_quantized(model, spec: QuantSpec, tok, out: str | Path) -> Path:
    """Write the student with real integer weights (compressed-tensors pack-quantized) to `out`."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
            QuantizationStatus,
            apply_quantization_config,
        )
    except ImportError as e:
        raise RecipeError("exporting quantised weights needs compressed-tensors (pip install 'vlmkd[quant]')") from e
    from vlmkd.models.build import save_model

    # a fresh copy from the config and the master weights: a deepcopy would share the parametrized
    # layers' generated classes with the training model, and unparametrizing it would break that one
    m = type(model)(copy.deepcopy(model.config))
    m.load_state_dict({k: v.detach().cpu() for k, v in (plain_state_dict(model) or model.state_dict()).items()})
    m.eval()
    names = list(quant_layers(m))
    args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=True,
                            strategy="group" if spec.group_size else "channel", group_size=spec.group_size)
    cfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=names, weights=args)},
                             quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(m, cfg)
    with torch.no_grad():
        for lin in quant_layers(m).values():
            q, scale = quantize_weight(lin.weight.float(), spec)
            # the weight set to its dequantised value: the compressor's own rounding then returns q exactly
            lin.weight.copy_(dequantize(q, scale))
            lin.weight_scale.copy_(scale.reshape(lin.weight_scale.shape).to(lin.weight_scale.dtype))
            if hasattr(lin, "weight_zero_point"):
                lin.weight_zero_point.zero_()
    compressor = ModelCompressor.from_pretrained_model(m, quantization_format="pack-quantized")
    compressor.compress_model(m)
    out = save_model(m, tok, out)
    compressor.update_config(str(out))
    return out
