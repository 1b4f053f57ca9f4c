"""torch.distributed plumbing for the trainer: who am I, average gradients and logs, rank 0 writes.

Started by `torchrun` (any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR): gloo on CPU, NCCL on
GPUs. Gradients are averaged by hand after each backward (the all-reduce DDP does), which keeps the
loss-side parameters (a recipe's learned projections) and per-stage freezing in one simple path.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def train_device() -> torch.device:
    """This process's device: its GPU (LOCAL_RANK under torchrun) when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_from_env() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(train_device())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return dist_info()[0] == 0


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce mean of the replicated parameters' gradients; FSDP-sharded ones (DTensors) are
    reduce-scattered by FSDP itself and skipped."""
    _, world = dist_info()
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None and not _is_dtensor(p)]
    if not grads:
        return
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


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_model(model) -> None:
    """FSDP2 (`fully_shard`): each transformer block of the vision tower and the LLM, then the rest.
    Each rank keeps 1/world of every parameter, its gradient and its optimizer state."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if module.__class__.__name__.endswith(("DecoderLayer", "EncoderLayer")):
            fully_shard(module)
    fully_shard(model)


def is_sharded(model) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


def full_model_state(model) -> dict:
    """The whole model's state dict on every rank, on the CPU (a collective under FSDP: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name, on the CPU (a collective under FSDP): a
    checkpoint that any world size can load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    groups = state.get("param_groups") or [{}]
    if groups[0].get("params") and isinstance(groups[0]["params"][0], int):
        optimizer.load_state_dict(state)  # a checkpoint from before name-keyed optimizer state
        return
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
