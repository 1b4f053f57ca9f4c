"""Real transformers VLMs: built from a recipe's `model:` section, saved and loaded in HF format.
What differs per model family lives in its module under `vlmkd.models.families`; this module only
dispatches to it.

A saved model directory holds config, safetensors weights, tokenizer, chat template and processor
config: `transformers.AutoModelForImageTextToText.from_pretrained(dir)` + `AutoProcessor` (and vLLM,
for the families it runs) load it as is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

from vlmkd.data.layout import Layout
from vlmkd.data.processor import PrefixEncoder, ProcessorEncoder
from vlmkd.data.template import Tokenizer
from vlmkd.data.template import chat_template as demo_chat_template
from vlmkd.errors import ModelError
from vlmkd.models.families import family_of
from vlmkd.models.families.base import need_torchvision
from vlmkd.models.parts import parts_of, text_model

DEMO_TEMPLATES = {demo_chat_template("start"), demo_chat_template("end")}  # vlmkd's own, as the demo saves it


def build_model(spec: dict, tok) -> torch.nn.Module:
    """A randomly initialised VLM of the recipe's `model.arch` family from its `model:` section and the
    tokenizer (the family module reads the section)."""
    arch = spec.get("arch", "idefics3")
    torch.manual_seed(spec.get("init_seed", 0))
    lm = None
    if spec.get("text_from"):
        lm = language_model_from(spec["text_from"], tok)
        spec = {**spec, "text": text_spec_of(lm.config)}
    model = family_of(arch).build(spec, tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    if spec.get("vision_from"):
        copy_vision(model, spec["vision_from"])
    if lm is not None:
        copy_language_model(model, lm, spec["text_from"])
    return model


def language_model_from(source_dir, tok):
    """A pretrained language model (`AutoModelForCausalLM`) for a student assembled the LLaVA way (the
    teacher's vision tower, a new projector, this LM): it must read the teacher's token ids, so its
    tokenizer, where the folder has one, must be the teacher's, and its vocabulary the tokenizer's size."""
    from transformers import AutoModelForCausalLM

    source_dir = Path(source_dir)
    if not (source_dir / "config.json").is_file():
        raise ModelError(f"text_from {source_dir}: not a model directory (no config.json)")
    if any((source_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        own = AutoTokenizer.from_pretrained(str(source_dir))
        if own.get_vocab() != tok.get_vocab():
            raise ModelError(f"text_from {source_dir}: its tokenizer is not the teacher's ({len(own)} vs {len(tok)} "
                             "tokens, or other ids): a student assembled from parts reads the cache's token ids, so "
                             "its language model must share the teacher's tokenizer")
    lm = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=torch.float32)
    if lm.config.vocab_size != len(tok):
        raise ModelError(f"text_from {source_dir}: its vocabulary has {lm.config.vocab_size} rows, the teacher's "
                         f"tokenizer {len(tok)} tokens; resize it to the tokenizer first")
    return lm


def text_spec_of(config) -> dict:
    """A recipe's `text:` section read off a language model's config (the student's LM is then that one)."""
    heads = config.num_attention_heads
    return {"hidden": config.hidden_size, "layers": config.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "intermediate": config.intermediate_size, "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "tie_embeddings": bool(config.tie_word_embeddings)}


def copy_language_model(model, lm, source_dir) -> None:
    """The student's language model and LM head from `lm`'s weights; the architectures must match (a
    Llama LM for the Idefics3 and LLaVA families, a Qwen2 LM for InternVL and LLaVA-OneVision, ...)."""
    target = text_model(model)
    src = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    want = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in src.state_dict().items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:4]
        raise ModelError(f"text_from {source_dir}: its {type(src).__name__} differs from the family's language model "
                         f"{type(target).__name__} (first differences: {diff}); use an LM of the family's architecture")
    target.load_state_dict(src.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())


def save_language_model(model, tok, out: str | Path) -> Path:
    """A VLM's language model and LM head saved as a causal LM (`AutoModelForCausalLM` of its text
    config, with the tokenizer): what `text_from` reads, so a language model pretrained inside a VLM
    (a text-only stage) starts students the way a real family's LLM does."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    try:
        lm = AutoModelForCausalLM.from_config(model.config.text_config)
    except ValueError as e:  # Qwen2-VL / 2.5 / 3's LLMs (multimodal rotary positions) have no text-only class
        raise ModelError(f"a {model.config.model_type} model's language model ({type(model.config.text_config).__name__}) "
                         "has no causal-LM class of its own in transformers, so it cannot be saved alone for "
                         "`text_from`; pretrain it inside the VLM (a text-only stage) and train the student from that "
                         "checkpoint (`model: {path: DIR}`)") from e
    src = text_model(model)
    target = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    target.load_state_dict(src.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    lm.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def copy_vision(model, source_dir) -> None:
    """Start from another model's vision tower (the teacher's), as LLaVA-KD's students share the
    teacher's vision encoder; the configs must match. `source_dir`: a model directory, or a cache's
    teacher folder (config + vision.safetensors: the tower's weights alone)."""
    source_dir = Path(source_dir)
    tower = source_dir / "vision.safetensors"
    if tower.is_file():
        from safetensors.torch import load_file

        state = load_file(str(tower))
    else:
        src, _ = load_model(source_dir)
        state = parts_of(src)["vision"].state_dict()
    fam = family_of(model.config.model_type)
    # the connectors' output width is the language model's: they are not copied with the tower
    inner = tuple(c[len(fam.vision) + 1:] + "." for c in (fam.connector, *fam.more_connectors)
                  if fam.connector_in_vision)
    if inner:
        state = {k: v for k, v in state.items() if not k.startswith(inner)}
    target = parts_of(model)["vision"].state_dict()
    want = {k: tuple(v.shape) for k, v in target.items() if not (inner and k.startswith(inner))}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:4]
        raise ModelError(f"vision_from {source_dir}: its vision tower differs from the recipe's (tensor names and "
                         f"shapes, first differences: {diff}); make the recipe's vision section equal the teacher's")
    parts_of(model)["vision"].load_state_dict(state, strict=not inner)


def processor_path(config, tok) -> bool:
    """Whether a model's ids, label masks and pixels come from its own processor and chat template:
    always for a processor family; for a demo family (Idefics3, LLaVA) unless its tokenizer carries
    vlmkd's own chat template (the demo's models, saved with it) or none at all (vlmkd's template is
    then the only one there is), so a real SmolVLM or LLaVA-1.5 checkpoint is scored on the prompt
    format and pixels it was trained on."""
    fam = family_of(config.model_type)
    own = tok.chat_template is not None and tok.chat_template not in DEMO_TEMPLATES
    return fam.own_processor or (fam.demo_template and own)


def layout_of(config, tok, processor=None) -> Layout:
    """The data path's view of a model (`Layout`); on the processor path it needs its processor (the
    checkpoint's, or the one a model of it is saved with when none is given)."""
    fam = family_of(config.model_type)
    if not processor_path(config, tok):
        return fam.layout(config, tok, None)
    return fam.layout(config, tok, processor or fam.processor(config, tok))


def save_model(model, tok, out: str | Path, state_dict: dict | None = None, processor=None) -> Path:
    """Weights (safetensors), config, tokenizer and the family's processor config (`processor`: the one
    the model was trained with, e.g. its teacher's; else the family's default for the config).
    `state_dict`: the full weights when the model itself is sharded (FSDP)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)
    fam = family_of(model.config.model_type)
    if fam.after_save is not None:
        fam.after_save(out)
    tok.save_pretrained(str(out))
    (processor or (model_processor(model, tok) if processor_path(model.config, tok) else fam.processor(model.config, tok))
     ).save_pretrained(str(out))
    return out


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


def saved_processor(path) -> object | None:
    """The processor saved in a model directory (`AutoProcessor`, as the checkpoint ships it), or None."""
    from transformers import AutoProcessor

    if not path or not any((Path(path) / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        return None
    model_type = AutoConfig.from_pretrained(str(path)).model_type
    if family_of(model_type).needs_torchvision:
        need_torchvision(model_type)
    return AutoProcessor.from_pretrained(str(path))


def attach_processor(model, processor) -> None:
    """Give a model the processor it is trained and saved with (a student built from a recipe takes
    its teacher's, so both see the same visual tokens)."""
    model._vlmkd_processor = processor


def model_processor(model, tok):
    """A processor family's processor: the one attached (`attach_processor`), else the one saved with
    the model, else the family's default for its config."""
    proc = getattr(model, "_vlmkd_processor", None) or saved_processor(getattr(model, "name_or_path", "") or "")
    return proc or family_of(model.config.model_type).processor(model.config, tok)


def data_tokenizer(model, tok) -> tuple[Tokenizer | ProcessorEncoder, Layout]:
    """The data path's tokenizer and layout for a model: vlmkd's template for the demo families, the
    checkpoint's own processor and chat template for processor families."""
    proc = model_processor(model, tok) if processor_path(model.config, tok) else None
    return config_data_tokenizer(model.config, tok, proc)


def config_data_tokenizer(config, tok, processor=None) -> tuple[Tokenizer | ProcessorEncoder | PrefixEncoder, Layout]:
    """`data_tokenizer` from a config alone (an engine that loads the weights itself: vLLM); a processor
    family takes `processor` (the checkpoint's), else its default."""
    lay = layout_of(config, tok, processor)
    if lay.processor is not None:
        cls = PrefixEncoder if lay.prefix_lm else ProcessorEncoder
        return cls(lay.processor, lay.visual, lay.image_token_id, lay.max_length), lay
    return Tokenizer(tok, lay.image_block, lay.image_token_id, lay.max_length), lay
