"""torch.distributed plumbing for the trainer: who am I, average gradients and logs, rank 0 writes.

Started by `torchrun` (any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR): gloo on CPU, NCCL on
GPUs. Gradients are averaged by hand after each backward (the all-reduce DDP does), which keeps the
loss-side parameters (a recipe's learned projections) and per-stage freezing in one simple path.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return dist_info()[0] == 0


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    _, world = dist_info()
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    o = 0
    for g in grads:
        g.copy_(flat[o : o + g.numel()].view_as(g))
        o += g.numel()


def average_logs(logs: dict[str, float]) -> dict[str, float]:
    _, world = dist_info()
    if world == 1 or not logs:
        return logs
    keys = sorted(logs)
    t = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t, strict=True)}


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()
