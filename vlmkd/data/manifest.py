"""Readers for LLaVA conversation manifests (JSON list or JSONL), images relative to the manifest.

A malformed row never stops the reader: it comes back as a `Reject` naming the row and the reason, so
the job can record it and go on (or fail under --strict).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlmkd.errors import DataError

HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}
SYSTEM_ROLES = {"system"}
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant" | "system"
    text: str


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path | None
    turns: tuple[Turn, ...]
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def question(self) -> str:
        """The first user turn without the image placeholder (used to score and to type questions)."""
        first = next(t.text for t in self.turns if t.role == "user")
        return first.replace(IMAGE_PLACEHOLDER, "").strip()

    @property
    def answer(self) -> str:
        return next(t.text for t in self.turns if t.role == "assistant")


@dataclass(frozen=True)
class Reject:
    sample_id: str
    source: str  # file (and row) the sample came from
    reason: str


def _parse_row(row: object, where: str, root: Path) -> Sample:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a sample must be a JSON object, got {type(row).__name__}")
    sid = row.get("id")
    if not isinstance(sid, (str, int)) or str(sid) == "":
        raise DataError(f"{where}: missing or empty 'id'")
    sid = str(sid)
    convs = row.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where} (sample {sid}): 'conversations' must be a non-empty list")
    turns = []
    for j, c in enumerate(convs):
        if not isinstance(c, dict) or not isinstance(c.get("from"), str) or not isinstance(c.get("value"), str):
            raise DataError(f"{where} (sample {sid}): turn {j} needs string fields 'from' and 'value'")
        who = c["from"].lower()
        if who in HUMAN_ROLES:
            role = "user"
        elif who in ASSISTANT_ROLES:
            role = "assistant"
        elif who in SYSTEM_ROLES:
            role = "system"
        else:
            raise DataError(f"{where} (sample {sid}): turn {j} has unknown role {c['from']!r}")
        turns.append(Turn(role, c["value"]))
    if not any(t.role == "assistant" and t.text.strip() for t in turns):
        raise DataError(f"{where} (sample {sid}): no non-empty assistant turn to learn from")
    if not any(t.role == "user" for t in turns):
        raise DataError(f"{where} (sample {sid}): no user turn")
    image = row.get("image")
    n_placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if image is None:
        if n_placeholders:
            raise DataError(f"{where} (sample {sid}): text has {IMAGE_PLACEHOLDER} but the sample has no 'image'")
        path = None
    else:
        if not isinstance(image, str) or not image:
            raise DataError(f"{where} (sample {sid}): 'image' must be a non-empty path string")
        if n_placeholders > 1:
            raise DataError(f"{where} (sample {sid}): {n_placeholders} {IMAGE_PLACEHOLDER} tags; one image per sample")
        if n_placeholders == 0:  # LLaVA convention: the image goes before the first user turn
            k = next(i for i, t in enumerate(turns) if t.role == "user")
            turns[k] = Turn("user", f"{IMAGE_PLACEHOLDER}\n{turns[k].text}")
        path = (root / image).resolve() if not Path(image).is_absolute() else Path(image)
    extra = {k: v for k, v in row.items() if k not in ("id", "image", "conversations")}
    return Sample(sid, path, tuple(turns), extra)


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """(location, parsed row) pairs; a row that is not JSON comes back as a DataError."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, DataError(f"{where}: not valid JSON ({e.msg})")
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a valid JSON manifest ({e}); expected a list of LLaVA samples") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON manifest must be a list of samples (use .jsonl for one per line)")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def read_manifest(path: str | Path) -> Iterator[Sample | Reject]:
    """Samples of a LLaVA JSON / JSONL manifest, in file order; bad rows come back as `Reject`s."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    root = path.parent
    seen: set[str] = set()
    for where, row in _rows(path):
        sid = str(row.get("id", "?")) if isinstance(row, dict) else "?"
        try:
            if isinstance(row, DataError):
                raise row
            sample = _parse_row(row, where, root)
            if sample.id in seen:
                raise DataError(f"{where}: duplicate sample id {sample.id!r}")
            seen.add(sample.id)
            yield sample
        except DataError as e:
            yield Reject(sid, where, str(e))


def load_samples(path: str | Path, strict: bool = False) -> tuple[list[Sample], list[Reject]]:
    """All samples of a manifest; with strict, the first reject raises."""
    samples, rejects = [], []
    for item in read_manifest(path):
        if isinstance(item, Reject):
            if strict:
                raise DataError(item.reason)
            rejects.append(item)
        else:
            samples.append(item)
    return samples, rejects
