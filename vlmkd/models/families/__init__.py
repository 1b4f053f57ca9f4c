"""The model-family layer: one module per family holds everything vlmkd must know about it (where its
parts are, what its forward takes, where its visual tokens sit, how its processor and a model of it
are built and saved), and nothing of it is anywhere else. Adding a family is one module here, listed
in `FAMILIES`, and its test.
"""

from __future__ import annotations

from vlmkd.errors import ModelError
from vlmkd.models.families.base import Family
from vlmkd.models.families.gemma3 import FAMILY as GEMMA3
from vlmkd.models.families.idefics3 import FAMILY as IDEFICS3
from vlmkd.models.families.internvl import FAMILY as INTERNVL
from vlmkd.models.families.llava import FAMILY as LLAVA
from vlmkd.models.families.llava_next import LLAVA_NEXT, LLAVA_ONEVISION
from vlmkd.models.families.mistral3 import FAMILY as MISTRAL3
from vlmkd.models.families.paligemma import FAMILY as PALIGEMMA
from vlmkd.models.families.qwen2_vl import QWEN2_5_VL, QWEN2_VL
from vlmkd.models.families.qwen3_vl import FAMILY as QWEN3_VL
from vlmkd.models.families.smolvlm import FAMILY as SMOLVLM

FAMILIES: tuple[Family, ...] = (IDEFICS3, LLAVA, QWEN2_VL, QWEN2_5_VL, QWEN3_VL, GEMMA3, INTERNVL, LLAVA_NEXT, LLAVA_ONEVISION, SMOLVLM, MISTRAL3, PALIGEMMA)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported() -> list[str]:
    return sorted(_BY_TYPE)


def family_of(model_type: str) -> Family:
    """The family of a config's `model_type`; an unknown one is refused naming it and the list."""
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise ModelError(f"model type {model_type!r} is not supported (supported: {', '.join(supported())}); "
                         "a family is one module under vlmkd/models/families/") from None


__all__ = ["FAMILIES", "Family", "family_of", "supported"]
