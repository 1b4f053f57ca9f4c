"""Stream a cache: shards in WebDataset order, split by rank and DataLoader worker, a seeded shuffle
buffer, only the asked payloads decoded, checksums verified, hostile members refused.

Position: within an epoch the order is a function of (seed, epoch, rank, worker), so a saved
(epoch, samples yielded) pair resumes exactly; skipped samples are not decoded.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vlmkd.cache import format as fmt
from vlmkd.cache.manifest import MANIFEST, read_manifest
from vlmkd.cache.shards import iter_members
from vlmkd.cache.store import Store
from vlmkd.errors import CacheError

__all__ = ["CacheDataset", "CacheReader", "decode_sample", "iter_members"]


def decode_sample(key: str, members: dict[str, bytes], payloads: tuple[str, ...], shard: str,
                  manifest: dict | None = None) -> dict:
    """The asked payloads of one sample; with the cache's `manifest`, each member may decompress only
    to what the sample's counts imply (`fmt.member_limit`)."""
    out: dict = {"key": key}
    try:
        meta = json.loads(members["meta"])
        out["id"] = meta["id"]
        out["prompt"] = meta.get("prompt", "")
        out["fields"] = meta.get("fields")  # the manifest row's scalar fields (None in caches before them)
        for p in payloads:
            if p not in members and p in fmt.VISUAL_PAYLOADS and meta.get("visual_tokens") == 0:
                continue  # a text-only sample has no image and nothing on visual tokens
            if p == "pref" and p not in members:
                continue  # a sample without a `rejected` answer has no pair (a caption beside the questions)
            if p not in members:
                raise CacheError(f"shard {shard}: sample {key} ({meta['id']}) has no {p!r} payload")
            if p == "image":  # the image files as on disk, all of a sample's (format 2: `images` has the 2nd on)
                more = fmt.decode_images(members["images"]) if "images" in members else []
                if len(more) + 1 != meta.get("images", 1):
                    raise CacheError(f"shard {shard}: sample {key} ({meta['id']}) has {len(more) + 1} image files, its "
                                     f"meta says {meta.get('images', 1)}; refused")
                out["image"] = [members["image"], *more]
                continue
            limit = fmt.member_limit(p, meta, manifest) if manifest is not None else fmt.HARD_LIMIT
            with fmt.decompress_limit(limit):
                out.update(fmt.DECODERS[p](members[p]))
    except CacheError:
        raise
    except Exception as e:  # zstd, npy or JSON failure: corrupt bytes, or a pickled array refused
        member = fmt.member_name(key, p) if "p" in locals() else f"{key}.meta.json"
        raise CacheError(f"shard {shard}: member {member} of sample {key} cannot be decoded "
                         f"({type(e).__name__}: {e}); refused") from e
    return out


class CacheReader:
    """Iterate the samples of a cache folder (or fsspec URL of one)."""

    def __init__(self, cache: str | Path, payloads=("tokens", "topk"), verify: bool = True,
                 shuffle_buffer: int = 0, seed: int = 0, rank: int | None = None, world: int | None = None):
        self.store = Store(cache)
        self.root = self.store.root
        self.manifest = read_manifest((self.store, MANIFEST))
        if self.manifest["state"] != "complete":
            raise CacheError(f"{self.root}: the cache job has not finished (state {self.manifest['state']!r}); "
                             "re-run it to resume")
        unknown = set(payloads) - set(fmt.PAYLOADS)
        if unknown:
            raise CacheError(f"unknown payload(s) {sorted(unknown)}; the format has {fmt.PAYLOADS}")
        if "images" in payloads:  # a member, not a payload of its own
            raise CacheError("payload 'images' is read with 'image' (the list of all a sample's image files); "
                             "ask for 'image'")
        self.payloads = tuple(payloads)
        self.verify = verify
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.rank, self.world = rank or 0, world or 1

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    def __len__(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def check_tokenizer(self, student_sha: str, student_name: str = "student") -> None:
        have = self.manifest["tokenizer_sha256"]
        if have != student_sha:
            raise CacheError(f"cache {self.root} was built with tokenizer {have[:16]}..., the {student_name} has "
                             f"{student_sha[:16]}...: token ids would not mean the same; use a student with the "
                             "teacher's tokenizer or rebuild the cache")

    def gram(self) -> np.ndarray:
        g = self.manifest.get("gram")
        if not g:
            raise CacheError(f"{self.root}: the cache has no LM-head Gram matrix (extraction gram: false)")
        blob = self.store.read(g["file"])
        if self.verify and hashlib.sha256(blob).hexdigest() != g["sha256"]:
            raise CacheError(f"{self.root}/{g['file']}: checksum mismatch; the file is corrupt")
        return np.load(io.BytesIO(blob), allow_pickle=False)

    def read_shard(self, shard: dict) -> bytes:
        data = self.store.read(shard["name"])
        if self.verify:
            if len(data) != shard["bytes"]:
                raise CacheError(f"shard {shard['name']}: {len(data)} bytes, the manifest says {shard['bytes']}; "
                                 "truncated or replaced")
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise CacheError(f"shard {shard['name']}: checksum mismatch; the shard is corrupt")
        return data

    def my_shards(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[dict]:
        """This (rank, worker)'s shards for `epoch`: a seeded permutation, dealt round-robin to
        world * num_workers readers (every shard to exactly one of them)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        slots = self.world * num_workers
        me = self.rank * num_workers + worker
        return [self.shards[i] for i in order[me::slots]]

    def samples(self, epoch: int = 0, skip: int = 0, worker: int = 0, num_workers: int = 1) -> Iterator[dict]:
        """Decoded samples of one epoch for this rank/worker; the first `skip` are passed over undecoded."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 1])
        buf: list[tuple[str, dict[str, bytes], str]] = []
        n = 0

        def emit(entry):
            nonlocal n
            n += 1
            if n > skip:
                return decode_sample(entry[0], entry[1], self.payloads, entry[2], self.manifest)
            return None

        for shard in self.my_shards(epoch, worker, num_workers):
            for key, members in iter_members(self.read_shard(shard), shard["name"]):
                entry = (key, members, shard["name"])
                if self.shuffle_buffer <= 1:
                    if (s := emit(entry)) is not None:
                        yield s
                    continue
                if len(buf) < self.shuffle_buffer:
                    buf.append(entry)
                    continue
                j = int(rng.integers(len(buf)))
                buf[j], entry = entry, buf[j]
                if (s := emit(entry)) is not None:
                    yield s
        order = rng.permutation(len(buf))
        for j in order:
            if (s := emit(buf[j])) is not None:
                yield s

    def verify_all(self) -> list[str]:
        """Every problem found: checksum, tar structure, and every member decodes. [] when sound."""
        problems = []
        for shard in self.shards:
            try:
                data = self.read_shard(shard)
                n = 0
                for key, members in iter_members(data, shard["name"]):
                    decode_sample(key, members, tuple(p for p in members if p != "meta"), shard["name"], self.manifest)
                    n += 1
                if n != shard["samples"]:
                    problems.append(f"shard {shard['name']}: {n} samples, the manifest says {shard['samples']}")
            except CacheError as e:
                problems.append(str(e))
        if self.manifest.get("gram"):
            try:
                self.gram()
            except CacheError as e:
                problems.append(str(e))
        return problems


class CacheDataset(torch.utils.data.IterableDataset):
    """A torch IterableDataset over a CacheReader that splits shards across DataLoader workers."""

    def __init__(self, reader: CacheReader, epoch: int = 0, skip: int = 0):
        self.reader, self.epoch, self.skip = reader, epoch, skip

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        return self.reader.samples(self.epoch, self.skip if w == 0 else 0, w, nw)
