"""Where training runs: device choice, bf16 autocast on CUDA, seeds, the distributed rank."""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import numpy as np
import torch
from torch import nn


def select_device(requested: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU for "auto"; an explicit device that is absent is an error."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (requested == "cuda" and not cuda) or (requested == "mps" and not mps):
        raise RuntimeError(f"train.device is {requested!r} but no {requested} device is available")
    return torch.device(requested)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); full precision elsewhere.

    One context for every device, so the training step reads the same on CUDA, MPS and CPU."""
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


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's value on every rank (identity without DDP): rank 0 alone validates and decides
    to stop, and every rank must stop with it."""
    _, world = dist_info()
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise): its
    weights are what checkpoints hold and what validation and the caller get."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def epoch_batch_limit(cfg: Any, info: Any) -> int | None:
    """Batches this rank trains an epoch at most (None: the whole training split).

    `train.samples_per_epoch` (a fixed number of windows, whatever the market's size) or
    `train.epoch_fraction` (a share of the training windows) when set, else
    `train.max_batches_per_epoch`. Both count the windows of every DDP rank together.
    """
    train, (_, world) = cfg.train, dist_info()
    per_step = cfg.loader.batch_size * world
    if train.samples_per_epoch is not None:
        return max(1, math.ceil(train.samples_per_epoch / per_step))
    if train.epoch_fraction is not None:
        windows = info.window_count("train", cfg.loader.min_valid_days)
        return max(1, math.ceil(train.epoch_fraction * windows / per_step))
    return train.max_batches_per_epoch
