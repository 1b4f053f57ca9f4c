"""Which samples a recipe stage takes: by a manifest field (`data` names a value of `data_field`,
default `kind`), and by a pattern on the first prompt (`prompt_regex`). Kinds are data: the shapes
generator writes `kind: questions` / `kind: captions` on its rows; other people's rows carry whatever
field they have (LLaVA's pre-training and instruction files can be told apart by a field the user
adds, or by a pattern). A row without the field is taken by every stage.
"""

from __future__ import annotations

import re

from vlmkd.data.shapes import legacy_kind
from vlmkd.errors import CacheError


def accepts(data: str, data_field: str, prompt_regex: str | None, fields: dict | None, prompt: str,
            where: str = "") -> bool:
    """Whether one sample (its manifest fields and first prompt) belongs to a stage's data. `fields`
    None means a cache written before samples kept their fields: its shapes `kind` is read back from
    the prompt as vlmkd chose stages then (`shapes.legacy_kind`); another field is refused."""
    if data != "all":
        if fields is None:
            if data_field != "kind":
                raise CacheError(f"{where}: the stage selects by the samples' {data_field!r} field, and this cache "
                                 "predates per-sample fields: rebuild it with `vlmkd cache-teacher`")
            fields = {"kind": legacy_kind(prompt)}
        value = fields.get(data_field)
        if value is not None and str(value) != data:
            return False
    return prompt_regex is None or re.search(prompt_regex, prompt) is not None


def lacks_field(data: str, data_field: str, fields: dict | None) -> bool:
    """A sample a field-selecting stage takes only because it has no such field (counted and said)."""
    return data != "all" and fields is not None and fields.get(data_field) is None
