"""`vlmkd cache inspect`: counts, sizes, bytes per scored token per payload, settings."""

from __future__ import annotations

from vlmkd.cache.manifest import totals


def summarize(manifest: dict) -> dict:
    t = totals(manifest)
    per_payload: dict[str, int] = {}
    for s in manifest["shards"]:
        for k, v in s["payload_bytes"].items():
            per_payload[k] = per_payload.get(k, 0) + v
    scored = max(1, t["scored_tokens"])
    return {
        "format_version": manifest["format_version"],
        "state": manifest["state"],
        "teacher": manifest["teacher"],
        "extraction": manifest["extraction"],
        "payload_backends": manifest.get("payload_backends", {}),
        "samples": t["samples"],
        "tokens": t["tokens"],
        "scored_tokens": t["scored_tokens"],
        "rejects": t["rejects"],
        "shards": t["shards"],
        "bytes": t["bytes"],
        "build_seconds": t["seconds"],
        "payload_bytes": per_payload,
        "bytes_per_token": {k: v / scored for k, v in per_payload.items()} | {"shard_total": t["bytes"] / scored},
    }
