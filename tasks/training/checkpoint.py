"""Checkpoints that load with torch.load(weights_only=True).

The loop state, RNG states as plain tensors, atomic writes, and resuming from them.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from alphaloom.tasks.common.storage import FsPath, Location, atomic_file
from alphaloom.tasks.training.runtime import (
    dist_info,
)

log = logging.getLogger(__name__)


CHECKPOINT_NAME = "checkpoint.pt"


BEST_STATE_NAME = "best_model.pt"


CHECKPOINT_VERSION = 2  # 2: the rank term joined the loss terms


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _python_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_rest"]
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _State:
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


LOSS_TERMS = ("loss", "focal", "distance", "rank")


_STATE_FIELDS = tuple(_State.__dataclass_fields__)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(path: Location, state: _State, parts: dict[str, Any], fp: str) -> None:
    """Write the checkpoint atomically (temp file + rename): a crash leaves the previous one."""
    payload = {
        "version": CHECKPOINT_VERSION,
        "fingerprint": fp,
        "state": {name: getattr(state, name) for name in _STATE_FIELDS},
        "model": _cpu_state(_unwrap(parts["model"])),
        "optimizer": parts["optimizer"].state_dict(),
        "scheduler": parts["scheduler"].state_dict(),
        "loss": _cpu_state(parts["loss"]),
        "loader": parts["loader"].state_dict(),
        "rng": _rng_state(parts["device"]),
    }
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def load_weights(path: Location) -> Any:
    """`torch.load(..., weights_only=True)` of a local file or a URL: no code runs."""
    with FsPath.of(path).open() as handle:
        return torch.load(handle, map_location="cpu", weights_only=True)


def load_checkpoint(path: Location) -> dict[str, Any] | None:
    """The checkpoint at `path`, a file or URL (weights_only: no code runs while loading), or
    None."""
    if not FsPath.of(path).is_file():
        return None
    try:
        return load_weights(path)
    except Exception as err:
        raise RuntimeError(
            f"checkpoint {path} is unreadable ({err}); delete it to restart"
        ) from err


def _restore(ckpt: dict[str, Any], parts: dict[str, Any]) -> _State:
    _unwrap(parts["model"]).load_state_dict(ckpt["model"])
    parts["optimizer"].load_state_dict(ckpt["optimizer"])
    parts["scheduler"].load_state_dict(ckpt["scheduler"])
    parts["loss"].load_state_dict(ckpt["loss"])
    parts["loader"].load_state_dict(ckpt["loader"])
    _restore_rng(ckpt["rng"], parts["device"])
    return _State(**ckpt["state"])


def _check_same_start(state: _State, ckpt_path: Location) -> None:
    """Under DDP every rank must start where rank 0 does; a checkpoint directory that only some
    ranks can see (not on a shared filesystem) would otherwise train them from different weights."""
    _, world = dist_info()
    if world == 1:
        return
    starts: list[Any] = [None] * world
    torch.distributed.all_gather_object(starts, (state.epoch, state.batch))
    if len(set(starts)) > 1:
        raise RuntimeError(
            f"DDP ranks would start from different points (epoch, batch) {starts}: the "
            f"checkpoint {ckpt_path} must be on a filesystem every rank sees"
        )


def _resume_or_fresh(ckpt_path: Location, fp: str, parts: dict[str, Any]) -> tuple[_State, bool]:
    ckpt = load_checkpoint(ckpt_path)
    if ckpt is None:
        return _State(), False
    if ckpt.get("version") != CHECKPOINT_VERSION or ckpt.get("fingerprint") != fp:
        log.warning(
            "checkpoint %s was written for other inputs or settings; starting fresh", ckpt_path
        )
        return _State(), False
    state = _restore(ckpt, parts)
    log.info("resuming from %s at epoch %d, batch %d", ckpt_path, state.epoch, state.batch)
    return state, True
