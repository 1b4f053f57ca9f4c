"""The rejects file: every sample a job skipped, with the reason, one JSON object per line."""

from __future__ import annotations

import json
from pathlib import Path

from vlmkd.data.manifest import Reject


class RejectLog:
    """Appends rejects to `path` as JSONL and counts them; `--strict` callers raise instead."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.count = 0
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()  # present even when empty: "no rejects" is an answer too

    def add(self, reject: Reject) -> None:
        self.count += 1
        if self.path:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"id": reject.sample_id, "source": reject.source, "reason": reject.reason}) + "\n")

    def summary(self) -> str:
        where = f" (see {self.path})" if self.path and self.count else ""
        return f"{self.count} sample(s) rejected{where}"
