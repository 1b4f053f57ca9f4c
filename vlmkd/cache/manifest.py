"""The cache manifest: what made the cache (fingerprint), its shards with counts and checksums, state.

Written atomically (temporary file, fsync, rename) after each complete shard, so on disk it is always
a manifest that some prefix of the job wrote, never a half one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vlmkd.cache.atomic import atomic_write
from vlmkd.cache.format import FORMAT_VERSION, KNOWN_VERSIONS
from vlmkd.errors import CacheError

MANIFEST = "manifest.json"
# keys that must agree for two runs (a resume, or split jobs being merged) to write the same cache
FINGERPRINT_KEYS = ("format_version", "teacher", "tokenizer_sha256", "chat_template", "extraction", "data_sha256")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def tokenizer_fingerprint(hf_tok) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included) and the chat template."""
    vocab = sorted(hf_tok.get_vocab().items())
    blob = json.dumps({"vocab": vocab, "chat_template": hf_tok.chat_template or ""}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def weights_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise CacheError(f"{model_dir}: no safetensors weights to fingerprint")
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def part_name(num_parts: int, index: int) -> str:
    return MANIFEST if num_parts == 1 else f"manifest.part-{index:03d}-of-{num_parts:03d}.json"


def _body_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(path, manifest: dict) -> None:
    """Atomically, with `manifest_sha256` over the rest (sorted-key JSON), so that a flipped byte in
    the manifest itself is caught like one in a shard. `path`: a local file, or (Store, name)."""
    manifest["manifest_sha256"] = _body_digest(manifest)
    data = json.dumps(manifest, indent=1).encode()
    if isinstance(path, tuple):
        path[0].write(path[1], data)
    else:
        atomic_write(Path(path), data)


def read_manifest(path) -> dict:
    """A cache's manifest: `path` is a cache folder or URL, a manifest file, or (Store, name)."""
    from vlmkd.cache.store import Store, is_url

    if isinstance(path, tuple):
        store, name = path
    elif is_url(path):
        root = str(path).rstrip("/")
        store, name = (Store(root.rsplit("/", 1)[0]), root.rsplit("/", 1)[1]) if root.endswith(".json") \
            else (Store(root), MANIFEST)
    else:
        p = Path(path)
        store, name = (Store(p), MANIFEST) if p.is_dir() or not p.suffix else (Store(p.parent), p.name)
    where = store.where(name)
    if not store.exists(name):
        raise CacheError(f"{where} does not exist: not a vlmkd cache (or its jobs were never merged: "
                         "run `vlmkd cache merge`)")
    try:
        m = json.loads(store.read(name).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{where} is not valid UTF-8 JSON ({e}); the manifest is corrupt") from e
    if not isinstance(m, dict) or m.get("format") != "vlmkd-cache":
        raise CacheError(f"{where} is not a vlmkd cache manifest")
    if m.get("manifest_sha256") != _body_digest(m):
        raise CacheError(f"{where}: the manifest's checksum does not match its content; it is corrupt "
                         "(re-run the cache job to rewrite it, or restore it)")
    v = m.get("format_version")
    if v not in KNOWN_VERSIONS:
        raise CacheError(f"{where}: cache format version {v} is not known to this vlmkd (reads {sorted(KNOWN_VERSIONS)}); "
                         "upgrade vlmkd or rebuild the cache")
    return m


def fingerprint(m: dict) -> dict:
    return {k: m.get(k) for k in FINGERPRINT_KEYS}


def fingerprint_diff(a: dict, b: dict) -> list[str]:
    return [k for k in FINGERPRINT_KEYS if a.get(k) != b.get(k)]


def new_manifest(fp: dict, data_path: str, n_samples: int, split: dict) -> dict:
    assert fp["format_version"] == FORMAT_VERSION
    return {"format": "vlmkd-cache", **fp, "data": {"manifest": data_path, "samples": n_samples, "split": split},
            "payload_backends": {}, "shards": [], "state": "writing", "gram": None}


def totals(m: dict) -> dict:
    sh = m["shards"]
    return {k: sum(s[k] for s in sh) for k in ("samples", "tokens", "scored_tokens", "bytes")} | {
        "shards": len(sh), "rejects": sum(len(s["rejects"]) for s in sh),
        # job wall time summed over its runs and parts (engine start-ups + extraction); 0 when unrecorded
        "seconds": m.get("startup_seconds", 0.0) + sum(s.get("seconds", 0.0) for s in sh)}
