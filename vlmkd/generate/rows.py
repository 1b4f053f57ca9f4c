"""Writing a generated answer into a manifest row in the row's own format.

The row keeps its schema (LLaVA `conversations` of from/value, ShareGPT/OpenAI `messages` of
role/content, LLaMA-Factory's alpaca `output`, its own column names from `dataset_info.json`): the
conversation is cut after its last user turn and the answer appended as an assistant turn named the
way the row names it. Relative image paths are rewritten relative to the output file's folder, so the
written manifest finds the same images from wherever it lies.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from vlmkd.data.manifest import Columns, _first, _role

_ASSISTANT_FOR = {"human": "gpt", "user": "assistant"}
_IMAGE_KEYS = ("image", "path", "url", "image_url")


def answered_row(raw: dict, cols: Columns, answer: str, new_id: str, src_root: Path, dst_root: Path) -> dict:
    """A copy of `raw` whose final answer is `answer` and whose id is `new_id`. A `rejected` answer of
    the input row is dropped: it was the wrong answer to the data set's answer, not to this one."""
    row = copy.deepcopy(raw)
    row.pop("rejected", None)
    conv = _conversation(row, cols)
    if conv is None:  # alpaca: the output column holds the answer
        row[cols.response] = answer
    else:
        key, convs, role_key, text_key, roles, last_user = conv
        name = _assistant_name(convs, roles, role_key, cols)
        old = convs[last_user + 1] if last_user + 1 < len(convs) else None
        content = [{"type": "text", "text": answer}] if old and isinstance(old[text_key], list) else answer
        row[key] = convs[: last_user + 1] + [{role_key: name, text_key: content}]
    row["id"] = new_id
    _rebase_images(row, cols, src_root, dst_root)
    return row


def rebased_row(raw: dict, cols: Columns, src_root: Path, dst_root: Path) -> dict:
    """A copy of `raw` as it is, its relative image paths re-pointed from `dst_root`."""
    row = copy.deepcopy(raw)
    _rebase_images(row, cols, src_root, dst_root)
    return row


def replaced_answer(raw: dict, cols: Columns) -> str | None:
    """The answer the data set gave for the prompt (the assistant turn after the last user turn)."""
    conv = _conversation(raw, cols)
    if conv is None:
        return raw.get(cols.response) or None
    _, convs, _, text_key, _, last_user = conv
    if last_user + 1 >= len(convs):
        return None
    value = convs[last_user + 1][text_key]
    return value if isinstance(value, str) else "".join(p.get("text", "") for p in value if isinstance(p, dict))


def _conversation(row: dict, cols: Columns):
    """(its key, the turns, their role and content keys, each turn's role, the last user turn's index)
    of a conversation row; None for an alpaca row."""
    convs = _first(row, cols.messages)
    if convs is None:
        return None
    key = next(k for k in cols.messages if k in row)
    role_key = next(k for k in cols.role_tag if k in convs[0])
    text_key = next(k for k in cols.content_tag if k in convs[0])
    roles = [_role(t[role_key], cols, "row") for t in convs]
    return key, convs, role_key, text_key, roles, max(i for i, r in enumerate(roles) if r == "user")


def _assistant_name(convs: list, roles: list[str], role_key: str, cols: Columns) -> str:
    """The row's own word for the assistant: one of its turns', its tag, or the pair of its user word."""
    for t, r in zip(convs, roles, strict=True):
        if r == "assistant":
            return t[role_key]
    if cols.assistant_tag:
        return cols.assistant_tag[0]
    user = next(t[role_key] for t, r in zip(convs, roles, strict=True) if r == "user")
    return _ASSISTANT_FOR.get(str(user).lower(), "assistant")


def _rebase(ref, src_root: Path, dst_root: Path):
    if not isinstance(ref, str) or not ref or Path(ref).is_absolute():
        return ref
    return os.path.relpath((src_root / ref).resolve(), dst_root.resolve())


def _rebase_images(row: dict, cols: Columns, src_root: Path, dst_root: Path) -> None:
    if src_root.resolve() == dst_root.resolve():
        return
    key = next((k for k in cols.images if k in row), None)
    if key is not None:
        named = row[key]
        row[key] = ([_rebase(r, src_root, dst_root) for r in named] if isinstance(named, list)
                    else _rebase(named, src_root, dst_root))
    for turn in _first(row, cols.messages) or []:
        for part in (v for v in turn.values() if isinstance(v, list)):
            for p in part:
                if isinstance(p, dict) and p.get("type") in ("image", "image_url"):
                    for k in _IMAGE_KEYS:
                        if isinstance(p.get(k), dict) and "url" in p[k]:
                            p[k]["url"] = _rebase(p[k]["url"], src_root, dst_root)
                        elif k in p:
                            p[k] = _rebase(p[k], src_root, dst_root)
