"""What the training loop carries: the parts it trains with and the state a checkpoint restores.

Why a module of its own: the loop (train.py) builds and steps both, and checkpoint.py saves and
restores both; each needs the types, and neither owns the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from alphaloom.model.device_loader import WindowLoader
    from alphaloom.model.shard_set import ShardSetInfo

LOSS_TERMS = ("loss", "focal", "distance", "rank")


@dataclass
class TrainingParts:
    """The seeded objects one training run is built from, on `device`.

    `model` is what the loop calls: the DistributedDataParallel wrapper under torchrun, else the
    model itself (`runtime.unwrap` gives the bare one).
    """

    info: ShardSetInfo
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss: nn.Module
    loader: WindowLoader


@dataclass
class TrainState:
    """Everything the loop carries across a checkpoint besides module/optimizer states."""

    epoch: int = 0  # epoch in progress (or next to start)
    batch: int = 0  # batches of `epoch` already trained
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_TERMS, 0.0))
    seen: int = 0  # samples of `epoch` already trained
    best_score: float = -math.inf
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    finished: bool = False

    def start_next_epoch(self) -> None:
        """Move on to the next epoch with its counters at zero (every rank, after each epoch)."""
        self.epoch += 1
        self.batch, self.seen = 0, 0
        self.sums = dict.fromkeys(LOSS_TERMS, 0.0)
