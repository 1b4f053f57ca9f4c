"""The cache format: member names, codecs and the version. docs/FORMAT.md mirrors this file.

A cache is a folder: `manifest.json`, WebDataset tar shards, and cache-level arrays (`gram.npy`).
Each sample is one tar key (10-digit index in the data manifest); each payload one member, a
zstd frame holding one or more .npy arrays written back to back (`numpy.load` reads them in turn from
the decompressed stream). Nothing else in vlmkd knows a member name.

Top-k codec (`topk.bin.zst`), layout 2: one zstd frame over a fixed little-endian layout, read with
numpy.frombuffer at the offsets below (a per-sample .npy header would cost more than the data on
short answers). R scored rows, k ids each:
- header (8 bytes): uint32 R, uint16 k, uint8 code_bits (1-8), uint8 layout (2);
- `pos` int32 [R], delta-coded (the first absolute): the sequence index whose output distribution the
  row is, i.e. p(. | x_<=pos), predicting token pos + 1. Response rows: pos = t - 1 for each
  response token t. Visual rows: pos = t for each visual token t (LLaVA-KD L_vis);
- `tail` float16 [R]: log(1 - sum of the exact top-k probabilities), -inf when k covers everything;
- `ids`: each row's k ids sorted ascending and gap-coded (the first absolute, then id_j - id_{j-1} - 1),
  as uint32 split into 4 byte planes (all lowest bytes, then all second bytes, ...): the high planes
  are almost all zero and zstd removes them, at any vocabulary size below 2^32;
- `code` uint8 [R, k], in the same order as the sorted ids: u = sqrt(p / p_top1) in [0, 1] quantised
  to L = 2^code_bits - 1 levels, code = round(u L); decode u = max(code, 1/4) / L, log p = 2 log u +
  const. A uniform step in sqrt(p) spends the same KL on every id (KL ~ p (d log p)^2 / 2 and
  d log p = 2 du / u); 8 bits (the default) keep even broad rows near 1e-4 nats.
The reader renormalises so that the top-k mass is 1 - exp(tail). Layout 1 (before 2026-11-26: uint8
sqrt(nats) codes, float32 lp_max and tail, plain deltas) is still read.

Layout 3 (adaptive-k, `top_p`): rows of varying width, n_r ids in row r (1 <= n_r <= k), M = sum n_r:
- header (8 bytes) as layout 2, k = the widest row, layout byte 3;
- `pos` int32 [R] delta-coded; `tail` float16 [R]; `n` uint16 [R] the row widths;
- `ids` [M]: per row sorted and gap-coded (each row restarts: first absolute), uint32 byte planes;
- `code` uint8 [M], per row in the order of its sorted ids, relative to the row's own top-1.
The reader returns [R, k] arrays: a row's ids first (ascending), then padding slots with id 0 and
log-prob -inf, the losses' "no slot" (`vlmkd.losses.logit`). A fixed-k cache is written in layout 2,
byte for byte as before.

Sampled codec (`sampled.bin.zst`, Random-Sampling KD): N draws per scored row from the teacher's
distribution at proposal temperature t, stored as the unique ids with their counts:
- header (16 bytes): uint32 R, uint16 N, uint8 flags (bit 0: per-id teacher log-probs present; bit 1:
  per-row log-normaliser present), uint8 layout (1), float32 t, uint32 M (total unique ids);
- `pos` int32 [R] delta-coded; `n` uint8 [R] unique ids per row;
- `ids` [M]: per row sorted and gap-coded as above, uint32 byte planes;
- `count` uint8 [M] (N <= 255);
- `lp` float16 [M] (flag 0): the teacher's log-prob of each id at temperature 1;
- `logz` float32 [R] (flag 1, t != 1): log sum_v p_v^(1/t), the proposal's normaliser, so that the
  importance weight p_v / pi_v = exp(lp_v (1 - 1/t) + logz) is exact.
The reader returns per row the ids and the unbiased estimate w_v = (count_v / N) p_v / pi_v of the
teacher's probabilities (E[w_v] = p_v; with t = 1, w_v = count_v / N).
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import threading

import numpy as np
import zstandard

FORMAT_VERSION = 2  # 2: several images per sample (`images.bin`, meta `images`); 1 reads as before
KNOWN_VERSIONS = {1, 2}
V1_D_MAX = 32.0  # layout 1 companded nats below the top-1 up to this many
ZSTD_LEVEL = 9
TOPK_LAYOUT = 2
TOPK_LAYOUT_VARIABLE = 3  # adaptive-k rows (top_p)
CODE_BITS = 8
SAMPLED_LAYOUT = 1

# member suffix (after the key) -> what it holds
MEMBERS = {
    "meta.json": "sample id and counts (JSON, plain)",
    "image": "the sample's image file, bytes as they were on disk (PNG, JPEG, ...), so students read shards only",
    "images.bin": "a sample's further image files (format 2: several images per sample; the first is `image`): "
                  "uint32 count, then per file uint64 length and its bytes as on disk",
    "tokens.npy.zst": "input_ids int32 [T], flags uint8 [T] (bit 0 response token, bit 1 visual token)",
    "topk.bin.zst": "header, pos, tail, ids (sorted, gap-coded, byte planes), code (see module docstring)",
    "sampled.bin.zst": "header, pos, n, ids (sorted, gap-coded, byte planes), count, lp, logz (see module docstring)",
    "attn.npy.zst": "qpos int32 [Q], attn float16 [L, H or 1, Q, N_v]",
    "hidden.npy.zst": "hidden float16 [P, N_v, D or r] for the manifest's hidden points",
    "pooled.npy.zst": "text float16 [D or r]: the mean of the teacher's final hidden states over the prompt's text "
                      "tokens (not visual, not response): contrastive alignment",
    "text.json.zst": "the conversation (role and text of each turn, as in the data manifest) and each response "
                     "token's (turn, start, end) character span in its turn's stripped answer: cross-tokenizer "
                     "alignment (JSON)",
    "pref.npy.zst": "rejected input_ids int32 [T'], flags uint8 [T'], teacher log-probs float32 of the chosen [Tc] "
                    "and rejected [Tr] response tokens (LLaVA-MoD preference pairs)",
}
PAYLOADS = tuple(m.split(".")[0] for m in MEMBERS)
VISUAL_PAYLOADS = ("image", "attn", "hidden")  # absent from a text-only sample (meta visual_tokens 0)
FLAG_RESPONSE = 1
FLAG_VISUAL = 2


def sample_key(index: int) -> str:
    return f"{index:010d}"


_local = threading.local()


def _zstd(raw: bytes) -> bytes:
    if not hasattr(_local, "c"):
        _local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return _local.c.compress(raw)


HARD_LIMIT = 1 << 30  # no member of any cache decompresses past this, whatever its counts say


def _unzstd(blob: bytes) -> bytes:
    """Decompress one member, refusing more output than `decompress_limit` allows (a zstd bomb: a few
    KB that decode to gigabytes), before allocating it."""
    if not hasattr(_local, "d"):  # one (de)compressor per thread: they are not thread-safe, and reuse is fast
        _local.d = zstandard.ZstdDecompressor()
    limit = getattr(_local, "limit", HARD_LIMIT)
    size = zstandard.frame_content_size(blob)
    if size > limit:
        raise ValueError(f"it would decompress to {size:,} bytes, more than the {limit:,} its sample's counts "
                         "allow (a zstd bomb, or a member of another sample)")
    try:
        return _local.d.decompress(blob, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise ValueError(f"zstd: {e} (limit {limit:,} bytes)") from e


@contextlib.contextmanager
def decompress_limit(nbytes: int):
    """Within the block, a member may decompress to at most `nbytes` (see `member_limit`)."""
    old = getattr(_local, "limit", HARD_LIMIT)
    _local.limit = min(int(nbytes), HARD_LIMIT)
    try:
        yield
    finally:
        _local.limit = old


def member_limit(payload: str, meta: dict, manifest: dict) -> int:
    """The most bytes a sample's `payload` member can decompress to, from its counts (meta: tokens,
    scored rows, visual tokens) and the manifest's extraction (k, draws, layers, widths), with 2x
    margin plus 64 KiB of slack for .npy headers: a real member is far inside it, a bomb is not."""
    ext, teacher = manifest.get("extraction", {}), manifest.get("teacher", {})
    T, R, Nv = int(meta.get("tokens", 0)), int(meta.get("scored", 0)), int(meta.get("visual_tokens", 0))
    k, N = int(ext.get("topk") or 0), int(ext.get("draws") or 0)
    D = int(ext.get("hidden_dim") or teacher.get("hidden_size") or 0)
    heads = 1 if ext.get("attn_heads", "mean") == "mean" else int(teacher.get("num_heads") or 1)
    L, P = len(ext.get("attn_layers") or []), len(ext.get("hidden_points") or [])
    need = {
        "tokens": 5 * T,
        "topk": 16 + R * (12 + 5 * k),  # layout 1 (the larger) rows: pos, lp_max, tail, 4-byte deltas, codes
        "sampled": 16 + R * 9 + R * N * 7,
        "attn": 4 * T + 2 * L * heads * T * Nv,
        "hidden": 2 * P * Nv * D,
        "pooled": 2 * D,
        "pref": 64 * T,  # the rejected sequence is about the chosen's length; its answer is short
        "text": 64 * T + 8 * len(json.dumps(meta.get("prompt", ""))),  # spans ~15 B/token; the turns' text
    }.get(payload, 0)
    return 2 * need + (64 << 10)


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


def _planes(ids_sorted: np.ndarray) -> bytes:
    """Sorted ids [R, k] (gap-coded here), or gap codes already made [M] -> uint32 byte planes."""
    gaps = np.diff(ids_sorted, axis=-1, prepend=-1) - 1 if ids_sorted.ndim == 2 else ids_sorted
    if gaps.size and gaps.min() < 0:
        raise ValueError("a row repeats an id (or an id is negative): rows hold distinct ids")
    return np.ascontiguousarray(gaps.astype("<u4").reshape(-1).view(np.uint8).reshape(-1, 4).T).tobytes()


def _unplanes(raw: bytes, offset: int, n: int) -> np.ndarray:
    """Gap codes [n] (int64) from 4 byte planes of n bytes each."""
    planes = np.frombuffer(raw, np.uint8, 4 * n, offset).reshape(4, n)
    return np.ascontiguousarray(planes.T).view("<u4").reshape(n).astype(np.int64)


def _delta(pos: np.ndarray) -> bytes:
    return np.diff(pos.astype(np.int64), prepend=0).astype("<i4").tobytes()


def encode_topk(pos: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, vocab_size: int,
                code_bits: int = CODE_BITS) -> bytes:
    """pos [R]; ids, logprobs [R, k] in any order; tail [R] log-mass outside the kept ids. A slot whose
    log-prob is -inf is no slot (an adaptive-k row narrower than k): such rows are written in layout 3."""
    if not 1 <= code_bits <= 8:
        raise ValueError(f"code_bits must be 1..8, not {code_bits}")
    if vocab_size > 2**32:
        raise ValueError(f"vocabulary of {vocab_size} ids does not fit the uint32 id planes")
    R, k = ids.shape
    keep = np.isfinite(logprobs)
    if R and not keep.all():
        return _encode_topk_variable(pos, ids, logprobs, tail, keep, code_bits)
    order = np.argsort(ids, axis=-1, kind="stable")
    sids = np.take_along_axis(ids.astype(np.int64), order, -1)
    lp = np.take_along_axis(logprobs.astype(np.float64), order, -1)
    levels = (1 << code_bits) - 1
    u = np.exp((lp - lp.max(-1, keepdims=True)) / 2) if R else np.zeros((0, k))
    code = np.rint(u * levels).astype(np.uint8)
    head = np.array([R], "<u4").tobytes() + np.array([k], "<u2").tobytes() + bytes([code_bits, TOPK_LAYOUT])
    return _zstd(head + _delta(pos) + tail.astype("<f2").tobytes() + _planes(sids) + code.tobytes())


def _encode_topk_variable(pos, ids, logprobs, tail, keep, code_bits) -> bytes:
    """Layout 3: each row's finite slots only (see the module docstring)."""
    n = keep.sum(-1)
    if n.min() < 1:
        raise ValueError("every top-k row keeps at least one id")
    R = len(n)
    # the kept slots first, by ascending id; dropped slots sort after every id
    big = np.iinfo(np.int64).max
    key = np.where(keep, ids.astype(np.int64), big)
    order = np.argsort(key, axis=-1, kind="stable")
    sids = np.take_along_axis(key, order, -1)
    lp = np.take_along_axis(np.where(keep, logprobs.astype(np.float64), -np.inf), order, -1)
    levels = (1 << code_bits) - 1
    u = np.exp((lp - lp.max(-1, keepdims=True)) / 2)
    first = np.arange(ids.shape[1])[None] < n[:, None]
    gaps = np.diff(np.where(first, sids, 0), axis=-1, prepend=-1) - 1
    code = np.rint(u * levels).astype(np.uint8)
    head = (np.array([R], "<u4").tobytes() + np.array([int(n.max())], "<u2").tobytes()
            + bytes([code_bits, TOPK_LAYOUT_VARIABLE]))
    return _zstd(head + _delta(pos) + tail.astype("<f2").tobytes() + n.astype("<u2").tobytes()
                 + _planes(gaps[first]) + code[first].tobytes())


def decode_topk(blob: bytes) -> dict[str, np.ndarray]:
    """{"pos" [R], "ids" [R, k] int64, "logprobs" [R, k] float32, "tail" [R] float32}, each row's ids in
    ascending order, renormalised so that exp(logprobs).sum(-1) + exp(tail) == 1."""
    raw = _unzstd(blob)
    R = int(np.frombuffer(raw, "<u4", 1, 0)[0])
    k = int(np.frombuffer(raw, "<u2", 1, 4)[0])
    if raw[7] == 1:
        return _decode_topk_v1(raw, R, k)
    bits, layout = raw[6], raw[7]
    if layout == TOPK_LAYOUT_VARIABLE and 1 <= bits <= 8:
        return _decode_topk_variable(raw, R, k, bits)
    if layout != TOPK_LAYOUT or not 1 <= bits <= 8:
        raise ValueError(f"unknown top-k layout {layout} / code bits {bits}")
    expect = 8 + R * 6 + R * k * 5
    if len(raw) != expect:
        raise ValueError(f"top-k member has {len(raw)} bytes, its header implies {expect}")
    o = 8
    pos = np.cumsum(np.frombuffer(raw, "<i4", R, o), dtype=np.int64)
    o += 4 * R
    tail = np.frombuffer(raw, "<f2", R, o).astype(np.float64)
    o += 2 * R
    ids = np.cumsum(_unplanes(raw, o, R * k).reshape(R, k) + 1, axis=-1) - 1
    o += 4 * R * k
    code = np.frombuffer(raw, np.uint8, R * k, o).reshape(R, k)
    lrel, prel = _code_tables(bits)
    rel = lrel[code]  # log(p / p_top1), up to the quantisation
    log_norm = np.log(prel[code].sum(-1, dtype=np.float64)) - np.log(-np.expm1(np.minimum(tail, -1e-30)))
    return {"pos": pos, "ids": ids, "logprobs": (rel - log_norm[:, None]).astype(np.float32),
            "tail": tail.astype(np.float32)}


def _decode_topk_variable(raw: bytes, R: int, k: int, bits: int) -> dict[str, np.ndarray]:
    o = 8
    pos = np.cumsum(np.frombuffer(raw, "<i4", R, o), dtype=np.int64)
    o += 4 * R
    tail = np.frombuffer(raw, "<f2", R, o).astype(np.float64)
    o += 2 * R
    if len(raw) < o + 2 * R:
        raise ValueError(f"top-k member has {len(raw)} bytes, too few for its {R} row widths")
    n = np.frombuffer(raw, "<u2", R, o).astype(np.int64)
    o += 2 * R
    M = int(n.sum())
    expect = o + 5 * M
    if len(raw) != expect or (R and (n.min() < 1 or n.max() != k)):
        raise ValueError(f"top-k member has {len(raw)} bytes and rows of {n.min() if R else 0}..{n.max() if R else 0} "
                         f"ids, its header implies {expect} bytes and rows of at most {k}")
    row = np.repeat(np.arange(R), n)
    col = np.arange(M) - np.repeat(np.cumsum(n) - n, n)
    step = np.zeros((R, k), np.int64)
    step[row, col] = _unplanes(raw, o, M) + 1
    o += 4 * M
    code = np.zeros((R, k), np.int64)
    code[row, col] = np.frombuffer(raw, np.uint8, M, o)
    valid = np.zeros((R, k), bool)
    valid[row, col] = True
    lrel, prel = _code_tables(bits)
    mass = np.where(valid, prel[code], 0.0).sum(-1, dtype=np.float64)
    log_norm = np.log(mass) - np.log(-np.expm1(np.minimum(tail, -1e-30)))
    with np.errstate(invalid="ignore"):
        lp = np.where(valid, lrel[code] - log_norm[:, None], -np.inf)
    return {"pos": pos, "ids": np.where(valid, np.cumsum(step, axis=-1) - 1, 0), "logprobs": lp.astype(np.float32),
            "tail": tail.astype(np.float32)}


def _code_tables(bits: int) -> tuple[np.ndarray, np.ndarray]:
    levels = (1 << bits) - 1
    u = np.maximum(np.arange(levels + 1), 0.25) / levels  # code 0: the middle of [0, 1/2) steps
    return 2 * np.log(u), u * u


def _decode_topk_v1(raw: bytes, R: int, k: int) -> dict[str, np.ndarray]:
    width = raw[6]
    if width not in (2, 4):
        raise ValueError(f"unknown top-k layout 1 id width {width}")
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
    d = _V1_D[code]
    mass = _V1_P[code].sum(-1, dtype=np.float64)
    log_norm = lp_max + np.log(mass + np.exp(tail.astype(np.float64) - lp_max))
    return {"pos": pos.astype(np.int64), "ids": ids,
            "logprobs": (lp_max - log_norm)[:, None].astype(np.float32) - d,
            "tail": (tail - log_norm).astype(np.float32)}


_V1_D = (V1_D_MAX * (np.arange(256) / 255.0) ** 2).astype(np.float32)
_V1_P = np.exp(-_V1_D.astype(np.float64))


def encode_sampled(pos: np.ndarray, ids: list[np.ndarray], counts: list[np.ndarray], draws: int,
                   temperature: float = 1.0, logprobs: list[np.ndarray] | None = None,
                   logz: np.ndarray | None = None) -> bytes:
    """Per row r: the unique sampled ids[r] (any order), their counts[r] (summing to `draws`), optionally
    the teacher's log-probs of those ids at temperature 1; `logz` [R] is required when temperature != 1."""
    if not 1 <= draws <= 255:
        raise ValueError(f"draws must be 1..255, not {draws}")
    if temperature != 1.0 and (logz is None or logprobs is None):
        raise ValueError("a proposal temperature other than 1 needs the teacher's log-probs and logz")
    R = len(ids)
    order = [np.argsort(i, kind="stable") for i in ids]
    sids = [np.asarray(i, np.int64)[o] for i, o in zip(ids, order, strict=True)]
    n = np.array([len(i) for i in sids], np.int64)
    if (n > 255).any() or any(int(np.asarray(c).sum()) != draws for c in counts):
        raise ValueError("each row needs at most 255 unique ids whose counts sum to the number of draws")
    gaps = np.concatenate([np.diff(i, prepend=-1) - 1 for i in sids]) if R else np.zeros(0, np.int64)
    cnt = np.concatenate([np.asarray(c)[o] for c, o in zip(counts, order, strict=True)]) if R else np.zeros(0)
    flags = (1 if logprobs is not None else 0) | (2 if temperature != 1.0 else 0)
    head = (np.array([R], "<u4").tobytes() + np.array([draws], "<u2").tobytes() + bytes([flags, SAMPLED_LAYOUT])
            + np.array([temperature], "<f4").tobytes() + np.array([len(gaps)], "<u4").tobytes())
    body = [_delta(pos), n.astype(np.uint8).tobytes(), _planes(gaps), cnt.astype(np.uint8).tobytes()]
    if logprobs is not None:
        body.append(np.concatenate([np.asarray(lp)[o] for lp, o in zip(logprobs, order, strict=True)])
                    .astype("<f2").tobytes() if R else b"")
    if flags & 2:
        body.append(np.asarray(logz, "<f4").tobytes())
    return _zstd(head + b"".join(body))


def decode_sampled(blob: bytes) -> dict[str, np.ndarray]:
    """{"pos" [R], "ids" [R, m] int64 (m = most unique ids in a row; padding 0), "weights" [R, m] float32
    (the unbiased estimate of the teacher's probabilities; 0 on padding), "logprobs" [R, m] float32 (the
    teacher's, NaN when not stored or on padding), "draws", "temperature"}."""
    raw = _unzstd(blob)
    R = int(np.frombuffer(raw, "<u4", 1, 0)[0])
    draws = int(np.frombuffer(raw, "<u2", 1, 4)[0])
    flags, layout = raw[6], raw[7]
    if layout != SAMPLED_LAYOUT:
        raise ValueError(f"unknown sampled layout {layout}")
    t = float(np.frombuffer(raw, "<f4", 1, 8)[0])
    M = int(np.frombuffer(raw, "<u4", 1, 12)[0])
    expect = 16 + 5 * R + 5 * M + (2 * M if flags & 1 else 0) + (4 * R if flags & 2 else 0)
    if len(raw) != expect:
        raise ValueError(f"sampled member has {len(raw)} bytes, its header implies {expect}")
    o = 16
    pos = np.cumsum(np.frombuffer(raw, "<i4", R, o), dtype=np.int64)
    o += 4 * R
    n = np.frombuffer(raw, np.uint8, R, o).astype(np.int64)
    o += R
    gaps = _unplanes(raw, o, M)
    o += 4 * M
    cnt = np.frombuffer(raw, np.uint8, M, o).astype(np.float64)
    o += M
    lp = None
    if flags & 1:
        lp = np.frombuffer(raw, "<f2", M, o).astype(np.float64)
        o += 2 * M
    m = int(n.max()) if R else 0
    row = np.repeat(np.arange(R), n)
    col = np.arange(M) - np.repeat(np.cumsum(n) - n, n)
    # ids restart at each row: cumulative sum of (gap + 1) within the row
    ids = np.zeros((R, m), np.int64)
    ids[row, col] = gaps + 1
    ids = np.cumsum(ids, axis=-1) - 1
    valid = np.zeros((R, m), bool)
    valid[row, col] = True
    w = cnt / draws
    if flags & 2:
        logz = np.frombuffer(raw, "<f4", R, o).astype(np.float64)
        w = w * np.exp(lp * (1 - 1 / t) + logz[row])
    weights = np.zeros((R, m), np.float32)
    weights[row, col] = w
    logprobs = np.full((R, m), np.nan, np.float32)
    if lp is not None:
        logprobs[row, col] = lp
    return {"pos": pos, "ids": np.where(valid, ids, 0), "weights": weights, "logprobs": logprobs,
            "draws": draws, "temperature": t}


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


def encode_pref(rejected_ids: np.ndarray, rejected_response: np.ndarray, chosen_lp: np.ndarray,
                rejected_lp: np.ndarray) -> bytes:
    """A preference pair as the teacher scored it: the rejected sequence (same prompt, the wrong
    answer) with its response flags, and the teacher's per-token log-probs of both responses."""
    return pack_arrays(rejected_ids.astype(np.int32), rejected_response.astype(np.uint8) * FLAG_RESPONSE,
                       chosen_lp.astype(np.float32), rejected_lp.astype(np.float32))


def decode_pref(blob: bytes) -> dict[str, np.ndarray]:
    ids, flags, c, r = unpack_arrays(blob, 4)
    return {"r_input_ids": ids.astype(np.int64), "r_response": (flags & FLAG_RESPONSE) > 0,
            "pref_chosen_lp": c, "pref_rejected_lp": r}


def encode_pooled(text: np.ndarray) -> bytes:
    return pack_arrays(text.astype(np.float16))


def decode_pooled(blob: bytes) -> dict[str, np.ndarray]:
    (text,) = unpack_arrays(blob, 1)
    return {"pooled_text": text}


def encode_text(turns: list[tuple[str, str]], spans: np.ndarray) -> bytes:
    doc = {"turns": [[r, t] for r, t in turns], "spans": np.asarray(spans, np.int64).reshape(-1, 3).tolist()}
    return _zstd(json.dumps(doc, ensure_ascii=False).encode())


def decode_text(blob: bytes) -> dict:
    doc = json.loads(_unzstd(blob))
    turns = doc["turns"]
    if not isinstance(turns, list) or not all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t)
                                              for t in turns):
        raise ValueError("text: turns must be [role, text] string pairs")
    spans = np.asarray(doc["spans"], dtype=np.int64).reshape(-1, 3)
    return {"text_turns": [tuple(t) for t in turns], "text_spans": spans}


DECODERS = {
    "text": decode_text,
    "tokens": decode_tokens,
    "topk": decode_topk,
    "sampled": decode_sampled,
    "attn": decode_attn,
    "hidden": decode_hidden,
    "pooled": decode_pooled,
    "pref": decode_pref,
}


def encode_images(files: list[bytes]) -> bytes:
    """`images.bin`: a sample's further image files, each as it was on disk, length-prefixed."""
    out = [struct.pack("<I", len(files))]
    for f in files:
        out += [struct.pack("<Q", len(f)), f]
    return b"".join(out)


def decode_images(blob: bytes) -> list[bytes]:
    (n,), off, files = struct.unpack_from("<I", blob), 4, []
    for _ in range(n):
        (size,) = struct.unpack_from("<Q", blob, off)
        off += 8
        if off + size > len(blob):
            raise ValueError(f"images.bin: file {len(files)} of {n} runs past the member's {len(blob)} bytes")
        files.append(blob[off: off + size])
        off += size
    if off != len(blob):
        raise ValueError(f"images.bin: {len(blob) - off} bytes after its {n} files")
    return files


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
