"""The cache format: member names, codecs and the version. docs/FORMAT.md mirrors this file.

A cache is a folder: `manifest.json`, WebDataset tar shards, and cache-level arrays (`gram.npy`).
Each sample is one tar key (10-digit index in the data manifest); each payload one member, a
zstd frame holding one or more .npy arrays written back to back (`numpy.load` reads them in turn from
the decompressed stream). Nothing else in vlmkd knows a member name.

Top-k codec (`topk.bin.zst`): one zstd frame over a fixed little-endian layout, read with
numpy.frombuffer at the offsets below (a per-sample .npy header would cost more than the data on
short answers). R scored rows, k ids each:
- header (8 bytes): uint32 R, uint16 k, uint8 id_bytes (2 or 4), uint8 version of this layout (1);
- `pos` int32 [R]: the sequence index whose output distribution the row is, i.e. p(. | x_<=pos),
  predicting token pos + 1. Response rows: pos = t - 1 for each response token t. Visual rows: pos = t
  for each visual token t (LLaVA-KD L_vis);
- `lp_max` float32 [R]: the row's top-1 log-prob (exact);
- `tail` float32 [R]: log(1 - sum of the exact top-k probabilities), -inf when k covers everything;
- `ids` uint16/uint32 [R, k]: each row's k ids sorted ascending and delta-coded (the first absolute,
  then differences), which zstd packs far below the id width;
- `code` uint8 [R, k], in the same order as the sorted ids: the log-prob below the row's top-1,
  companded: d = lp_max - lp >= 0, code = round(255 * sqrt(min(d, D_MAX) / D_MAX)), D_MAX = 32 nats;
  decode d = D_MAX * (code / 255)^2: fine where the probability is high, coarse where it no longer
  matters.
The reader renormalises so that top-k and tail sum to one after decoding.
"""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import zstandard

FORMAT_VERSION = 1
KNOWN_VERSIONS = {1}
D_MAX = 32.0
ZSTD_LEVEL = 9
TOPK_LAYOUT = 1

# member suffix (after the key) -> what it holds
MEMBERS = {
    "meta.json": "sample id and counts (JSON, plain)",
    "image": "the sample's image file, bytes as they were on disk (PNG, JPEG, ...), so students read shards only",
    "tokens.npy.zst": "input_ids int32 [T], flags uint8 [T] (bit 0 response token, bit 1 visual token)",
    "topk.bin.zst": "header, pos, lp_max, tail, ids (sorted, delta-coded), code (see module docstring)",
    "attn.npy.zst": "qpos int32 [Q], attn float16 [L, H or 1, Q, N_v]",
    "hidden.npy.zst": "hidden float16 [P, N_v, D or r] for the manifest's hidden points",
    "pref.npy.zst": "float64 [2]: teacher summed log-prob of chosen and rejected responses",
}
PAYLOADS = tuple(m.split(".")[0] for m in MEMBERS)
FLAG_RESPONSE = 1
FLAG_VISUAL = 2


def sample_key(index: int) -> str:
    return f"{index:010d}"


_local = threading.local()


def _zstd(raw: bytes) -> bytes:
    if not hasattr(_local, "c"):
        _local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return _local.c.compress(raw)


def _unzstd(blob: bytes) -> bytes:
    if not hasattr(_local, "d"):  # one (de)compressor per thread: they are not thread-safe, and reuse is fast
        _local.d = zstandard.ZstdDecompressor()
    return _local.d.decompress(blob)


def pack_arrays(*arrays: np.ndarray) -> bytes:
    """Arrays as back-to-back .npy, zstd-compressed. Object arrays are refused (no pickles, ever)."""
    buf = io.BytesIO()
    for a in arrays:
        a = np.ascontiguousarray(a)
        if a.dtype.hasobject:
            raise ValueError("object arrays cannot be stored")
        np.save(buf, a, allow_pickle=False)
    return _zstd(buf.getvalue())


def unpack_arrays(blob: bytes, n: int) -> list[np.ndarray]:
    raw = _unzstd(blob)
    f = io.BytesIO(raw)
    out = [np.load(f, allow_pickle=False) for _ in range(n)]
    if f.tell() != len(raw):
        raise ValueError(f"{len(raw) - f.tell()} trailing bytes after {n} arrays")
    return out


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def encode_topk(pos: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, vocab_size: int) -> bytes:
    """pos [R]; ids, logprobs [R, k] in any order; tail [R] log-mass outside the top k."""
    R, k = ids.shape
    lp = logprobs.astype(np.float64)
    lp_max = lp.max(-1) if R else np.zeros(0)
    d = np.clip(lp_max[:, None] - lp, 0.0, D_MAX)
    code = np.rint(255.0 * np.sqrt(d / D_MAX)).astype(np.uint8)
    order = np.argsort(ids, axis=-1, kind="stable")
    sids = np.take_along_axis(ids.astype(np.int64), order, -1)
    delta = np.diff(sids, axis=-1, prepend=0)
    dt = id_dtype(vocab_size)
    head = np.array([R], "<u4").tobytes() + np.array([k], "<u2").tobytes() + bytes([dt.itemsize, TOPK_LAYOUT])
    body = [pos.astype("<i4"), lp_max.astype("<f4"), tail.astype("<f4"), delta.astype(dt),
            np.take_along_axis(code, order, -1)]
    return _zstd(head + b"".join(np.ascontiguousarray(a).tobytes() for a in body))


def decode_topk(blob: bytes) -> dict[str, np.ndarray]:
    """{"pos" [R], "ids" [R, k] int64, "logprobs" [R, k] float32, "tail" [R] float32}, each row's ids in
    ascending order, renormalised so that exp(logprobs).sum(-1) + exp(tail) == 1."""
    raw = _unzstd(blob)
    R = int(np.frombuffer(raw, "<u4", 1, 0)[0])
    k = int(np.frombuffer(raw, "<u2", 1, 4)[0])
    width, layout = raw[6], raw[7]
    if layout != TOPK_LAYOUT or width not in (2, 4):
        raise ValueError(f"unknown top-k layout {layout} / id width {width}")
    expect = 8 + R * 12 + R * k * (width + 1)
    if len(raw) != expect:
        raise ValueError(f"top-k member has {len(raw)} bytes, its header implies {expect}")
    o = 8
    pos = np.frombuffer(raw, "<i4", R, o)
    o += 4 * R
    lp_max = np.frombuffer(raw, "<f4", R, o)
    o += 4 * R
    tail = np.frombuffer(raw, "<f4", R, o)
    o += 4 * R
    delta = np.frombuffer(raw, "<u2" if width == 2 else "<u4", R * k, o).reshape(R, k)
    o += width * R * k
    code = np.frombuffer(raw, np.uint8, R * k, o).reshape(R, k)
    ids = np.cumsum(delta, axis=-1, dtype=np.int64)
    d = _DECODE_D[code]  # table lookup: code -> nats below the row's top-1
    # renormalise around the top-1: sum_j exp(lp_j - lp_max) = sum_j exp(-d_j) (exact top-1 has d = 0)
    mass = _DECODE_P[code].sum(-1, dtype=np.float64)
    tail_rel = np.exp(tail.astype(np.float64) - lp_max)
    log_norm = lp_max + np.log(mass + tail_rel)
    return {
        "pos": pos.astype(np.int64),
        "ids": ids,
        "logprobs": (lp_max - log_norm)[:, None].astype(np.float32) - d,
        "tail": (tail - log_norm).astype(np.float32),
    }


_DECODE_D = (D_MAX * (np.arange(256) / 255.0) ** 2).astype(np.float32)
_DECODE_P = np.exp(-_DECODE_D.astype(np.float64))


def encode_tokens(input_ids: np.ndarray, response: np.ndarray, visual: np.ndarray) -> bytes:
    flags = response.astype(np.uint8) * FLAG_RESPONSE | visual.astype(np.uint8) * FLAG_VISUAL
    return pack_arrays(input_ids.astype(np.int32), flags)


def decode_tokens(blob: bytes) -> dict[str, np.ndarray]:
    ids, flags = unpack_arrays(blob, 2)
    return {"input_ids": ids.astype(np.int64), "response": (flags & FLAG_RESPONSE) > 0,
            "visual": (flags & FLAG_VISUAL) > 0}


def encode_attn(qpos: np.ndarray, attn: np.ndarray) -> bytes:
    return pack_arrays(qpos.astype(np.int32), attn.astype(np.float16))


def decode_attn(blob: bytes) -> dict[str, np.ndarray]:
    qpos, attn = unpack_arrays(blob, 2)
    return {"qpos": qpos.astype(np.int64), "attn": attn}


def encode_hidden(hidden: np.ndarray) -> bytes:
    return pack_arrays(hidden.astype(np.float16))


def decode_hidden(blob: bytes) -> dict[str, np.ndarray]:
    (h,) = unpack_arrays(blob, 1)
    return {"hidden": h}


def encode_pref(chosen: float, rejected: float) -> bytes:
    return pack_arrays(np.array([chosen, rejected], dtype=np.float64))


def decode_pref(blob: bytes) -> dict[str, np.ndarray]:
    (a,) = unpack_arrays(blob, 1)
    return {"pref": a}


DECODERS = {
    "tokens": decode_tokens,
    "topk": decode_topk,
    "attn": decode_attn,
    "hidden": decode_hidden,
    "pref": decode_pref,
}


def encode_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True).encode()


def member_name(key: str, payload: str) -> str:
    suffix = next(m for m in MEMBERS if m.split(".")[0] == payload)
    return f"{key}.{suffix}"


def split_member(name: str) -> tuple[str, str] | None:
    """(key, payload) of a member name, or None when it is not one this format writes."""
    key, _, suffix = name.partition(".")
    if suffix not in MEMBERS or not key.isdigit() or len(key) != 10:
        return None
    return key, suffix.split(".")[0]
