"""The one place that knows where a VLM's parts live (vision tower, connector, language model, LM
head) for each supported layout; everything else asks here."""

from __future__ import annotations

import torch


def part_names(model_type: str) -> tuple[str, str, str]:
    """(vision tower, connector, language model): their attribute names under the model's `.model`,
    which are also their names in a saved checkpoint (`model.NAME.…`)."""
    if model_type == "idefics3":
        return "vision_model", "connector", "text_model"
    return "vision_tower", "multi_modal_projector", "language_model"


def _names(model) -> tuple[str, str, str]:
    return part_names(model.config.model_type)


def vision_tower(model) -> torch.nn.Module:
    return getattr(model.model, _names(model)[0])


def connector(model) -> torch.nn.Module:
    return getattr(model.model, _names(model)[1])


def text_model(model) -> torch.nn.Module:
    return getattr(model.model, _names(model)[2])


def parts_of(model) -> dict[str, torch.nn.Module]:
    """The three trainable groups of a VLM: vision tower, projector (connector), LLM (with LM head)."""
    return {"vision": vision_tower(model), "projector": connector(model),
            "llm": torch.nn.ModuleList([text_model(model), model.lm_head])}
