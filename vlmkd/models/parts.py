"""Where a VLM's parts live (vision tower, connector, language model, LM head): asked of its family
(`vlmkd.models.families`), so everything else reads them here."""

from __future__ import annotations

import torch

from vlmkd.models.families import family_of
from vlmkd.models.families.base import attr_path


def part_names(model_type: str) -> tuple[str, str, str]:
    """(vision tower, connector, language model): their dotted paths under the model's `.model`,
    which are also their names in a saved checkpoint (`model.PATH.…`)."""
    fam = family_of(model_type)
    return fam.vision, fam.connector, fam.text


def vision_tower(model) -> torch.nn.Module:
    return attr_path(model.model, part_names(model.config.model_type)[0])


def connector(model) -> torch.nn.Module:
    """The connector; with a family's further connectors (Qwen3-VL's DeepStack mergers), all of them."""
    fam = family_of(model.config.model_type)
    main = attr_path(model.model, fam.connector)
    if not fam.more_connectors:
        return main
    return torch.nn.ModuleList([main, *(attr_path(model.model, p) for p in fam.more_connectors)])


def visual_tokens_module(model) -> torch.nn.Module:
    """The module whose output is the visual tokens as the language model receives them."""
    fam = family_of(model.config.model_type)
    return attr_path(model.model, fam.visual_tokens_from or fam.connector)


def text_model(model) -> torch.nn.Module:
    return attr_path(model.model, part_names(model.config.model_type)[2])


def parts_of(model) -> dict[str, torch.nn.Module]:
    """The three trainable groups of a VLM: vision tower, projector (connector), LLM (with LM head).
    Where the connector sits inside the tower's module (Qwen's merger), `vision` includes it: freezing
    the tower and training the projector (LLaVA-KD's DPT) works, since the groups are set in this order."""
    return {"vision": vision_tower(model), "projector": connector(model),
            "llm": torch.nn.ModuleList([text_model(model), model.lm_head])}
