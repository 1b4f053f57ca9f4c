"""Where a cache's files live: a local folder, or any fsspec URL (`memory://`, `file://`, `s3://`, `gs://`
with their fsspec packages). The one way cache files are read, listed and written.

A write is whole or not at all, on every filesystem: the bytes go to NAME.tmp, then one rename (a
local folder: fsync, os.replace, fsync of the folder; fsspec: `pipe_file` of the whole object, then
`mv`, a server-side copy on object stores). A reader never opens a .tmp name, and the manifest, written
last, names only shards whose rename has happened, so a killed job leaves at most temporaries, which
the next run removes (`remove_temporaries`) before it resumes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from vlmkd.cache.atomic import TMP_SUFFIX, atomic_write
from vlmkd.errors import CacheError


def is_url(root: str | Path) -> bool:
    return "://" in str(root)


class Store:
    """A cache root. `name`s are relative paths inside it ("manifest.json", "teacher/config.json")."""

    def __init__(self, root: str | Path):
        self.root = str(root).rstrip("/") if is_url(root) else str(Path(root))
        self.local = None if is_url(root) else Path(root)
        self.fs = None
        if self.local is None:
            try:
                import fsspec
            except ImportError as e:
                raise CacheError(f"{self.root}: a cache at a URL needs fsspec (pip install fsspec)") from e
            try:
                self.fs, self._path = fsspec.core.url_to_fs(self.root)
            except (ImportError, ValueError) as e:
                raise CacheError(f"{self.root}: fsspec cannot open this URL ({e}); install the filesystem's "
                                 "package (s3fs, gcsfs, ...)") from e

    def __str__(self) -> str:
        return self.root

    def where(self, name: str) -> str:
        """The file's full name, for messages and for stock readers."""
        return f"{self.root}/{name}"

    def _p(self, name: str) -> str:
        return f"{self._path.rstrip('/')}/{name}"

    def makedirs(self) -> None:
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
        else:
            self.fs.makedirs(self._path, exist_ok=True)

    def exists(self, name: str) -> bool:
        return (self.local / name).is_file() if self.local is not None else self.fs.isfile(self._p(name))

    def read(self, name: str) -> bytes:
        if self.local is not None:
            path = self.local / name
            if not path.is_file():
                raise CacheError(f"{path} is missing")
            return path.read_bytes()
        try:
            return self.fs.cat_file(self._p(name))
        except FileNotFoundError as e:
            raise CacheError(f"{self.where(name)} is missing") from e

    def write(self, name: str, data: bytes) -> None:
        """`data` under `name`, or nothing there at all (see the module docstring)."""
        if self.local is not None:
            (self.local / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.local / name, data)
            return
        tmp = self._p(name + TMP_SUFFIX)
        parent = self._p(name).rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, self._p(name))

    def names(self, pattern: str) -> list[str]:
        """Names matching a glob pattern at the root (sorted)."""
        if self.local is not None:
            return sorted(p.name for p in self.local.glob(pattern))
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.glob(self._p(pattern)))

    def files(self) -> list[str]:
        """Every file under the root, as names (sorted; temporaries left out)."""
        if self.local is not None:
            names = [str(q.relative_to(self.local)) for q in self.local.rglob("*") if q.is_file()]
        else:
            base = self._path.rstrip("/") + "/"
            names = [q[len(base):] for q in self.fs.find(self._path) if q.startswith(base)]
        return sorted(n for n in names if not n.endswith(TMP_SUFFIX))

    def remove(self, name: str) -> None:
        if self.local is not None:
            (self.local / name).unlink(missing_ok=True)
        elif self.fs.exists(self._p(name)):
            self.fs.rm(self._p(name))

    def local_dir(self, sub: str) -> Path:
        """A local folder holding the cache's `sub` folder (itself for a local cache; a copy, made once
        per process, for a URL): what transformers' from_pretrained needs (the teacher's tokenizer)."""
        if self.local is not None:
            return self.local / sub
        key = (self.root, sub)
        if key not in _COPIES:
            dest = Path(tempfile.mkdtemp(prefix="vlmkd-cache-")) / sub
            dest.mkdir(parents=True)
            for path in self.fs.find(self._p(sub)):
                rel = path[len(self._p(sub)):].lstrip("/")
                if rel and not rel.endswith(TMP_SUFFIX):
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    (dest / rel).write_bytes(self.fs.cat_file(path))
            _COPIES[key] = dest
        return _COPIES[key]


_COPIES: dict[tuple[str, str], Path] = {}


def remove_temporaries(store: Store) -> int:
    """Half-written shards or manifests of a killed job; they are never read, only removed."""
    names = store.names(f"*{TMP_SUFFIX}")
    for n in names:
        store.remove(n)
    return len(names)
