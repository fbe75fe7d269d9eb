"""Training: AdamW + cosine schedule + clipping, early stopping on validation Rank IC, resumable.

Every epoch ends with an atomic checkpoint holding everything the next epoch depends on (model,
optimiser, scheduler, loss state, loader state, RNG states, best state, history), saved as plain
tensors and Python values so it loads with `torch.load(weights_only=True)`. A retried task that
finds the checkpoint continues from the last finished epoch and, because batch order is a pure
function of (seed, epoch) and the RNG states are restored, ends with exactly the weights of an
uninterrupted run. A finished checkpoint makes a retry return at once.

Device: CUDA (bf16 autocast) -> MPS -> CPU unless `train.device` says otherwise. Under torchrun
the model is wrapped in DistributedDataParallel, the loader takes (rank, world size), rank 0
validates, checkpoints and logs, and the stop decision is broadcast.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from alphaloom.model.batch import Batch
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.common.hashing import hash_json
from alphaloom.tasks.common.storage import FsPath, Location, atomic_file
from alphaloom.tasks.evaluation.metrics import ic_metrics
from alphaloom.tasks.evaluation.predictions import predict
from alphaloom.tasks.orchestration.caching import stage_dir
from alphaloom.tasks.orchestration.retries import retry_transient
from alphaloom.tasks.training.checkpoint import (
    BEST_STATE_NAME,
    CHECKPOINT_NAME,
    check_same_start,
    cpu_state,
    resume_or_fresh,
    save_checkpoint,
)
from alphaloom.tasks.training.progress import (
    ProgressFn,
    ProgressReporter,
    TrainProgress,
    epoch_line,
)
from alphaloom.tasks.training.runtime import (
    autocast_for,
    broadcast_from_rank0,
    dist_info,
    epoch_batch_limit,
    seed_everything,
    select_device,
    unwrap,
)
from alphaloom.tasks.training.state import LOSS_TERMS, TrainingParts, TrainState

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """The best model (weights loaded, eval mode) and how it got there."""

    model: nn.Module
    best_epoch: int
    best_val_rank_ic: float
    history: list[dict[str, float]]
    model_state_path: str  # the best weights: a local path or a URL
    dims: dict[str, int]
    feature_names: list[str]
    device: str
    resumed_at: tuple[int, int] | None = None  # (epoch, batch) a retry resumed from
    members: list[dict[str, float]] = field(default_factory=list)  # a seed ensemble's fits


# ----------------------------------------------------------------------------------------------
# building blocks


def model_dims(info: Any) -> dict[str, int]:
    """SequenceModel's size arguments from a shard set (a `ShardSetInfo`)."""
    sizes = info.sizes()
    return {k: int(sizes[k]) for k in ("n_features", "text_dim", "n_industries", "n_indices")}


def build_model(info: Any, cfg: PipelineConfig) -> nn.Module:
    """SequenceModel sized from the shard set."""
    from alphaloom.model.network import SequenceModel

    return SequenceModel(cfg.model, **model_dims(info))


def build_optimizer(model: nn.Module, cfg: PipelineConfig) -> torch.optim.Optimizer:
    """AdamW; biases, norms and embedding tables get no weight decay (decaying them only hurts)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or name.startswith("embeddings.") or "norm" in name
        (no_decay if exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


def lr_factor(epoch: int, cfg: PipelineConfig) -> float:
    """Per-epoch LR multiplier: cosine from 1 down to 0.05 over `train.epochs`, or constant."""
    if cfg.train.schedule == "constant" or cfg.train.epochs <= 1:
        return 1.0
    progress = min(epoch, cfg.train.epochs - 1) / (cfg.train.epochs - 1)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: PipelineConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepped once per epoch (early stopping makes per-step horizons moot)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg))


def fingerprint(cfg: PipelineConfig, shard_dir: str | Path) -> str:
    """What a checkpoint is valid for: the shard set and every setting training reads."""
    sections = {
        name: getattr(cfg, name).model_dump(mode="json")
        for name in ("model", "loss", "loader", "train")
    }
    for volatile in ("device", "num_threads", "checkpoint_every_batches", "progress_every_batches"):
        sections["train"].pop(volatile, None)  # resuming on another device is fine
    sections["train"].pop("ensemble", None)  # a member trains what a single run would
    sections["loader"].pop("num_workers", None)
    sections["loader"].pop("prefetch", None)
    manifest_hash = (FsPath.of(shard_dir) / "manifest.json").sha256()
    return hash_json({"sections": sections, "manifest": manifest_hash})


def train_loader(info: Any, cfg: PipelineConfig, device: torch.device) -> Any:
    """The shuffled, rank-aware training stream (rank/world size from torch.distributed)."""
    from alphaloom.model.dataset import ShardedWindowDataset
    from alphaloom.model.device_loader import WindowLoader

    rank, world = dist_info()
    dataset = ShardedWindowDataset(
        info,
        "train",
        batch_size=cfg.loader.batch_size,
        pool_shards=cfg.loader.pool_shards,
        min_valid_days=cfg.loader.min_valid_days,
        seed=cfg.train.seed,
        shuffle=True,
        prefetch=cfg.loader.prefetch,
        equalize=cfg.loader.equalize,
        rank=rank,
        world_size=world,
        group_by_date=groups_by_date(cfg),
    )
    return WindowLoader(dataset, num_workers=cfg.loader.num_workers, device=device)


def groups_by_date(cfg: PipelineConfig) -> bool:
    """loader.group_by_date, or when unset: whether the per-day ranking term needs it."""
    if cfg.loader.group_by_date is None:
        return cfg.loss.rank_weight > 0
    return cfg.loader.group_by_date


def validate(
    model: nn.Module, shard_dir: str | Path, cfg: PipelineConfig, device: torch.device
) -> dict[str, float]:
    """IC and Rank IC of the model on the validation split (unshuffled, all windows)."""
    metrics = ic_metrics(predict(model, shard_dir, "valid", cfg, device=device))
    return {"ic": metrics["ic"], "rank_ic": metrics["rank_ic"]}


# ----------------------------------------------------------------------------------------------
# the loop


def _setup(shard_dir: str | Path, cfg: PipelineConfig, device: torch.device) -> TrainingParts:
    """Seeded construction of model, optimiser, scheduler, loss and loader."""
    from alphaloom.model.losses import build_loss
    from alphaloom.model.shard_set import ShardSetInfo

    seed_everything(cfg.train.seed)
    info = ShardSetInfo.open(shard_dir)
    model = build_model(info, cfg)
    if cfg.model.score == "class_values":
        from alphaloom.tasks.training.class_values import fit_class_values

        values = fit_class_values(info)
        log.info("class values fitted on the training split: %s", values.round(4).tolist())
        model.set_class_values(values)
    model = model.to(device)
    wrapped: nn.Module = model
    if dist_info()[1] > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = build_optimizer(model, cfg)
    return TrainingParts(
        info=info,
        device=device,
        model=wrapped,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg),
        loss=build_loss(cfg.loss).to(device),
        loader=train_loader(info, cfg, device),
    )


def _join_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's Join lets a rank that runs out of batches first finish without a hang."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.join import Join

        return Join([model])
    return contextlib.nullcontext()


def batch_loss(model: nn.Module, loss: nn.Module, logits: torch.Tensor, batch: Batch) -> dict:
    """The loss terms of a batch's float32 logits; the per-day ranking term, when on, also gets
    the model's score and the batch's returns and days."""
    if loss.needs_days:
        score = unwrap(model).score(logits)
        return loss(logits, batch["label"], score, batch["fwd_return"], batch["date"])
    return loss(logits, batch["label"])


def _train_step(parts: TrainingParts, batch: Batch, cfg: PipelineConfig) -> torch.Tensor:
    """Forward (bf16 autocast on CUDA), loss in float32, backward, clip, step.

    Returns the detached loss terms [4] on the device: reading them would force a GPU sync
    per step, which stops the loader's CPU work from overlapping the GPU's.
    """
    model, optimizer = parts.model, parts.optimizer
    with autocast_for(parts.device):
        logits = model(batch)
    terms = batch_loss(model, parts.loss, logits.float(), batch)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if cfg.train.grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    return torch.stack([terms[key].detach() for key in LOSS_TERMS])


def checkpoint_due(state: TrainState, cfg: PipelineConfig) -> bool:
    """Whether this process writes a mid-epoch checkpoint after the batch just trained: rank 0,
    every `train.checkpoint_every_batches` batches."""
    every = cfg.train.checkpoint_every_batches
    return every is not None and state.batch % every == 0 and dist_info()[0] == 0


def _fold_losses(acc: torch.Tensor, state: TrainState) -> None:
    """Add the loss sums accumulated on the device to `state.sums` and zero them."""
    for key, value in zip(LOSS_TERMS, acc.tolist(), strict=True):
        state.sums[key] += value
    acc.zero_()


def train_epoch(
    parts: TrainingParts,
    state: TrainState,
    cfg: PipelineConfig,
    on_batch: Callable[[TrainState], None],
    progress: ProgressFn | None,
) -> dict[str, float]:
    """Train `state.epoch` from batch `state.batch` on; returns sample-weighted mean losses.

    `on_batch(state)` runs after every batch (train_model's: the mid-epoch checkpoint). Loss
    sums accumulate on the device and are folded into `state` only before a checkpoint and at
    the end, so the loop never waits for the GPU.
    """
    loader = parts.loader
    if state.batch == 0:
        loader.set_epoch(state.epoch)
    else:
        loader.load_state_dict({"epoch": state.epoch, "batches": state.batch})
    parts.model.train()
    parts.loss.train()
    limit = epoch_batch_limit(cfg, parts.info)
    every = cfg.train.progress_every_batches
    acc = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=parts.device)
    stream = iter(loader)
    try:
        with _join_context(parts.model):
            while limit is None or state.batch < limit:
                batch = next(stream, None)
                if batch is None:
                    break
                terms = _train_step(parts, batch, cfg)
                rows = int(batch["label"].shape[0])
                acc += terms.double() * rows
                state.seen += rows
                state.batch += 1
                if checkpoint_due(state, cfg):
                    _fold_losses(acc, state)  # the checkpoint holds the sums so far
                on_batch(state)
                if progress is not None and state.batch % every == 0:
                    metrics = dict(zip(LOSS_TERMS, terms.tolist(), strict=True))
                    progress(
                        TrainProgress("batch", state.epoch, cfg.train.epochs, state.batch, metrics)
                    )
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stops the prefetch thread of a half-consumed pool
    _fold_losses(acc, state)
    if state.seen == 0:
        raise RuntimeError(f"epoch {state.epoch}: the training loader yielded no batch")
    return {key: state.sums[key] / state.seen for key in LOSS_TERMS}


def _close_epoch(
    state: TrainState,
    train_terms: dict[str, float],
    val: dict[str, float],
    lr: float,
    model: nn.Module,
    cfg: PipelineConfig,
) -> dict[str, float]:
    """Record the epoch, keep the best state, count patience, reset the epoch counters."""
    row = {
        "epoch": float(state.epoch),
        **{f"train/{key}": train_terms[key] for key in LOSS_TERMS},
        "valid/ic": val["ic"],
        "valid/rank_ic": val["rank_ic"],
        "lr": lr,
    }
    state.history.append(row)
    score = val["rank_ic"] if math.isfinite(val["rank_ic"]) else -math.inf
    if state.best_state is None or score > state.best_score:
        state.best_score, state.best_epoch = score, state.epoch
        state.best_state = cpu_state(unwrap(model))
        state.bad_epochs = 0
    else:
        state.bad_epochs += 1
    state.start_next_epoch()
    state.finished = state.epoch >= cfg.train.epochs or state.bad_epochs >= cfg.train.patience
    return row


def train_model(
    shard_dir: str | Path,
    cfg: PipelineConfig,
    checkpoint_dir: Location,
    run_id: str | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train, resume from `checkpoint_dir`, or return the finished run there; best model back.

    Per-epoch metrics (`train/loss`, `train/focal`, `train/distance`, `valid/ic`, `valid/rank_ic`,
    `lr`) go to MLflow run `run_id` with step = epoch, from rank 0 only. `progress` is called
    after every batch and epoch (an exception raised there aborts training like a crash).
    """
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    device = select_device(cfg.train.device)
    rank, _ = dist_info()
    ckpt_path = FsPath.of(checkpoint_dir) / CHECKPOINT_NAME
    parts = _setup(shard_dir, cfg, device)
    fp = fingerprint(cfg, shard_dir)
    state, resumed = resume_or_fresh(ckpt_path, fp, parts)
    check_same_start(state, ckpt_path)
    resumed_at = (state.epoch, state.batch) if resumed else None

    def checkpoint_mid_epoch(state: TrainState) -> None:
        if checkpoint_due(state, cfg):
            save_checkpoint(ckpt_path, state, parts, fp)

    while not state.finished:
        started = time.perf_counter()
        train_terms = train_epoch(parts, state, cfg, checkpoint_mid_epoch, progress)
        trained = time.perf_counter()
        lr = parts.optimizer.param_groups[0]["lr"]
        parts.scheduler.step()
        if rank == 0:
            val = validate(unwrap(parts.model), shard_dir, cfg, device)
            epoch = state.epoch
            row = _close_epoch(state, train_terms, val, lr, parts.model, cfg)
            row["train_seconds"] = trained - started
            row["epoch_seconds"] = time.perf_counter() - started
            save_checkpoint(ckpt_path, state, parts, fp)
            _report_epoch(cfg, run_id, epoch, row, progress)
        else:
            state.start_next_epoch()
        state.finished = broadcast_from_rank0(state.finished)
    return _result(state, parts, FsPath.of(checkpoint_dir), resumed_at)


def _report_epoch(
    cfg: PipelineConfig,
    run_id: str | None,
    epoch: int,
    row: dict[str, float],
    progress: ProgressFn | None,
) -> None:
    """Log the epoch's row (every value at DEBUG), send it to MLflow and to `progress`, whose
    epoch line people read; without `progress` (a DDP job, a library call) that line is logged
    here, so every epoch has exactly one line at INFO."""
    log.debug("epoch %d: %s", epoch, {k: round(v, 5) for k, v in row.items()})
    if run_id is not None:
        from alphaloom.tasks.tracking import runs  # here: training runs without MLflow too

        metrics = {k: v for k, v in row.items() if k != "epoch"}
        runs.TrackedRun.of(cfg, run_id).log_metrics(metrics, step=epoch)
    event = TrainProgress("epoch", epoch, cfg.train.epochs, -1, dict(row))
    if progress is not None:
        progress(event)
    else:
        log.info("%s", epoch_line(event, cfg.train.epochs))


def _result(
    state: TrainState,
    parts: TrainingParts,
    checkpoint_dir: FsPath,
    resumed_at: tuple[int, int] | None,
) -> TrainResult:
    model = unwrap(parts.model)
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    model.eval()
    best_path = checkpoint_dir / BEST_STATE_NAME
    if dist_info()[0] == 0:
        with atomic_file(best_path) as tmp:
            torch.save(cpu_state(model), tmp)
    info = parts.info
    return TrainResult(
        model=model,
        best_epoch=state.best_epoch,
        best_val_rank_ic=state.best_score,
        history=state.history,
        model_state_path=str(best_path),
        dims=model_dims(info),
        feature_names=list(info.feature_names),
        device=str(parts.device),
        resumed_at=resumed_at,
    )


# ----------------------------------------------------------------------------------------------
# Prefect wrapper


def checkpoint_dir_for(cfg: PipelineConfig, run_id: str) -> FsPath:
    """`<work_dir>/checkpoints/<run id>` (a path or URL): a retried task of this run resumes
    there; another run starts fresh (its checkpoint would be for other data or settings)."""
    return stage_dir(cfg.work_dir, "checkpoints", run_id)


@task(
    name="train-model",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,  # IO/network/timeouts only: a data error fails at once
    timeout_seconds=12 * 3600,
    cache_policy=NO_CACHE,  # side effects (MLflow metrics); the checkpoint is the cache
    persist_result=False,  # the result holds a live nn.Module
)
def train_task(
    shard_dir: str, cfg: PipelineConfig, checkpoint_dir: str, run_id: str | None = None
) -> TrainResult:
    """Retries resume from the checkpoint in `checkpoint_dir` (see `train_model`).

    Shows epoch/batch progress bars and a Prefect progress artifact while it runs.
    """
    reporter = ProgressReporter(cfg.train.epochs, batches_per_epoch(shard_dir, cfg))
    try:
        return train_model(shard_dir, cfg, checkpoint_dir, run_id, progress=reporter)
    finally:
        reporter.close()


def batches_per_epoch(shard_dir: str | Path, cfg: PipelineConfig) -> int:
    """Training batches of one epoch on this process (for progress bars)."""
    from alphaloom.model.shard_set import ShardSetInfo

    _, world = dist_info()
    info = ShardSetInfo.open(shard_dir)
    windows = info.window_count("train", cfg.loader.min_valid_days)
    batches = math.ceil(windows / world / cfg.loader.batch_size)
    cap = epoch_batch_limit(cfg, info)
    return batches if cap is None else min(batches, cap)
