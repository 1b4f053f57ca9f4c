"""What a model family tells vlmkd (`Family`), and the pieces families share."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlmkd.data.layout import Layout


@dataclass(frozen=True)
class TokenSpec:
    """The special tokens and chat template a tokenizer of the family has: what a locally trained
    tokenizer needs to stand in for the checkpoint's (the tests' tiny models, from-scratch students)."""

    special: tuple[str, ...]
    pad: str
    eos: str
    chat_template: str
    bos: str | None = None
    # named special tokens the family's processor reads off the tokenizer (Gemma 3's boi_token, image_token, ...)
    named: dict[str, str] | None = None
    # plain (not special) tokens the checkpoint's vocabulary has whole, which an engine's processor looks
    # up by their text (vLLM's Gemma 3 merges the newline runs around each image: "\n" ... "\n\n\n\n")
    words: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # dotted attribute paths under the model's `.model` (also their names in a checkpoint: `model.PATH.…`)
    vision: str
    connector: str
    text: str
    build: Callable  # (recipe `model:` section, tokenizer) -> a randomly initialised model
    layout: Callable  # (config, tokenizer, processor or None) -> vlmkd.data.layout.Layout
    processor: Callable  # (config, tokenizer) -> the processor a saved model of the family ships
    # the ids and pixels come from the checkpoint's processor and chat template (`ProcessorEncoder`);
    # False: vlmkd's own template, which the demo's models are saved with (and tested equal to)
    own_processor: bool = False
    # a demo family (Idefics3, LLaVA): vlmkd's template for models saved with it (the demo's), the
    # checkpoint's own processor and chat template for any other (`vlmkd.models.build.processor_path`)
    demo_template: bool = False
    # transformers builds its processor only with torchvision (a video processor in its slot)
    needs_torchvision: bool = False
    tokens: TokenSpec | None = None
    # the connector lives inside the vision tower's module (Qwen's merger): training `vision` trains it too,
    # and a copied tower leaves it out (its output width is the language model's)
    connector_in_vision: bool = False
    # further connector modules (Qwen3-VL's DeepStack mergers): trained with the projector, and like the
    # connector left out of a copied tower when it sits inside the tower's module
    more_connectors: tuple[str, ...] = ()
    # parameters of the model's `.model` itself that belong to the connector (LLaVA-NeXT's `image_newline`)
    connector_params: tuple[str, ...] = ()
    after_save: Callable | None = None  # (saved model directory) -> None: rewrite what the family's loaders need


def processor_layout(config, processor, image_token_id: int, count: Callable[[dict], int],
                     keys: tuple[str, ...] = ("pixel_values",), **extra) -> Layout:
    """A processor family's `Layout`: its image inputs under `keys`, `count` the visual tokens they make
    (`extra`: `token_types`, `prefix_lm`)."""
    from vlmkd.data.layout import Layout
    from vlmkd.data.processor import VisualInputs

    return Layout(config.model_type, image_token_id, None, None, None, config.text_config.max_position_embeddings,
                  None, visual=VisualInputs(processor, count, keys), processor=processor, **extra)


def per_view(tokens: int) -> Callable[[dict], int]:
    """The count of a family whose every view (an image, a tile) makes `tokens` visual tokens."""
    return lambda inputs: int(inputs["pixel_values"].shape[0]) * tokens


def need_torchvision(family: str) -> None:
    """transformers builds the processors of families with a video slot (Qwen2-VL, ...) only with
    torchvision importable; without it say so and how to get it, rather than transformers' AttributeError."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:
        from vlmkd.errors import ModelError

        raise ModelError(f"the {family} processor needs torchvision (transformers' video processors), which does "
                         f"not import here ({type(e).__name__}: {str(e)[:80]}); install vlmkd with "
                         "`bash tools/install_vllm.sh .venv --torchvision`, or `pip install torchvision` matching your "
                         "torch") from None


def hub_vision_names(out: Path) -> None:
    """A CLIP / SigLIP tower's weights under the names the hub checkpoints have (`vision_tower.vision_model.*`:
    LLaVA, LLaVA-NeXT, OneVision, Gemma 3, PaliGemma): transformers 5 saves the tower flat
    (`vision_tower.embeddings...`), which it reads back but vLLM's loaders do not ("no module or
    parameter named 'vision_tower.embeddings'")."""
    import json

    from safetensors.torch import load_file, save_file

    def hub(key: str) -> str:
        flat = key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model.")
        return "vision_tower.vision_model." + key[len("vision_tower."):] if flat else key

    for f in sorted(out.glob("*.safetensors")):
        state = load_file(str(f))
        save_file({hub(k): v.contiguous() for k, v in state.items()}, str(f), metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text())
        doc["weight_map"] = {hub(k): v for k, v in doc["weight_map"].items()}
        index.write_text(json.dumps(doc, indent=2))


def attr_path(root: torch.nn.Module, dotted: str) -> torch.nn.Module:
    return functools.reduce(getattr, dotted.split("."), root)


def llama_text_config(text: dict, tok, max_positions: int):
    """The Llama language model of the demo's from-scratch families, from a recipe's `text:` section."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=text["hidden"],
        intermediate_size=text.get("intermediate", 4 * text["hidden"]),
        num_hidden_layers=text["layers"],
        num_attention_heads=text["heads"],
        num_key_value_heads=text.get("kv_heads", text["heads"]),
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=text.get("tie_embeddings", False),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def qwen2_text_config(spec: dict, tok) -> dict:
    """A ChatML family's Qwen2 language model (InternVL's, LLaVA-OneVision's), from a recipe's `model:` section."""
    text = spec["text"]
    heads = text["heads"]
    return dict(model_type="qwen2", vocab_size=len(tok), hidden_size=text["hidden"],
                intermediate_size=text.get("intermediate", 4 * text["hidden"]), num_hidden_layers=text["layers"],
                num_attention_heads=heads, num_key_value_heads=text.get("kv_heads", heads),
                max_position_embeddings=spec.get("max_positions", 1024), rms_norm_eps=1e-6, bos_token_id=None,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                tie_word_embeddings=text.get("tie_embeddings", False))


def vit_config(spec: dict) -> dict:
    """A square-input ViT's config keys (SigLIP, CLIP) from a recipe's `vision:` section."""
    v = spec["vision"]
    return dict(hidden_size=v["hidden"], intermediate_size=v.get("intermediate", 4 * v["hidden"]),
                num_hidden_layers=v["layers"], num_attention_heads=v["heads"], image_size=spec.get("image_size", 96),
                patch_size=v["patch"])
