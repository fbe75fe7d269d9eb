"""Where training runs: device choice, bf16 autocast on CUDA, seeds, the distributed rank."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch


def select_device(requested: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU for "auto"; an explicit device that is absent is an error."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (requested == "cuda" and not cuda) or (requested == "mps" and not mps):
        raise RuntimeError(f"train.device is {requested!r} but no {requested} device is available")
    return torch.device(requested)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random; CPU kernels are then deterministic for a fixed seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not under torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (identity without DDP)."""
    _, world = dist_info()
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
