"""Training a seed ensemble: `train.ensemble` = K members, member i trained with seed + i.

Member i is trained with exactly the config of a single run with `train.seed = seed + i` (its
fingerprint ignores `train.ensemble`), so its weights are that run's and an ensemble's numbers can
be checked against single-seed runs. Each member has its own checkpoint directory
(`<checkpoint_dir>/member-<i>`, so a retry resumes each where it stopped) and progress label.
The pipeline fans members out on the fit pool (tasks/orchestration/fits.py: inline with one
worker); a backtest period, itself one fit of a pool, trains them one after another. K = 1 is
the single network, trained exactly as before.

Members train without a run id (their per-epoch metrics would collide under one run's keys);
their histories are logged afterwards as `ensemble/member<i>/<metric>` per epoch, with each
member's `best_epoch` and `best_valid_rank_ic`, and `ensemble/size` (K; also the run's param
`train.ensemble`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from alphaloom.model.ensemble import SeedEnsemble
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.common.storage import FsPath, Location, atomic_file
from alphaloom.tasks.orchestration.fits import fit_pool
from alphaloom.tasks.orchestration.retries import retry_transient
from alphaloom.tasks.training.checkpoint import cpu_state, load_weights
from alphaloom.tasks.training.progress import ProgressReporter
from alphaloom.tasks.training.train import (
    TrainResult,
    batches_per_epoch,
    build_model,
    model_dims,
    train_model,
    train_task,
)

log = logging.getLogger(__name__)

ENSEMBLE_STATE_NAME = "ensemble_state.pt"


@dataclass
class MemberFit:
    """One member's training, without the live module (it may come from another process)."""

    index: int
    seed: int
    best_epoch: int
    best_val_rank_ic: float
    model_state_path: str
    device: str
    history: list[dict[str, float]] = field(default_factory=list)


def member_config(cfg: PipelineConfig, index: int) -> PipelineConfig:
    """The single-run config member `index` trains with: `train.seed + index`, no ensemble."""
    train = cfg.train.model_copy(update={"seed": cfg.train.seed + index, "ensemble": 1})
    return cfg.model_copy(update={"train": train})


def member_dir(checkpoint_dir: Location, index: int) -> FsPath:
    """Member `index`'s own checkpoint directory under the ensemble's."""
    return FsPath.of(checkpoint_dir) / f"member-{index}"


def member_label(cfg: PipelineConfig, index: int, prefix: str = "") -> str:
    """The member's progress label, e.g. "period 2/5 member 1/3 seed 7"."""
    text = f"member {index + 1}/{cfg.train.ensemble} seed {cfg.train.seed + index}"
    return f"{prefix} {text}".strip()


def _fit_of(index: int, seed: int, result: TrainResult) -> MemberFit:
    return MemberFit(
        index, seed, result.best_epoch, result.best_val_rank_ic, result.model_state_path,
        result.device, list(result.history),
    )  # fmt: skip


def fit_member(
    shard_dir: str, cfg: PipelineConfig, checkpoint_dir: str, index: int, label: str = ""
) -> MemberFit:
    """Train (or resume) member `index` of `cfg`'s ensemble in its own checkpoint directory."""
    mcfg = member_config(cfg, index)
    reporter = ProgressReporter(
        mcfg.train.epochs,
        batches_per_epoch(shard_dir, mcfg),
        artifact=False,
        label=member_label(cfg, index, label),
    )
    try:
        result = train_model(shard_dir, mcfg, member_dir(checkpoint_dir, index), progress=reporter)
    finally:
        reporter.close()
    return _fit_of(index, mcfg.train.seed, result)


member_task = task(
    name="train-member",
    task_run_name="member-{index}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,  # a retry resumes from the member's checkpoint
    timeout_seconds=12 * 3600,
    cache_policy=NO_CACHE,
    persist_result=False,
)(fit_member)


def load_member(shard_dir: str | Path, cfg: PipelineConfig, fit: MemberFit) -> nn.Module:
    """The member's best network from its weights file (`weights_only=True`), in eval mode."""
    from alphaloom.model.shard_set import ShardSetInfo

    model = build_model(ShardSetInfo.open(shard_dir), member_config(cfg, fit.index))
    model.load_state_dict(load_weights(fit.model_state_path))
    return model.eval()


def ensemble_result(
    shard_dir: str | Path,
    cfg: PipelineConfig,
    checkpoint_dir: Location,
    fits: list[MemberFit],
    models: list[nn.Module],
) -> TrainResult:
    """One TrainResult for the ensemble: its weights in one file, the members' fits listed.

    `best_epoch` is the latest of the members' best epochs and `best_val_rank_ic` their mean
    (the ensemble's own validation figures come from evaluating it).
    """
    from alphaloom.model.shard_set import ShardSetInfo

    ensemble = SeedEnsemble([model.cpu() for model in models]).eval()
    path = FsPath.of(checkpoint_dir) / ENSEMBLE_STATE_NAME
    with atomic_file(path) as tmp:
        torch.save(cpu_state(ensemble), tmp)
    info = ShardSetInfo.open(shard_dir)
    return TrainResult(
        model=ensemble,
        best_epoch=max(fit.best_epoch for fit in fits),
        best_val_rank_ic=sum(fit.best_val_rank_ic for fit in fits) / len(fits),
        history=[],
        model_state_path=str(path),
        dims=model_dims(info),
        feature_names=list(info.feature_names),
        device=fits[0].device,
        members=[member_record(fit) for fit in fits],
    )


def member_record(fit: MemberFit) -> dict[str, float]:
    """What is logged and recorded of a member: seed, best epoch, best validation Rank IC."""
    return {
        "seed": float(fit.seed),
        "best_epoch": float(fit.best_epoch),
        "best_valid_rank_ic": fit.best_val_rank_ic,
    }


def log_members(cfg: PipelineConfig, run_id: str | None, fits: list[MemberFit]) -> None:
    """Each member's best epoch and validation Rank IC, and its per-epoch history."""
    if run_id is None:
        return
    from alphaloom.tasks.tracking import runs

    run = runs.TrackedRun.of(cfg, run_id)
    run.log_metrics({"ensemble/size": float(len(fits))})
    for fit in fits:
        prefix = f"ensemble/member{fit.index}"
        run.log_metrics({f"{prefix}/{key}": value for key, value in member_record(fit).items()})
        for row in fit.history:
            step = int(row["epoch"])
            metrics = {f"{prefix}/{key}": value for key, value in row.items() if key != "epoch"}
            run.log_metrics(metrics, step=step)


def train_members(
    shard_dir: str,
    cfg: PipelineConfig,
    checkpoint_dir: str,
    run_id: str | None = None,
    label: str = "",
) -> TrainResult:
    """All K members one after another in this process (a backtest period's network)."""
    fits = [fit_member(shard_dir, cfg, checkpoint_dir, i, label) for i in range(cfg.train.ensemble)]
    models = [load_member(shard_dir, cfg, fit) for fit in fits]
    log_members(cfg, run_id, fits)
    return ensemble_result(shard_dir, cfg, checkpoint_dir, fits, models)


Trainer = Callable[..., TrainResult]


def fit_ensemble(
    train: Trainer, shard_dir: str, cfg: PipelineConfig, checkpoint_dir: str, run_id: str | None
) -> TrainResult:
    """The pipeline's train step: `train(...)` as always when K = 1; else K members, fanned
    out on the fit pool when `train` is the default `train_task`, one after another through
    `train` otherwise (e.g. the DDP launcher), then one ensemble result."""
    size = cfg.train.ensemble
    if size == 1:
        return train(shard_dir, cfg, checkpoint_dir, run_id)
    if train is train_task:
        with fit_pool(cfg, size) as pool:
            submitted = [
                pool.submit(
                    member_task,
                    shard_dir=shard_dir,
                    cfg=cfg,
                    checkpoint_dir=checkpoint_dir,
                    index=i,
                )
                for i in range(size)
            ]
            states = [fit.state() for fit in submitted]
        fits: list[MemberFit] = [state.result() for state in states]  # raises a failed member's
        models = [load_member(shard_dir, cfg, fit) for fit in fits]
    else:
        results = [
            train(shard_dir, member_config(cfg, i), str(member_dir(checkpoint_dir, i)), None)
            for i in range(size)
        ]
        fits = [_fit_of(i, cfg.train.seed + i, r) for i, r in enumerate(results)]
        models = [result.model for result in results]
    log_members(cfg, run_id, fits)
    log.info("seed ensemble of %d: %s", size, [member_record(fit) for fit in fits])
    return ensemble_result(shard_dir, cfg, checkpoint_dir, fits, models)


def fit_details(result: TrainResult) -> dict[str, Any]:
    """A trained network's fit figures for a record (a backtest period's): best epoch and
    validation Rank IC, and each member's when it is an ensemble."""
    details: dict[str, Any] = {
        "best_epoch": float(result.best_epoch),
        "best_valid_rank_ic": result.best_val_rank_ic,
    }
    if result.members:
        details["members"] = list(result.members)
    return details
