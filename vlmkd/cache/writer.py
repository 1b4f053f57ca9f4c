"""Atomic shard writing: a tar under a temporary name, fsync, rename; its record goes to the manifest
only after the rename, so a reader never sees a shard that is not complete and checksummed."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from vlmkd.cache import format as fmt
from vlmkd.cache.manifest import fsync_dir

TMP_SUFFIX = ".tmp"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """Deterministic headers (no time, owner or host details), so equal inputs give equal bytes."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> tuple[int, str, dict[str, int]]:
    """Write (key, {payload: bytes}) samples as one tar; returns (bytes, sha256, bytes per payload)."""
    buf = io.BytesIO()
    payload_bytes: dict[str, int] = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for payload, blob in members.items():
                name = fmt.member_name(key, payload)
                tar.addfile(_tarinfo(name, len(blob)), io.BytesIO(blob))
                payload_bytes[payload] = payload_bytes.get(payload, 0) + len(blob)
    data = buf.getvalue()
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return len(data), hashlib.sha256(data).hexdigest(), payload_bytes


def remove_temporaries(folder: Path) -> int:
    """Half-written shards or manifests of a killed job; they are never read, only removed."""
    n = 0
    for p in folder.glob(f"*{TMP_SUFFIX}"):
        p.unlink()
        n += 1
    return n
