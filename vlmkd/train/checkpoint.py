"""Checkpoints: HF-format weights (safetensors) + optimizer state + a JSON state, written atomically.

The JSON state holds the stage, the step and the data cursor; a resumed run continues from exactly
that step and sample, so its loss curve is the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from vlmkd.models.build import save_model

CKPT = "checkpoint"


def save_checkpoint(run_dir: Path, model, tok, optimizer, state: dict, extra: dict | None = None,
                    model_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """`model_state` / `optimizer_state`: the gathered full states when the model is FSDP-sharded
    (optimizer state keyed by parameter name then), so any world size can resume."""
    final = run_dir / CKPT
    tmp = run_dir / f"{CKPT}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tok, tmp, state_dict=model_state)
    torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
    if extra:
        torch.save(extra, tmp / "objective.pt")  # learned loss-side modules (e.g. width projections)
    state = {**state, "torch_rng": torch.get_rng_state().tolist()}
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = run_dir / f"{CKPT}.old"
    if old.exists() and final.exists():
        shutil.rmtree(old)  # leftover of a run killed while deleting it (renaming onto it would fail)
    if final.exists():
        final.rename(old)
    tmp.rename(final)  # the checkpoint is either the old one or the new one, never half
    if old.exists():
        shutil.rmtree(old)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a crash between the two renames leaves `.old` complete)."""
    for name in (CKPT, f"{CKPT}.old"):
        p = run_dir / name
        if (p / "state.json").is_file():
            return p
    return None


def load_state(ckpt: Path) -> dict:
    state = json.loads((ckpt / "state.json").read_text())
    torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
    return state
