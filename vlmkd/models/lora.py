"""LoRA students through PEFT: low-rank adapters injected into the student's language model in place
(`peft.inject_adapter_in_model`, so vlmkd's part finders, probes and checkpoints see the same model
with extra `lora_A` / `lora_B` weights), trained with the stage's other parts; exported merged into
plain weights that transformers and vLLM load, with the adapters kept beside.

A recipe's model section takes `lora: {r, alpha, dropout, target_modules}`; a stage's `trainable:
[llm]` then trains the LLM's adapters only (its base weights and the LM head stay frozen), and other
listed parts (`projector`, `vision`) train fully.

QLoRA (`lora: {..., quantize_base: {bits: 4, group_size: 32}}`): every linear layer of the LLM's
decoder is frozen as integer levels with group scales (vlmkd's quantiser, models/quant.py; one level
per int8 byte, so 4× less memory than float32 for the base, the packing to two int4 per byte being the
export format's job) and computes with the dequantised weight; the adapters train in float on top. The
export dequantises and merges (a float checkpoint; `vlmkd quantize` re-quantises it if wanted).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from vlmkd.errors import RecipeError
from vlmkd.models.parts import text_model

ADAPTER = "default"


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    quantize_base: dict | None = None  # QLoRA: {bits: 4 | 8, group_size: N | null}

    @classmethod
    def parse(cls, raw) -> LoraSpec:
        if not isinstance(raw, dict):
            raise RecipeError(f"model.lora is a mapping {{r, alpha, dropout, target_modules}}, not {raw!r}")
        known = {f.name for f in fields(cls)}
        bad = set(raw) - known
        if bad:
            raise RecipeError(f"model.lora: unknown key(s) {sorted(bad)}; known: {sorted(known)}")
        spec = cls(**raw)
        if spec.quantize_base is not None:
            from vlmkd.models.quant import QuantSpec

            QuantSpec.parse(spec.quantize_base)  # refuses bad bits / group sizes by name
        if not isinstance(spec.r, int) or spec.r < 1 or not isinstance(spec.target_modules, list) or not spec.target_modules:
            raise RecipeError(f"model.lora: r must be a positive integer and target_modules a non-empty list ({raw})")
        return spec


def add_lora(model, spec: LoraSpec):
    """Inject the adapters into the language model's target linear layers (not the vision tower)."""
    from peft import LoraConfig, inject_adapter_in_model

    if spec.quantize_base is not None:
        quantize_base(model, spec.quantize_base)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                     target_modules=list(spec.target_modules), bias="none")
    try:
        inject_adapter_in_model(cfg, text_model(model), adapter_name=ADAPTER)
    except ValueError as e:
        raise RecipeError(f"model.lora: {e}") from e
    model._vlmkd_lora = spec
    return model


class QuantizedLinear(torch.nn.Linear):
    """A frozen linear layer kept as integer levels `q` (int8) and group scales, computing with the
    dequantised weight (an nn.Linear to PEFT, which wraps it like any linear layer)."""

    def __init__(self, lin: torch.nn.Linear, spec):
        from vlmkd.models.quant import quantize_weight

        torch.nn.Module.__init__(self)  # no float weight of its own
        self.in_features, self.out_features, self.spec = lin.in_features, lin.out_features, spec
        q, scale = quantize_weight(lin.weight.detach().float(), spec)
        self.register_buffer("q", q.to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        from vlmkd.models.quant import dequantize

        return dequantize(self.q.float(), self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


def quantize_base(model, raw: dict) -> int:
    """Replace the LLM decoder's linear layers by frozen `QuantizedLinear`s (the set QAT quantises)."""
    from vlmkd.models.quant import QuantSpec, quant_layers

    spec = QuantSpec.parse(raw)
    built = {}
    for name, lin in quant_layers(model).items():  # every layer built before any is swapped in
        try:
            built[name] = QuantizedLinear(lin, spec)
        except RecipeError as e:
            raise RecipeError(f"model.lora.quantize_base: layer {name}: {e}") from e
    for name, layer in built.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return len(built)


def has_lora(model) -> bool:
    return getattr(model, "_vlmkd_lora", None) is not None


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LoraLayer)]


def merged_state_dict(model, state: dict | None = None) -> dict:
    """The model's weights under plain names with each adapter merged in (W + scale * B A), computed
    without touching the model (training can go on after an intermediate save)."""
    from vlmkd.models.quant import dequantize

    sd = dict(state if state is not None else model.state_dict())
    for key in [k for k in sd if k.endswith(".q")]:  # QLoRA's frozen base: dequantised first
        stem = key[: -len(".q")]
        sd[f"{stem}.weight"] = dequantize(sd.pop(key).float(), sd.pop(f"{stem}.scale"))
    for name, mod in _lora_layers(model):
        base = f"{name}.base_layer"
        w = sd.pop(f"{base}.weight")
        sd[f"{name}.weight"] = (w + mod.get_delta_weight(ADAPTER).to(w.dtype)).detach().clone()
        if f"{base}.bias" in sd:
            sd[f"{name}.bias"] = sd.pop(f"{base}.bias")
    return {k: v for k, v in sd.items() if ".lora_" not in k}


def save_adapters(model, out: Path) -> Path:
    """The adapters alone (safetensors) and their spec, for a user who keeps the base separately."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}
    save_file(tensors, str(out / "adapters.safetensors"))
    (out / "lora.json").write_text(json.dumps(asdict(model._vlmkd_lora), indent=1))
    return out


def lora_parameter(name: str) -> bool:
    return ".lora_" in f".{name}" or name.startswith("lora_")


def trainable_llm_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The LLM part's parameters a LoRA student trains: its adapters."""
    return [p for n, p in module.named_parameters() if lora_parameter(n)]
