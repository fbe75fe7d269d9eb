"""Baselines and ablations side by side: one parent MLflow run, one child run per variant and seed.

Variants are data (tasks/comparison/variants.py). Every variant trains on the same shard set
and splits, in its own checkpoint directory, and every kind (network, LightGBM, their blend)
goes through one scoring path (`score_and_log`: the prediction frame of each split into
`evaluate_predictions`, logged by `TrackedRun.log_evaluation`, the daily Rank IC series kept for
per-day paired tests), so every child run carries the same `valid/*` and `test/*` metric keys
and MLflow's compare view lines them up. Nothing is registered: a comparison never moves the
`champion` alias.

Runs are created with explicit ids through `tasks.tracking.runs.tracked_run` (child runs carry the
`mlflow.parentRunId` tag), never through MLflow's thread-local active run. A variant that fails
ends its child run FAILED and its row says so; the others still run.

The parent run logs `comparison.md`, `comparison.csv` and `rank_ic.png` (tasks/comparison/
summary.py): each cell is mean ± std over seeds, the gain column the mean ± std of the per-seed
paired difference reference (the full model) minus variant in test Rank IC, so seed noise shared
by both cancels, and a per-day paired t-statistic of the same difference.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from alphaloom.tasks.common.config import ConfigError, PipelineConfig
from alphaloom.tasks.comparison.variants import Variant, variant_config
from alphaloom.tasks.tracking import resume, runs

log = logging.getLogger(__name__)

REFERENCE = "full"
GAIN_METRIC = "test/rank_ic"
ORACLE_METRIC = "test/oracle_rank_ic"
TAG_KIND = "alphaloom.kind"
TAG_VARIANT = "alphaloom.variant"
TAG_SEED = "alphaloom.seed"
TAG_PARENT = "mlflow.parentRunId"
# (metric key, column title, decimals) of the comparison table
TABLE_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("test/rank_ic", "test Rank IC", 4),
    ("test/ic", "test IC", 4),
    ("test/rank_icir", "test Rank ICIR", 3),
    ("test/ls_sharpe", "L-S Sharpe", 2),
    ("test/accuracy", "test accuracy", 3),
    ("test/score_vol_corr", "score~vol", 3),
    ("test/q5_minus_q1", "Q5−Q1 return", 5),
    ("valid/rank_ic", "valid Rank IC", 4),
    ("fit_seconds", "fit s", 0),
)


# ----------------------------------------------------------------------------------------------
# one variant, one seed


@dataclass
class VariantOutcome:
    """What one (variant, seed) child run produced."""

    variant: str
    seed: int
    status: Literal["finished", "failed"]
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    # split -> {ISO date: that day's Rank IC}, for per-day paired tests between variants
    daily_rank_ic: dict[str, dict[str, float]] = field(default_factory=dict)


class VariantFailed(RuntimeError):
    """A variant's child run failed; carries the run id so its row can link it."""

    def __init__(self, variant: str, seed: int, run_id: str | None, cause: str) -> None:
        super().__init__(f"variant '{variant}' (seed {seed}) failed: {cause}")
        self.variant, self.seed, self.run_id, self.cause = variant, seed, run_id, cause

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.variant, self.seed, self.run_id, self.cause))


def child_tags(
    parent_run_id: str, variant: Variant, seed: int, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Tags of a child run: the parent link, the variant, its seed and overrides."""
    return {
        **(base or {}),
        TAG_PARENT: parent_run_id,
        TAG_KIND: "compare-variant",
        TAG_VARIANT: variant.name,
        TAG_SEED: str(seed),
        "alphaloom.variant_kind": variant.kind,
        "alphaloom.overrides": json.dumps(list(variant.overrides)),
    }


SplitPredictor = Callable[[str], pd.DataFrame]


@dataclass(frozen=True)
class Progress:
    """Where a (variant, seed) stands in the comparison, for its progress lines."""

    label: str  # "variant 3/20 cross_entropy seed 1"
    started: float  # time.time() when the comparison started


def score_and_log(
    cfg: PipelineConfig,
    run: runs.TrackedRun,
    predict_split: SplitPredictor,
    oracle: pd.DataFrame | None,
    figures: bool,
    exposures: pd.DataFrame | None = None,
    daily: dict[str, dict[str, float]] | None = None,
) -> dict[str, float]:
    """Score valid and test with `evaluate_predictions` and log `<split>/<metric>` (+ plots and
    the daily Rank IC series as `plots/<split>/daily_rank_ic.csv`, also put into `daily`).

    The one scoring path of every variant, network or LightGBM, so their metrics line up.
    """
    from alphaloom.tasks.evaluation.evaluate import evaluate_predictions
    from alphaloom.tasks.evaluation.metrics import daily_ic, labelled_rows

    flat: dict[str, float] = {}
    for split in ("valid", "test"):
        preds = predict_split(split)
        metrics, plots = evaluate_predictions(
            preds, cfg.evaluate, oracle, with_figures=figures, exposures=exposures
        )
        series = daily_ic(labelled_rows(preds), "spearman")
        plots["daily_rank_ic.csv"] = series.rename("rank_ic").rename_axis("date").reset_index()
        run.log_evaluation(split, metrics, plots)
        flat.update({f"{split}/{key}": value for key, value in metrics.items()})
        if daily is not None:
            daily[split] = {pd.Timestamp(d).date().isoformat(): float(v) for d, v in series.items()}
    return flat


def _fit_network(
    cfg: PipelineConfig, run: runs.TrackedRun, shard_dir: str, progress: Progress | None = None
) -> tuple[SplitPredictor, dict]:
    """Train in this run's own checkpoint dir (a retried task resumes there); never register."""
    from alphaloom.tasks.evaluation.predictions import predict
    from alphaloom.tasks.training.progress import ProgressReporter
    from alphaloom.tasks.training.train import checkpoint_dir_for, train_model

    started = time.perf_counter()
    reporter = None
    if progress is not None:
        reporter = ProgressReporter(
            cfg.train.epochs, None, artifact=False, label=progress.label, started=progress.started
        )
    try:
        result = train_model(
            shard_dir, cfg, checkpoint_dir_for(cfg, run.run_id), run.run_id, progress=reporter
        )
    finally:
        if reporter is not None:
            reporter.close()
    extra = {"fit_seconds": time.perf_counter() - started, "best_epoch": float(result.best_epoch)}

    def predict_split(split: str) -> pd.DataFrame:
        return predict(result.model, shard_dir, split, cfg, device=result.device)

    return predict_split, extra


def _fit_lightgbm(
    cfg: PipelineConfig, variant: Variant, seed: int, run: runs.TrackedRun, shard_dir: str
) -> tuple[SplitPredictor, dict]:
    """Fit the baseline; log its parameters and its validation Rank IC per boosting round."""
    from alphaloom.tasks.comparison.baselines import predict_lightgbm, train_lightgbm

    fit = train_lightgbm(shard_dir, cfg, variant.params, seed=seed)
    run.log_params({f"lightgbm.{k}": v for k, v in fit.params.items()})
    run.log_history("valid/rank_ic", fit.history, first_step=1)
    extra = {"fit_seconds": fit.fit_seconds, "best_iteration": float(fit.best_iteration)}

    def predict_split(split: str) -> pd.DataFrame:
        return predict_lightgbm(fit, shard_dir, split, cfg)

    return predict_split, extra


def _fit_blend(
    cfg: PipelineConfig,
    variant: Variant,
    seed: int,
    run: runs.TrackedRun,
    shard_dir: str,
    progress: Progress | None,
) -> tuple[SplitPredictor, dict]:
    """The network (with the variant's overrides) and LightGBM, rank-blended with the weight
    chosen on the validation split (tasks/comparison/blend.py); both parts' figures are logged
    beside the blend's so it is measured against each."""
    from alphaloom.tasks.comparison.blend import blended, choose_weight
    from alphaloom.tasks.evaluation.metrics import ic_metrics

    network, network_extra = _fit_network(cfg, run, shard_dir, progress)
    lightgbm, lightgbm_extra = _fit_lightgbm(cfg, variant, seed, run, shard_dir)
    parts = {split: (network(split), lightgbm(split)) for split in ("valid", "test")}
    weight, _ = choose_weight(*parts["valid"])
    extra = {
        "fit_seconds": network_extra["fit_seconds"] + lightgbm_extra["fit_seconds"],
        "blend/network_weight": weight,
    }
    for split, (net_preds, gbm_preds) in parts.items():
        extra[f"blend/{split}_network_rank_ic"] = ic_metrics(net_preds)["rank_ic"]
        extra[f"blend/{split}_lightgbm_rank_ic"] = ic_metrics(gbm_preds)["rank_ic"]

    def predict_split(split: str) -> pd.DataFrame:
        return blended(*parts[split], weight)

    return predict_split, extra


def run_variant(
    cfg: PipelineConfig,
    variant: Variant,
    seed: int,
    parent_run_id: str,
    shard_dir: str,
    oracle: pd.DataFrame | None = None,
    tags: Mapping[str, str] | None = None,
    figures: bool = True,
    exposures: pd.DataFrame | None = None,
    progress: Progress | None = None,
) -> VariantOutcome:
    """Train and evaluate one variant with one seed inside its own child run.

    Raises VariantFailed (after the child run is marked FAILED) if anything goes wrong,
    including an override the config rejects. `figures=False` skips the per-split plots.
    """
    try:
        vcfg, bad_config = variant_config(cfg, variant, seed), None
    except ConfigError as err:
        vcfg, bad_config = cfg, err  # still open a child run, so the failure is on record
    run_id: str | None = None
    try:
        owner = {resume.TAG_OWNER: resume.Owner.this_process().tag()}  # the fit worker's
        with runs.tracked_run(
            vcfg,
            {**child_tags(parent_run_id, variant, seed, tags), **owner},
            f"{variant.name} seed={seed}",
        ) as run_id:
            if bad_config is not None:
                raise bad_config
            run = runs.TrackedRun.of(vcfg, run_id)
            if variant.kind == "lightgbm":
                predict_split, extra = _fit_lightgbm(vcfg, variant, seed, run, shard_dir)
            elif variant.kind == "blend":
                predict_split, extra = _fit_blend(vcfg, variant, seed, run, shard_dir, progress)
            else:
                predict_split, extra = _fit_network(vcfg, run, shard_dir, progress)
            run.log_metrics(extra)
            daily: dict[str, dict[str, float]] = {}
            scored = score_and_log(vcfg, run, predict_split, oracle, figures, exposures, daily)
            metrics = {**scored, **extra}
    except Exception as err:
        log.exception("variant %s seed %d failed", variant.name, seed)
        raise VariantFailed(variant.name, seed, run_id, f"{type(err).__name__}: {err}") from err
    return VariantOutcome(variant.name, seed, "finished", run_id, metrics, daily_rank_ic=daily)


variant_task = task(
    name="compare-variant",
    task_run_name="{variant.name}-seed{seed}",
    retries=0,  # a retry would open a second child run
    timeout_seconds=12 * 3600,
    cache_policy=NO_CACHE,
    persist_result=False,
)(run_variant)  # Prefect task: a failed variant is a failed task run


def outcome_from_state(state: Any, variant: Variant, seed: int) -> VariantOutcome:
    """A task run's final state as an outcome: its result, or a failed row with the reason."""
    if state.is_completed():
        return state.result()
    err = state.result(raise_on_failure=False)
    if isinstance(err, VariantFailed):
        return VariantOutcome(variant.name, seed, "failed", err.run_id, error=err.cause)
    message = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else state.message
    return VariantOutcome(variant.name, seed, "failed", None, error=str(message))
