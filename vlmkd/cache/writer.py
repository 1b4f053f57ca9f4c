"""Writing a cache: `CacheWriter` owns a cache's manifest and files while a job fills it, in a local
folder or at any fsspec URL (`vlmkd.cache.store`).

Every file lands atomically (`Store.write`: a temporary name, then one rename); a shard's record goes
to the manifest only after the shard's rename, and the manifest is rewritten after each shard, so a
reader never sees a shard that is not complete and checksummed, and a killed job resumes after its
last complete shard. Shards close at deterministic points (a sample count or a byte budget), so the
same inputs give the same bytes, in either shard layout (`vlmkd.cache.shards`).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np

from vlmkd.cache import format as fmt
from vlmkd.cache import shards
from vlmkd.cache.manifest import (
    MANIFEST,
    fingerprint,
    fingerprint_diff,
    new_manifest,
    part_name,
    read_manifest,
    write_manifest,
)
from vlmkd.cache.store import Store, remove_temporaries
from vlmkd.errors import CacheError, DataError

# the teacher's files a student is built from, copied into CACHE/teacher/ (a cache is self-contained:
# tokenizer, processor, chat template and config; of the weights only the vision tower, VISION_FILE)
TEACHER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "chat_template.json", "processor_config.json", "preprocessor_config.json",
                 "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
TEACHER_DIR = "teacher"
VISION_FILE = "vision.safetensors"
VAL_DIR = "val"


def write_shard(store: Store, name: str, samples: list[tuple[str, dict[str, bytes]]],
                layout: str = "tar") -> tuple[int, str, dict[str, int]]:
    """Write (key, {payload: bytes}) samples as one shard; returns (bytes, sha256, bytes per payload)."""
    payload_bytes: dict[str, int] = {}
    for _, members in samples:
        for payload, blob in members.items():
            payload_bytes[payload] = payload_bytes.get(payload, 0) + len(blob)
    data = shards.pack(layout, samples)
    store.write(name, data)
    return len(data), hashlib.sha256(data).hexdigest(), payload_bytes


def copy_teacher_files(teacher: Path, store: Store) -> list[str]:
    """The teacher's tokenizer, processor, chat template and config into CACHE/teacher/ (each atomically),
    so that a student is built from the cache alone; returns the names copied."""
    names = []
    for name in TEACHER_FILES:
        src = Path(teacher) / name
        if src.is_file():
            store.write(f"{TEACHER_DIR}/{name}", src.read_bytes())
            names.append(name)
    return names


def vision_weights(teacher: Path) -> dict[str, np.ndarray]:
    """The teacher checkpoint's vision-tower tensors, keyed as the vision module names them (the
    checkpoint's names after the tower's prefix: `model.<tower>.` as transformers lays the model out,
    or `<tower>.` as LLaVA checkpoints are saved), read without loading the model. A safetensors
    checkpoint without them is refused by name (a student copying the tower would otherwise fail later,
    far from the cause)."""
    from safetensors import safe_open

    from vlmkd.models.parts import part_names

    model_type = json.loads((Path(teacher) / "config.json").read_text())["model_type"]
    tower = part_names(model_type)[0]
    # LLaVA checkpoints on the hub (and vlmkd's, for vLLM) nest CLIP under `vision_model.`; the
    # transformers module does not
    prefixes = (f"model.{tower}.vision_model.", f"{tower}.vision_model.", f"model.{tower}.", f"{tower}.")
    files = sorted(Path(teacher).glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="np") as st:
            for key in st.keys():
                pre = next((p for p in prefixes if key.startswith(p)), None)
                if pre is not None:
                    out[key[len(pre):]] = st.get_tensor(key)
    if files and not out:
        raise CacheError(f"{teacher}: no vision-tower tensors (names starting {' or '.join(prefixes)}) in its "
                         f"safetensors files; is it a {model_type} checkpoint?")
    return out


def copy_validation(src: Path, store: Store) -> tuple[int, int]:
    """Rows of a LLaVA manifest into CACHE/val/val.json with their images copied to CACHE/val/images/;
    returns (rows read, rows copied): rows that do not parse are left for the reader's reject path at use."""
    from vlmkd.data.manifest import _rows

    kept, n = [], 0
    for i, (_, row) in enumerate(_rows(src)):
        n += 1
        if not isinstance(row, dict):
            continue
        for field in ("image", "images"):  # LLaVA's one path, LLaMA-Factory's list
            value = row.get(field)
            one = isinstance(value, str)
            paths = [value] if one else value if isinstance(value, list) else []
            names = []
            for j, img in enumerate(paths):
                if not (isinstance(img, str) and (src.parent / img).is_file()):
                    names.append(img)  # left as it is: the reader's reject path names it at use
                    continue
                name = f"images/{i:07d}{'' if one else f'_{j}'}{Path(img).suffix}"
                store.write(f"{VAL_DIR}/{name}", (src.parent / img).read_bytes())
                names.append(name)
            if paths:
                row = {**row, field: names[0] if one else names}
        kept.append(row)
    store.write(f"{VAL_DIR}/val.json", json.dumps(kept, indent=0).encode())
    return n, len(kept)


class CacheWriter:
    """One job's cache part: open (new or resumed), add samples and rejects in row order, close shards,
    put cache-level arrays, finish. `manifest` is the state on disk after each shard."""

    def __init__(self, out: str | Path, fp: dict, data_path: str, n_rows: int, split: dict, overwrite: bool = False,
                 samples_per_shard: int = 2048, max_shard_bytes: int = 512 * 2**20):
        self.store = Store(out)
        self.store.makedirs()
        remove_temporaries(self.store)
        self.name = part_name(split["num_shards"], split["shard_index"])
        self.path = (self.store, self.name)  # read_manifest / write_manifest take it
        self.samples_per_shard, self.max_shard_bytes = samples_per_shard, max_shard_bytes
        self.prefix = "shard-" if split["num_shards"] == 1 else f"part{split['shard_index']:03d}-"
        self.layout = fp["extraction"].get("shard_layout", "tar")
        self.suffix = shards.suffix(self.layout)  # (refuses an unknown layout before any work)
        manifest = None
        if self.store.exists(self.name) and not overwrite:
            manifest = read_manifest(self.path)
            diff = fingerprint_diff(fingerprint(manifest), fp)
            if diff:
                raise CacheError(f"{self.store} holds a cache made with other {', '.join(diff)}; use a new --out or "
                                 "--overwrite")
        self.manifest = manifest if manifest is not None else new_manifest(fp, data_path, n_rows, split)
        self.resumed = manifest is not None
        self._pending: list[tuple[str, dict[str, bytes]]] = []
        self._rejects: list[dict] = []
        self._bytes = 0
        self._start = self.cursor
        self._t = time.time()
        self.new_shards = 0

    @property
    def complete(self) -> bool:
        return self.manifest["state"] == "complete"

    @property
    def cursor(self) -> int:
        """The first data row not yet in a complete shard."""
        sh = self.manifest["shards"]
        return sh[-1]["end"] if sh else self.manifest["data"]["split"]["start"]

    def add(self, index: int, members: dict[str, bytes]) -> None:
        self._pending.append((fmt.sample_key(index), members))
        self._bytes += sum(len(v) for v in members.values())

    def reject(self, row: int, sample_id: str, source: str, reason: str) -> None:
        self._rejects.append({"row": row, "id": sample_id, "source": source, "reason": reason})

    def full(self) -> bool:
        return len(self._pending) >= self.samples_per_shard or self._bytes >= self.max_shard_bytes

    def close_shard(self, upto: int) -> None:
        """Write the pending samples as the next shard covering rows [.., upto) and record it."""
        name = f"{self.prefix}{len(self.manifest['shards']):06d}{self.suffix}"
        nbytes, digest, per_payload = write_shard(self.store, name, self._pending, self.layout)
        metas = [json.loads(m["meta"]) for _, m in self._pending]
        self.manifest["shards"].append({
            "name": name, "start": self._start, "end": upto, "samples": len(self._pending),
            "tokens": sum(m["tokens"] for m in metas), "scored_tokens": sum(m["scored"] for m in metas),
            "visual_tokens": sum(m["visual_tokens"] for m in metas),
            "bytes": nbytes, "sha256": digest, "payload_bytes": per_payload, "rejects": self._rejects,
            "ids": [m["id"] for m in metas], "seconds": time.time() - self._t,
        })
        write_manifest(self.path, self.manifest)
        self._pending, self._rejects, self._start, self._bytes = [], [], upto, 0
        self.new_shards += 1
        self._t = time.time()

    def put_array(self, key: str, array: np.ndarray) -> None:
        """A cache-level array (e.g. the LM head's Gram matrix) as OUT/KEY.npy, recorded as manifest[key]."""
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        data = buf.getvalue()
        self.store.write(f"{key}.npy", data)
        self.manifest[key] = {"file": f"{key}.npy", "sha256": hashlib.sha256(data).hexdigest(),
                              "shape": list(array.shape)}

    def put_teacher_files(self, teacher: Path) -> None:
        """What a student is built from, so a copied cache needs no teacher folder: the teacher's
        tokenizer, processor, chat template and config, and its vision tower's weights (a student
        that starts from the teacher's encoder: `vision_from: teacher`)."""
        files = copy_teacher_files(teacher, self.store)
        vision = vision_weights(teacher)
        if vision:
            from safetensors.numpy import save

            self.store.write(f"{TEACHER_DIR}/{VISION_FILE}", save(vision))
            files.append(VISION_FILE)
        self.manifest["teacher_files"] = {"dir": TEACHER_DIR, "files": files}

    def put_validation(self, manifest_path: Path) -> None:
        """A validation manifest held in the cache (OUT/val/val.json, its images beside it), so that
        train-student evaluates from the cache alone. Rows are copied as they are, images renamed by row."""
        rows, copied = copy_validation(Path(manifest_path), self.store)
        self.manifest["validation"] = {"manifest": f"{VAL_DIR}/val.json", "rows": rows, "copied": copied,
                                       "source": str(Path(manifest_path).resolve())}

    def finish(self, end: int) -> dict:
        if self._pending or self._rejects:
            self.close_shard(end)
        self.manifest["state"] = "complete"
        write_manifest(self.path, self.manifest)
        write_rejects(self.store, self.manifest)
        return self.manifest


def write_rejects(store: Store, manifest: dict) -> None:
    """rejects.jsonl regenerated from the manifest: each reject exactly once, even across resumes."""
    lines = [json.dumps(r) for s in manifest["shards"] for r in s["rejects"]]
    name = "rejects.jsonl" if manifest["data"]["split"]["num_shards"] == 1 else \
        f"rejects.part-{manifest['data']['split']['shard_index']:03d}.jsonl"
    store.write(name, "".join(line + "\n" for line in lines).encode())


def merge_parts(out: str | Path) -> dict:
    """Join split jobs' part manifests into manifest.json: same fingerprint, contiguous disjoint rows."""
    store = Store(out)
    parts = store.names("manifest.part-*-of-*.json")
    if not parts:
        raise CacheError(f"{out}: no part manifests (manifest.part-*-of-*.json) to merge")
    ms = [read_manifest((store, p)) for p in parts]
    n = ms[0]["data"]["split"]["num_shards"]
    if len(ms) != n or sorted(m["data"]["split"]["shard_index"] for m in ms) != list(range(n)):
        have = sorted(m["data"]["split"]["shard_index"] for m in ms)
        raise CacheError(f"{out}: {n} parts expected, found indices {have}")
    ms.sort(key=lambda m: m["data"]["split"]["shard_index"])
    for p, m in zip(parts, ms, strict=True):
        diff = fingerprint_diff(fingerprint(ms[0]), fingerprint(m))
        if diff:
            raise CacheError(f"{p}: made with other {', '.join(diff)} than part 0; parts of one cache must agree")
        if m["state"] != "complete":
            raise CacheError(f"{p}: part is not complete; re-run its job first")
    for a, b in zip(ms, ms[1:], strict=False):
        if a["data"]["split"]["end"] != b["data"]["split"]["start"]:
            raise CacheError(f"{out}: parts do not tile the data rows ({a['data']['split']} then {b['data']['split']})")
    ids: set[str] = set()
    for m in ms:
        for s in m["shards"]:
            dup = ids.intersection(s["ids"])
            if dup:
                raise CacheError(f"{out}: sample id(s) {sorted(dup)[:5]} appear in two parts")
            ids.update(s["ids"])
    merged = {**ms[0], "shards": [s for m in ms for s in m["shards"]], "state": "complete",
              "startup_seconds": sum(m.get("startup_seconds", 0.0) for m in ms)}
    merged["data"] = {**ms[0]["data"], "split": {"num_shards": 1, "shard_index": 0, "start": 0,
                                                 "end": ms[-1]["data"]["split"]["end"], "merged_parts": n}}
    t = {k: sum(len(s[k]) if k == "rejects" else s[k] for s in merged["shards"]) for k in ("samples", "rejects")}
    merged["counts"] = {"rows": merged["data"]["split"]["end"], **t}
    if t["samples"] == 0:
        raise DataError(f"{out}: the {n} parts hold no usable sample ({t['rejects']} rows rejected)")
    write_manifest((store, MANIFEST), merged)
    write_rejects(store, merged)
    return merged


def convert_layout(src: str | Path, dest: str | Path, layout: str) -> dict:
    """A complete cache rewritten in another shard layout (tar <-> parquet) at DEST, with no teacher:
    every sample's member bytes as they were, shard by shard (same names but the suffix, same rows,
    fresh sizes and checksums), the other files copied; the manifest records the new layout (and so
    has another fingerprint: the shards' bytes differ)."""
    from vlmkd.cache.reader import CacheReader

    suffix = shards.suffix(layout)
    reader = CacheReader(src, payloads=())  # (refuses a cache whose job has not finished)
    out = Store(dest)
    if out.exists(MANIFEST):
        raise CacheError(f"{dest} already holds a cache; convert into a new folder")
    out.makedirs()
    names = {s["name"] for s in reader.shards}
    for name in reader.store.files():
        if name not in names and name != MANIFEST:
            out.write(name, reader.store.read(name))
    new = json.loads(json.dumps(reader.manifest))
    new["extraction"].pop("shard_layout", None)
    if layout != "tar":  # a tar cache records no layout (the default), as cache-teacher writes it
        new["extraction"]["shard_layout"] = layout
    for rec in new["shards"]:
        data = reader.read_shard(rec)
        samples = list(shards.iter_members(data, rec["name"]))
        rec["name"] = rec["name"].rsplit(".", 1)[0] + suffix
        rec["bytes"], rec["sha256"], _ = write_shard(out, rec["name"], samples, layout)
    write_manifest((out, MANIFEST), new)
    return new


__all__ = ["CacheWriter", "convert_layout", "merge_parts", "remove_temporaries", "write_rejects", "write_shard"]
