"""Readers for the conversation manifests people have, recognised by content (not by file suffix):

- LLaVA: `conversations` of `{"from", "value"}` turns, an `image` path (or a list of them);
- ShareGPT / OpenAI style: `conversations` or `messages` of `{"role", "content"}` turns, where
  `content` is a string or a list of parts (`{"type": "text", "text"}`, `{"type": "image"}`);
- LLaMA-Factory: `messages` + `images` (its sharegpt format), and alpaca rows (`instruction`, `input`,
  `output`, optional `system`, `history`, `images`); its `dataset_info.json` beside the file, when it
  names the file, maps other column and role names onto these.

A file is a JSON list or JSONL (one object per line), UTF-8 with or without a BOM (UTF-16 with its
BOM too). A row without an `id` gets one derived from its content (stable across runs and machines;
`Sample.id_derived` says so). A malformed row never stops the reader: it comes back as a `Reject`
naming the file, the row and the reason, so the job can record it and go on (or fail under --strict).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlmkd.errors import DataError

HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "model", "bot"}
SYSTEM_ROLES = {"system"}
IMAGE_PLACEHOLDER = "<image>"
NEWLINE = b"\n"
URL_SCHEMES = ("http://", "https://", "s3://", "gs://", "hf://", "ftp://")


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant" | "system"
    text: str


@dataclass(frozen=True)
class Sample:
    id: str
    images: tuple[Path, ...]
    turns: tuple[Turn, ...]
    extra: dict = field(default_factory=dict, compare=False)  # the row's other fields (kind, type, rejected, ...)
    id_derived: bool = False  # the row had no id: `id` is a hash of its content

    @property
    def image(self) -> Path | None:
        """The sample's one image (None for a text-only sample); several are refused where a model
        takes one (`vlmkd.data.dataset`)."""
        return self.images[0] if self.images else None

    @property
    def question(self) -> str:
        """The first user turn without the image placeholder (what a stage's prompt pattern reads)."""
        first = next(t.text for t in self.turns if t.role == "user")
        return first.replace(IMAGE_PLACEHOLDER, "").strip()

    @property
    def answer(self) -> str:
        return next(t.text for t in self.turns if t.role == "assistant")

    def exchanges(self) -> list[tuple[int, str]]:
        """(turn index, reference text) of every assistant turn: what eval scores, each answer against
        the conversation up to it."""
        return [(i, t.text) for i, t in enumerate(self.turns) if t.role == "assistant"]


@dataclass(frozen=True)
class Reject:
    sample_id: str
    source: str  # file (and row) the sample came from
    reason: str


@dataclass(frozen=True)
class Columns:
    """Where a row keeps each part (LLaMA-Factory's `dataset_info.json` "columns" and "tags")."""

    messages: tuple[str, ...] = ("conversations", "messages")
    images: tuple[str, ...] = ("images", "image")
    prompt: str = "instruction"
    query: str = "input"
    response: str = "output"
    system: str = "system"
    history: str = "history"
    role_tag: tuple[str, ...] = ("from", "role")
    content_tag: tuple[str, ...] = ("value", "content")
    user_tag: tuple[str, ...] = ()
    assistant_tag: tuple[str, ...] = ()
    system_tag: tuple[str, ...] = ()


def columns_for(path: Path) -> Columns:
    """The column mapping of `dataset_info.json` beside `path` when an entry names this file."""
    info = path.parent / "dataset_info.json"
    if not info.is_file():
        return Columns()
    try:
        entries = json.loads(_text(info.read_bytes(), info))
    except json.JSONDecodeError as e:
        raise DataError(f"{info}: not valid JSON ({e.msg}); fix it or move it away from {path.name}") from e
    for entry in entries.values() if isinstance(entries, dict) else ():
        if isinstance(entry, dict) and entry.get("file_name") == path.name:
            cols, tags = entry.get("columns") or {}, entry.get("tags") or {}
            one = lambda v: (v,) if isinstance(v, str) else None  # noqa: E731
            kw = {}
            for key in ("messages", "images"):
                if key in cols:
                    kw[key] = one(cols[key])
            for key in ("prompt", "query", "response", "system", "history"):
                if key in cols:
                    kw[key] = cols[key]
            for key in ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag"):
                if key in tags:
                    kw[key] = one(tags[key])
            if None in kw.values():
                raise DataError(f"{info}: entry for {path.name}: column and tag names must be strings")
            return Columns(**kw)
    return Columns()


def _first(row: dict, keys: tuple[str, ...]):
    return next((row[k] for k in keys if k in row), None)


def _role(name: object, cols: Columns, where: str) -> str:
    if not isinstance(name, str):
        raise DataError(f"{where}: a turn's role must be a string, got {type(name).__name__}")
    if name in cols.user_tag:
        return "user"
    if name in cols.assistant_tag:
        return "assistant"
    if name in cols.system_tag:
        return "system"
    who = name.lower()
    if who in HUMAN_ROLES:
        return "user"
    if who in ASSISTANT_ROLES:
        return "assistant"
    if who in SYSTEM_ROLES:
        return "system"
    raise DataError(f"{where}: unknown role {name!r} (user: human/user; assistant: gpt/assistant/model; system)")


def _content(value: object, where: str) -> tuple[str, list]:
    """A turn's text (image parts become `<image>`), and the image references its parts carry."""
    if isinstance(value, str):
        return value, []
    if not isinstance(value, list):
        raise DataError(f"{where}: content must be a string or a list of parts, got {type(value).__name__}")
    text, refs = [], []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif kind in ("image", "image_url"):
            text.append(IMAGE_PLACEHOLDER)
            ref = part.get("image", part.get("path", part.get("url", part.get("image_url"))))
            if isinstance(ref, dict):
                ref = ref.get("url")
            if ref is not None:
                refs.append(ref)
        else:
            raise DataError(f"{where}: a content part must be {{'type': 'text', 'text': ...}} or "
                            f"{{'type': 'image'}}, got {json.dumps(part)[:80]}")
    return "".join(text), refs


def _turns(row: dict, cols: Columns, where: str, prompts: bool = False) -> tuple[list[Turn], list]:
    """Turns of a conversation row or an alpaca row, and any images named inside the turns; with
    `prompts`, an alpaca row may lack its output (a prompt to answer)."""
    convs = _first(row, cols.messages)
    refs: list = []
    if convs is None and cols.prompt in row:  # alpaca: instruction (+ input) -> output, after its history
        prompt, query, answer = row.get(cols.prompt), row.get(cols.query) or "", row.get(cols.response)
        if prompts and answer is None:
            answer = ""
        if not isinstance(prompt, str) or not isinstance(query, str) or not isinstance(answer, str):
            raise DataError(f"{where}: alpaca fields {cols.prompt!r}, {cols.query!r} and {cols.response!r} "
                            "must be strings")
        turns = []
        if isinstance(row.get(cols.system), str) and row[cols.system]:
            turns.append(Turn("system", row[cols.system]))
        history = row.get(cols.history) or []
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2
                                                    and all(isinstance(x, str) for x in h) for h in history):
            raise DataError(f"{where}: {cols.history!r} must be a list of [question, answer] string pairs")
        for q, a in history:
            turns += [Turn("user", q), Turn("assistant", a)]
        turns.append(Turn("user", "\n".join(x for x in (prompt, query) if x)))
        if answer:
            turns.append(Turn("assistant", answer))
        return turns, refs
    if not isinstance(convs, list) or not convs:
        names = " or ".join(f"'{m}'" for m in cols.messages)
        raise DataError(f"{where}: {names} must be a non-empty list of turns (or give alpaca "
                        f"'{cols.prompt}'/'{cols.response}' fields); the row has keys {sorted(row)[:8]}")
    turns = []
    if isinstance(row.get(cols.system), str) and row[cols.system]:
        turns.append(Turn("system", row[cols.system]))
    for j, c in enumerate(convs):
        role_key = next((k for k in cols.role_tag if isinstance(c, dict) and k in c), None)
        text_key = next((k for k in cols.content_tag if isinstance(c, dict) and k in c), None)
        if role_key is None or text_key is None:
            raise DataError(f"{where}: turn {j} needs a role ({'/'.join(cols.role_tag)}) and a content "
                            f"({'/'.join(cols.content_tag)}) field")
        text, r = _content(c[text_key], f"{where}: turn {j}")
        refs += r
        turns.append(Turn(_role(c[role_key], cols, f"{where}: turn {j}"), text))
    return turns, refs


def _image_path(ref: object, root: Path, where: str) -> Path:
    if not isinstance(ref, str) or not ref:
        raise DataError(f"{where}: an image must be a non-empty path string, got {json.dumps(ref)[:60]}")
    if ref.startswith(URL_SCHEMES) or ref.startswith("data:"):
        raise DataError(f"{where}: image {ref[:80]!r} is a URL; vlmkd reads image files only: download the "
                        "images and name their paths (relative to the manifest, or absolute)")
    p = Path(ref)
    return p if p.is_absolute() else (root / p).resolve()


def derived_id(row: dict) -> str:
    """A stable id from a row's content (its canonical JSON), for rows that have none."""
    blob = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    return "row-" + hashlib.sha256(blob).hexdigest()[:16]


def _parse_row(row: object, where: str, root: Path, cols: Columns = Columns(), prompts: bool = False) -> Sample:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a sample must be a JSON object, got {type(row).__name__}")
    sid = row.get("id")
    derived = sid is None
    if derived:
        sid = derived_id(row)
    elif not isinstance(sid, (str, int)) or isinstance(sid, bool) or str(sid) == "":
        raise DataError(f"{where}: 'id' must be a non-empty string or integer, got {json.dumps(sid)[:40]}")
    sid = str(sid)
    where = f"{where} (sample {sid})"
    turns, inline = _turns(row, cols, where, prompts)
    if not prompts and not any(t.role == "assistant" and t.text.strip() for t in turns):
        raise DataError(f"{where}: no non-empty assistant turn to learn from")
    if not any(t.role == "user" for t in turns):
        raise DataError(f"{where}: no user turn")
    key = next((k for k in cols.images if k in row), None)
    named = row[key] if key is not None else []
    if named is None:
        named = []
    named = [named] if isinstance(named, str) else named
    if not isinstance(named, list):
        raise DataError(f"{where}: '{key}' must be a path or a list of paths")
    refs = named + inline if named else inline
    paths = tuple(_image_path(r, root, where) for r in refs)
    n_tags = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if n_tags and not paths:
        raise DataError(f"{where}: text has {n_tags} {IMAGE_PLACEHOLDER} tag(s) but the sample has no 'image'")
    if paths and n_tags == 0:  # LLaVA's convention: the images go before the first user turn
        k = next(i for i, t in enumerate(turns) if t.role == "user")
        turns[k] = Turn("user", IMAGE_PLACEHOLDER * len(paths) + "\n" + turns[k].text)
    elif paths and n_tags != len(paths):
        raise DataError(f"{where}: {n_tags} {IMAGE_PLACEHOLDER} tags for {len(paths)} image(s); give one tag per "
                        "image, or none (then they go before the first question)")
    skip = {"id", key, *cols.messages, cols.prompt, cols.query, cols.response, cols.history, cols.system}
    extra = {k: v for k, v in row.items() if k not in skip}
    return Sample(sid, paths, tuple(turns), extra, derived)


def _text(raw: bytes, path: Path, line: int | None = None) -> str:
    """UTF-8 text (a BOM stripped; UTF-16 read by its BOM); anything else named with the fix."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    elif raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: a UTF-16 byte-order mark, then bytes that are not UTF-16 ({e.reason})") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        at = f"line {line if line is not None else raw[: e.start].count(NEWLINE) + 1}"
        raise DataError(f"{path}: {at} is not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); re-save the "
                        "file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from e


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """(location, parsed row) pairs; a row that is not JSON (or not UTF-8) comes back as a DataError.
    A file whose first character is `[` is a JSON list; otherwise JSONL."""
    raw = path.read_bytes()
    head = raw[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or head.startswith(b"["):
        text = _text(raw, path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not a valid JSON list ({e.msg} at line {e.lineno}); expected a list of "
                            "samples, or JSONL (one object per line)") from e
        if not isinstance(data, list):  # a UTF-16 file may hold JSONL too
            data = None
        if data is not None:
            for i, row in enumerate(data):
                yield f"{path}[{i}]", row
            return
        lines = [(n, ln.encode()) for n, ln in enumerate(text.splitlines(), 1)]
    else:
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        lines = list(enumerate(raw.splitlines(), 1))
    for lineno, line in lines:
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(_text(line, path, lineno))
        except DataError as e:
            yield where, e
        except json.JSONDecodeError as e:
            hint = (" (a pretty-printed JSON object? a manifest is a JSON list, or one object per line)"
                    if lineno == 1 and line.strip() in (b"{", "{") else "")
            yield where, DataError(f"{where}: not valid JSON ({e.msg}){hint}")


def read_manifest(path: str | Path, prompts: bool = False) -> Iterator[Sample | Reject]:
    """Samples of a manifest in file order; bad rows come back as `Reject`s (one per row, always).
    With `prompts`, a row needs no answer (the prompts `vlmkd generate` answers)."""
    for _, sample in read_rows(path, prompts):
        yield sample


def read_rows(path: str | Path, prompts: bool = False) -> Iterator[tuple[object, Sample | Reject]]:
    """(the row as the file holds it, its Sample or Reject), for writers that keep a row's own format."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    root = path.parent
    cols = columns_for(path)
    seen: dict[str, str] = {}
    for where, row in _rows(path):
        sid = str(row.get("id", "?")) if isinstance(row, dict) else "?"
        try:
            if isinstance(row, DataError):
                raise row
            sample = _parse_row(row, where, root, cols, prompts)
            sid = sample.id
            if sample.id in seen:
                same = " (its content repeats that row: the id was derived from it)" if sample.id_derived else ""
                raise DataError(f"{where}: duplicate sample id {sample.id!r}, first at {seen[sample.id]}{same}")
            seen[sample.id] = where
            yield row, sample
        except DataError as e:
            yield row, Reject(sid, where, str(e))


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


def describe(samples: list[Sample], rejects: list[Reject]) -> str:
    """One line of counts that add up: rows = samples + rejects, and what kinds of samples."""
    text_only = sum(1 for s in samples if not s.images)
    derived = sum(1 for s in samples if s.id_derived)
    parts = [f"{len(samples) + len(rejects)} rows = {len(samples)} samples + {len(rejects)} rejected"]
    if text_only:
        parts.append(f"{text_only} text-only")
    if derived:
        parts.append(f"{derived} ids derived from content")
    return "; ".join(parts)
