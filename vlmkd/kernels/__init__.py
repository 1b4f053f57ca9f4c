"""LM head + sparse-target KD without a full [tokens x vocabulary] tensor (see chunked_kd)."""

from __future__ import annotations

import functools

import torch

from vlmkd.kernels.chunked_kd import IMPLS, linear_sparse_kd


@functools.cache
def triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def best_impl(device: torch.device) -> str:
    """The fused Triton path on a CUDA device where Triton imports; the chunked PyTorch path elsewhere."""
    return "triton" if torch.device(device).type == "cuda" and triton_usable() else "torch"


__all__ = ["IMPLS", "best_impl", "linear_sparse_kd", "triton_usable"]
