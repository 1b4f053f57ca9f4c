"""The two shard layouts: how a shard's samples and their members become one file, and back.

- "tar" (WebDataset): every member is a tar member named KEY.SUFFIX (`format.MEMBERS`), so stock
  WebDataset readers iterate the samples. A tar header and padding cost 512-1,023 bytes per member.
- "parquet": one row per sample, one column per payload (`key` and `meta` strings, then one binary
  column per payload, null where a sample has none), the same member bytes inside; no compression,
  dictionary or statistics on top (the members are zstd frames already), one row group per shard.
  pyarrow, pandas and `datasets.load_dataset("parquet", ...)` read it as it is.

Both give the reader the same (key, {payload: bytes}) stream, so checksums, verify, resume, merge and
the trainer do not know which layout a cache has. docs/FORMAT.md specifies both byte for byte.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator

from vlmkd.cache import format as fmt
from vlmkd.errors import CacheError

LAYOUTS = {"tar": ".tar", "parquet": ".parquet"}


def suffix(layout: str) -> str:
    if layout not in LAYOUTS:
        raise CacheError(f"shard layout {layout!r} is not known; choose one of {sorted(LAYOUTS)}")
    return LAYOUTS[layout]


def layout_of(shard_name: str) -> str:
    for layout, ext in LAYOUTS.items():
        if shard_name.endswith(ext):
            return layout
    raise CacheError(f"shard {shard_name}: neither a .tar nor a .parquet shard")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """Deterministic headers (no time, owner or host details), so equal inputs give equal bytes."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def pack(layout: str, samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """(key, {payload: bytes}) samples, in order, as one shard file of `layout`."""
    if layout == "parquet":
        return _pack_parquet(samples)
    suffix(layout)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for payload, blob in members.items():
                tar.addfile(_tarinfo(fmt.member_name(key, payload), len(blob)), io.BytesIO(blob))
    return buf.getvalue()


def _pack_parquet(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    present = [p for p in fmt.PAYLOADS if p != "meta" and any(p in m for _, m in samples)]
    cols = {"key": pa.array([k for k, _ in samples], pa.string()),
            "meta": pa.array([m["meta"].decode("utf-8") for _, m in samples], pa.string())}
    for p in present:
        cols[p] = pa.array([m.get(p) for _, m in samples], pa.binary())
    table = pa.table(cols)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="none", use_dictionary=False, write_statistics=False,
                   row_group_size=max(len(samples), 1), store_schema=False)
    return buf.getvalue()


def iter_members(data: bytes, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {payload: raw bytes}) per sample of one shard, in order, whichever its layout. Refuses what a
    vlmkd writer never makes (links, directories, paths, unknown names or columns) and a truncated file,
    naming them."""
    if layout_of(shard) == "parquet":
        yield from _iter_parquet(data, shard)
        return
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        key, members = None, {}
        for ti in tar:
            if not ti.isreg():
                raise CacheError(f"shard {shard}: member {ti.name!r} is not a regular file (link or device); refused")
            parsed = fmt.split_member(ti.name)
            if parsed is None:
                raise CacheError(f"shard {shard}: member {ti.name!r} is not a cache member name; refused")
            k, payload = parsed
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            f = tar.extractfile(ti)
            blob = f.read() if f else b""
            if len(blob) != ti.size:
                raise CacheError(f"shard {shard}: member {ti.name!r} is truncated")
            members[payload] = blob
        if key is not None:
            yield key, members
    except (tarfile.TarError, EOFError) as e:
        raise CacheError(f"shard {shard}: not a readable tar ({e}); the shard is truncated or corrupt") from e


def _iter_parquet(data: bytes, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CacheError(f"shard {shard}: not a readable Parquet file ({e}); the shard is truncated or corrupt") from e
    names = table.column_names
    unknown = [n for n in names if n not in ("key", *fmt.PAYLOADS)]
    if names[:2] != ["key", "meta"] or unknown:
        raise CacheError(f"shard {shard}: columns {names} are not a cache's (key, meta, then payloads of "
                         f"{fmt.PAYLOADS}); refused")
    for n in names:
        want = pa.string() if n in ("key", "meta") else pa.binary()
        if table.schema.field(n).type != want:
            raise CacheError(f"shard {shard}: column {n!r} is {table.schema.field(n).type}, not {want}; refused")
    cols = {n: table.column(n).to_pylist() for n in names}
    for i, key in enumerate(cols["key"]):
        if key is None or not key.isdigit() or len(key) != 10 or cols["meta"][i] is None:
            raise CacheError(f"shard {shard}: row {i} has key {key!r}, not a 10-digit sample key with a meta; refused")
        members = {"meta": cols["meta"][i].encode("utf-8")}
        members.update({n: cols[n][i] for n in names[2:] if cols[n][i] is not None})
        yield key, members


__all__ = ["LAYOUTS", "iter_members", "layout_of", "pack", "suffix"]
