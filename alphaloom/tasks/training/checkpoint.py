"""Checkpoints that load with torch.load(weights_only=True).

The loop state, RNG states as plain tensors, atomic writes, and resuming from them. Every save
keeps the checkpoint it replaces as `checkpoint.prev.pt`; a checkpoint that cannot be read or
restored (truncated by a full disk or a power cut, overwritten) is set aside as
`<name>.corrupt` with one WARNING naming it, and training resumes from the previous one, or
starts from scratch when none is readable: a bad file never stops a run.
"""

from __future__ import annotations

import copy
import logging
import os
import posixpath
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from alphaloom.tasks.common.storage import FsPath, Location, atomic_file
from alphaloom.tasks.orchestration.caching import remove_stale_temps
from alphaloom.tasks.training.runtime import dist_info, unwrap
from alphaloom.tasks.training.state import TrainingParts, TrainState

log = logging.getLogger(__name__)


CHECKPOINT_NAME = "checkpoint.pt"


PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"  # the one each save replaced


CORRUPT_SUFFIX = ".corrupt"  # an unreadable checkpoint, set aside (the newest one of each name)


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


_STATE_FIELDS = tuple(TrainState.__dataclass_fields__)


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's weights: what a checkpoint and the best epoch keep (the
    live tensors change with the next step and may sit on a GPU)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _payload(state: TrainState, parts: TrainingParts, fp: str) -> dict[str, Any]:
    return {
        "version": CHECKPOINT_VERSION,
        "fingerprint": fp,
        "state": {name: getattr(state, name) for name in _STATE_FIELDS},
        "model": cpu_state(unwrap(parts.model)),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "loss": cpu_state(parts.loss),
        "loader": parts.loader.state_dict(),
        "rng": _rng_state(parts.device),
    }


def _sibling(path: Location, name: str) -> FsPath:
    """The file `name` in the directory of `path` (a local path or a URL)."""
    at = FsPath.of(path)
    url = at.url.rstrip("/")
    folder = url.rsplit("/", 1)[0] if "/" in url else "."
    return FsPath(at.fs, posixpath.join(posixpath.dirname(at.path), name), f"{folder}/{name}")


def previous_checkpoint(path: Location) -> FsPath:
    """Where the save before the one at `path` is kept (`checkpoint.prev.pt` beside it)."""
    name = FsPath.of(path).name
    stem = name[: -len(".pt")] if name.endswith(".pt") else name
    return _sibling(path, f"{stem}.prev.pt")


def _keep_previous(target: FsPath) -> None:
    """Move the checkpoint about to be replaced to `previous_checkpoint(target)` (locally a
    rename: a crash before the new one lands leaves only the previous one, which loading finds)."""
    if not target.is_file():
        return
    previous = previous_checkpoint(target)
    if target.local is not None:
        os.replace(target.path, previous.path)
    else:
        target.fs.copy(target.path, previous.path)


def _sync(path: Any) -> None:
    """Flush a written file to the disk, so a power cut cannot leave a renamed, empty file."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_checkpoint(path: Location, state: TrainState, parts: TrainingParts, fp: str) -> None:
    """Write the checkpoint atomically (temp file + rename): a crash leaves the previous one.
    The checkpoint it replaces is kept as `checkpoint.prev.pt`."""
    payload = _payload(state, parts, fp)
    target = FsPath.of(path)
    with atomic_file(target) as tmp:
        torch.save(payload, tmp)
        _sync(tmp)
        _keep_previous(target)


def load_weights(path: Location) -> Any:
    """`torch.load(..., weights_only=True)` of a local file or a URL: no code runs."""
    with FsPath.of(path).open() as handle:
        return torch.load(handle, map_location="cpu", weights_only=True)


class CheckpointError(RuntimeError):
    """A checkpoint file that exists but cannot be read; the message names it."""


def _reason(err: BaseException) -> str:
    """An error in one short line (torch's weights_only errors run over many)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 200 else f"{text[:197]}..."


def load_checkpoint(path: Location) -> dict[str, Any] | None:
    """The checkpoint at `path`, a file or URL (weights_only: no code runs while loading), or
    None; CheckpointError when the file is there but unreadable (truncated, corrupt)."""
    if not FsPath.of(path).is_file():
        return None
    try:
        loaded = load_weights(path)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is unreadable ({_reason(err)})") from err
    if not isinstance(loaded, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(loaded).__name__}, not a dict")
    return loaded


def _restore(ckpt: dict[str, Any], parts: TrainingParts) -> TrainState:
    unwrap(parts.model).load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    parts.loss.load_state_dict(ckpt["loss"])
    parts.loader.load_state_dict(ckpt["loader"])
    _restore_rng(ckpt["rng"], parts.device)
    return TrainState(**ckpt["state"])


def check_same_start(state: TrainState, ckpt_path: Location) -> None:
    """Under DDP every rank must start where rank 0 does; a checkpoint directory that only some
    ranks can see (not on a shared filesystem) would otherwise train them from different weights.
    Called by the loop right after `resume_or_fresh`, on every rank."""
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


def _set_aside(path: FsPath) -> str:
    """Rename an unreadable checkpoint to `<name>.corrupt` (rank 0 only: one writer), so the next
    save does not keep it as the previous one; returns where it went, or '' if it stayed."""
    if dist_info()[0] != 0:
        return ""
    aside = _sibling(path, path.name + CORRUPT_SUFFIX)
    try:
        if path.local is not None:
            os.replace(path.path, aside.path)
        else:
            path.fs.mv(path.path, aside.path)
    except (OSError, ValueError):
        return ""
    return str(aside)


def resume_or_fresh(ckpt_path: Location, fp: str, parts: TrainingParts) -> tuple[TrainState, bool]:
    """The state to start from, and whether it came from a checkpoint: the checkpoint at
    `ckpt_path`, else the previous one kept beside it, else a fresh start (`parts` restored in
    place). An unreadable or unrestorable file costs one WARNING naming it (and is set aside),
    never the run; the fresh parts are restored if a restore fails half-way."""
    candidates = [FsPath.of(ckpt_path), previous_checkpoint(ckpt_path)]
    if dist_info()[0] == 0:
        remove_stale_temps(ckpt_path)  # a killed save's `.checkpoint.pt.tmp-*`
    fresh: dict[str, Any] | None = None
    for number, path in enumerate(candidates):
        try:
            ckpt = load_checkpoint(path)
            if ckpt is None:
                continue
            if ckpt.get("version") != CHECKPOINT_VERSION or ckpt.get("fingerprint") != fp:
                log.warning(
                    "checkpoint %s was written for other inputs or settings; starting fresh", path
                )
                return TrainState(), False
            fresh = fresh or copy.deepcopy(_payload(TrainState(), parts, fp))
            state = _restore(ckpt, parts)
        except Exception as err:
            if fresh is not None:
                _restore(fresh, parts)  # undo a half-done restore
            problem = str(err)
            if not isinstance(err, CheckpointError):
                problem = f"checkpoint {path} cannot be restored ({_reason(err)})"
            aside = _set_aside(path)
            later = [p for p in candidates[number + 1 :] if p.is_file()]
            then = f"trying {later[0]}" if later else "training restarts from scratch"
            moved = f"; moved to {aside}" if aside else ""
            log.warning("%s%s; %s", problem, moved, then)
            continue
        log.info("resuming from %s at epoch %d, batch %d", path, state.epoch, state.batch)
        return state, True
    return TrainState(), False
