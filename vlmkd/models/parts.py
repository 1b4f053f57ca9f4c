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
    if not fam.more_connectors and not fam.connector_params:
        return main
    held = [_Held({p: getattr(model.model, p) for p in fam.connector_params})] if fam.connector_params else []
    return torch.nn.ModuleList([main, *(attr_path(model.model, p) for p in fam.more_connectors), *held])


class _Held(torch.nn.Module):
    """Parameters a family keeps on the model itself (LLaVA-NeXT's `image_newline`), held by a module so
    that the projector part owns them (the same tensors: training the part trains them)."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        super().__init__()
        for name, p in params.items():
            self.register_parameter(name, p)


def text_model(model) -> torch.nn.Module:
    return attr_path(model.model, part_names(model.config.model_type)[2])


def parts_of(model) -> dict[str, torch.nn.Module]:
    """The three trainable groups of a VLM: vision tower, projector (connector), LLM (with LM head).
    Where the connector sits inside the tower's module (Qwen's merger), `vision` includes it: freezing
    the tower and training the projector (LLaVA-KD's DPT) works, since the groups are set in this order."""
    return {"vision": vision_tower(model), "projector": connector(model),
            "llm": torch.nn.ModuleList([text_model(model), model.lm_head])}
