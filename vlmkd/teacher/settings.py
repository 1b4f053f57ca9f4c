"""Extraction settings from a recipe's `cache:` section, with command-line overrides."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from vlmkd.errors import RecipeError
from vlmkd.teacher.hf_backend import Extraction


def extraction_from(recipe: Path | None = None, **overrides) -> Extraction:
    raw = {}
    if recipe is not None:
        if not Path(recipe).is_file():
            raise RecipeError(f"recipe {recipe} does not exist")
        raw = (yaml.safe_load(Path(recipe).read_text()) or {}).get("cache", {}) or {}
    names = {f.name for f in fields(Extraction)}
    unknown = set(raw) - names
    if unknown:
        raise RecipeError(f"{recipe}: unknown cache setting(s) {sorted(unknown)}; known: {sorted(names)}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return Extraction(**raw)
