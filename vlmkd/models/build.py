"""Real transformers VLMs built from a recipe's `model:` section, saved and loaded in HF format.

Architectures:
- `idefics3` (the SmolVLM family: SigLIP-style vision tower -> pixel-shuffle connector -> Llama text
  model): the demo layout, because vLLM's CPU build runs it.
- `llava` (CLIP vision tower -> MLP projector -> Llama): kept working by tests.

A saved model directory holds config, safetensors weights, tokenizer, chat template and processor
config: `transformers.AutoModelForImageTextToText.from_pretrained(dir)` and vLLM load it as is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoTokenizer,
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from vlmkd.data.images import PixelSpec
from vlmkd.data.layout import Layout
from vlmkd.data.template import Tokenizer
from vlmkd.errors import ModelError
from vlmkd.models import tokenizer as toks
from vlmkd.models.parts import parts_of

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _text_config(text: dict, tok, max_positions: int) -> LlamaConfig:
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


def build_model(spec: dict, tok) -> torch.nn.Module:
    """A randomly initialised VLM from a recipe `model:` section and the shared tokenizer."""
    arch = spec.get("arch", "idefics3")
    image_size = spec.get("image_size", 96)
    vision, text = spec["vision"], spec["text"]
    max_positions = spec.get("max_positions", 256)
    image_token_id = tok.convert_tokens_to_ids(toks.IMAGE)
    text_cfg = _text_config(text, tok, max_positions)
    torch.manual_seed(spec.get("init_seed", 0))
    if arch == "idefics3":
        cfg = Idefics3Config(
            vision_config=dict(
                hidden_size=vision["hidden"],
                intermediate_size=vision.get("intermediate", 4 * vision["hidden"]),
                num_hidden_layers=vision["layers"],
                num_attention_heads=vision["heads"],
                image_size=image_size,
                patch_size=vision["patch"],
            ),
            text_config=text_cfg.to_dict(),
            scale_factor=spec.get("scale_factor", 2),
            image_token_id=image_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=text_cfg.tie_word_embeddings,
        )
        model = Idefics3ForConditionalGeneration(cfg)
    elif arch == "llava":
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=vision["hidden"],
                intermediate_size=vision.get("intermediate", 4 * vision["hidden"]),
                num_hidden_layers=vision["layers"],
                num_attention_heads=vision["heads"],
                image_size=image_size,
                patch_size=vision["patch"],
                projection_dim=vision["hidden"],
            ).to_dict(),
            text_config=text_cfg.to_dict(),
            image_token_index=image_token_id,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=text_cfg.tie_word_embeddings,
        )
        model = LlavaForConditionalGeneration(cfg)
    else:
        raise ModelError(f"unknown model arch {arch!r}; choose idefics3 or llava")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    if spec.get("vision_from"):
        copy_vision(model, spec["vision_from"])
    return model


def copy_vision(model, source_dir) -> None:
    """Start from another model's vision tower (the teacher's), as LLaVA-KD's students share the
    teacher's vision encoder; the configs must match. `source_dir`: a model directory, or a cache's
    teacher folder (config + vision.safetensors: the tower's weights alone)."""
    source_dir = Path(source_dir)
    tower = source_dir / "vision.safetensors"
    if tower.is_file():
        from safetensors.torch import load_file

        src_cfg, state = AutoConfig.from_pretrained(str(source_dir)), load_file(str(tower))
    else:
        src, _ = load_model(source_dir)
        src_cfg, state = src.config, parts_of(src)["vision"].state_dict()
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
    a = {k: getattr(src_cfg.vision_config, k) for k in keys}
    b = {k: getattr(model.config.vision_config, k) for k in keys}
    if a != b:
        raise ModelError(f"vision_from {source_dir}: its vision tower is {a}, the recipe asks {b}; make them equal")
    parts_of(model)["vision"].load_state_dict(state)


def layout_of(config, tok) -> Layout:
    mt = config.model_type
    v = config.vision_config
    grid = v.image_size // v.patch_size
    text_max = config.text_config.max_position_embeddings
    if mt == "idefics3":
        n = grid * grid // (config.scale_factor**2)
        img = config.image_token_id
        fake = tok.convert_tokens_to_ids(toks.FAKE_IMAGE)
        glob = tok.convert_tokens_to_ids(toks.GLOBAL_IMAGE)
        block = [fake, glob] + [img] * n + [fake]
        return Layout(mt, img, n, block, PixelSpec(v.image_size, SIGLIP_MEAN, SIGLIP_STD), text_max,
                      grid // config.scale_factor)
    if mt == "llava":
        n = grid * grid
        img = config.image_token_index
        return Layout(mt, img, n, [img] * n, PixelSpec(v.image_size, CLIP_MEAN, CLIP_STD), text_max, grid)
    raise ModelError(f"model type {mt!r} is not supported yet (idefics3, llava)")


def save_model(model, tok, out: str | Path, state_dict: dict | None = None) -> Path:
    """Weights (safetensors), config, tokenizer and the processor config vLLM/transformers need.
    `state_dict`: the full weights when the model itself is sharded (FSDP)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)
    if model.config.model_type == "llava":
        _hub_vision_names(out)
    tok.save_pretrained(str(out))
    _save_processor(model.config, tok, out)
    return out


def _hub_vision_names(out: Path) -> None:
    """LLaVA weights under the names LLaVA checkpoints have (`vision_tower.vision_model.*`): transformers
    5 saves the CLIP tower flat (`vision_tower.embeddings...`), which it reads back but vLLM's LLaVA
    loader does not ("no module or parameter named 'vision_tower.embeddings'")."""
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


def _save_processor(config, tok, out: Path) -> None:
    lay = layout_of(config, tok)
    if lay.arch == "idefics3":
        from transformers import Idefics3ImageProcessorPil, Idefics3Processor

        ip = Idefics3ImageProcessorPil(
            do_resize=True,
            size={"longest_edge": lay.pixels.size},
            max_image_size={"longest_edge": lay.pixels.size},
            do_image_splitting=False,
            image_mean=list(lay.pixels.mean),
            image_std=list(lay.pixels.std),
        )
        proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=lay.num_image_tokens,
                                 chat_template=tok.chat_template)
    else:
        from transformers import CLIPImageProcessorPil, LlavaProcessor

        ip = CLIPImageProcessorPil(
            size={"shortest_edge": lay.pixels.size},
            crop_size={"height": lay.pixels.size, "width": lay.pixels.size},
            image_mean=list(lay.pixels.mean),
            image_std=list(lay.pixels.std),
        )
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=config.vision_config.patch_size,
                              vision_feature_select_strategy="default", chat_template=tok.chat_template,
                              num_additional_image_tokens=1)
    proc.save_pretrained(str(out))


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, num_layers: int | None = None):
    """(model, hf tokenizer) from a saved directory; a clear error when it is not a model dir.
    `num_layers` keeps only the LLM's first layers (a shallow pass)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a model directory (no config.json); train or point at one")
    config = AutoConfig.from_pretrained(str(path))
    if num_layers is not None:
        config.text_config.num_hidden_layers = min(num_layers, config.text_config.num_hidden_layers)
    model = AutoModelForImageTextToText.from_pretrained(str(path), config=config, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok


def data_tokenizer(model, tok) -> tuple[Tokenizer, Layout]:
    lay = layout_of(model.config, tok)
    return Tokenizer(tok, lay.image_block, lay.image_token_id, lay.max_length), lay
