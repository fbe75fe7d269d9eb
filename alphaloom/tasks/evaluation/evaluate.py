"""Evaluation: ranking quality (IC family), classification quality and two books traded on it.

Definitions follow Qlib so numbers are comparable with its benchmarks: the IC of a day is the
cross-sectional Pearson correlation between score and forward return, the Rank IC its Spearman
counterpart, ICIR / Rank ICIR are mean / std (ddof=1) of the daily series, not annualised. The
long-short book and its risk figures use Qlib's additive ("sum") convention for cumulative return
and drawdown; so does the TopkDropout book (tasks/evaluation/portfolio.py).

Two scores, on purpose: the IC family (`rank_ic`, `ic`, ...) and the factor-neutral Rank IC judge
the model's raw score, its skill; the books (decile long-short, TopkDropout) trade the signal
actually traded, which with `evaluate.smoothing_half_life` > 0 is the causal EMA of the daily
score ranks (tasks/evaluation/smoothing.py), whose Rank IC is `rank_ic_smoothed`.

`predict` turns a trained model plus a shard split into a predictions frame; everything else works
on that frame, so hand-made frames test the metrics exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.config import EvaluateSection, PipelineConfig
from alphaloom.tasks.evaluation.exposures import exposure_metrics
from alphaloom.tasks.evaluation.metrics import (
    PRED_COLUMNS,
    PROB_COLUMNS,
    EvaluationError,
    classification_metrics,
    confusion_matrix,
    daily_ic,
    ic_metrics,
    ic_summary,
    labelled_rows,
    long_short_returns,
    oracle_metrics,
    portfolio_metrics,
    predicted_class,
    quantile_metrics,
    quantile_returns,
    require_columns,
)
from alphaloom.tasks.evaluation.neutral import FACTORS, neutral_ic_metrics
from alphaloom.tasks.evaluation.portfolio import topk_dropout
from alphaloom.tasks.evaluation.predictions import predict
from alphaloom.tasks.evaluation.smoothing import smooth_scores

QUANTILES = 5  # score quintiles in the quantile-return table

# ----------------------------------------------------------------------------------------------
# entry points


def evaluate_predictions(
    preds: pd.DataFrame,
    cfg: EvaluateSection,
    oracle: pd.DataFrame | None = None,
    with_figures: bool = True,
    exposures: pd.DataFrame | None = None,
    history: pd.DataFrame | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """All metrics of one split's predictions, plus artifacts keyed by file name (matplotlib
    figures, and tables as DataFrames).

    Metric keys carry no split prefix (the tracker adds `valid/` or `test/`). Always: the IC
    family of the raw score, classification, the decile long-short book (`ls_*`), the
    TopkDropout books (`topk_excess_*`, `topk_ls_*`, gross and net; tasks/evaluation/portfolio.py)
    and the mean forward return of each score quintile (`q1_return` .. `q5_return`,
    `q5_minus_q1`; table `quantile_returns.csv`). With `evaluate.smoothing_half_life` > 0 the
    two books trade the smoothed score and `rank_ic_smoothed` is its Rank IC; `history`
    (earlier predictions, e.g. the validation split's for the test split) gives the EMA its
    first days' past. With `exposures` (tasks/evaluation/exposures.py): `score_vol_corr` and
    `score_size_corr`, and when they carry the neutral factors and industry
    (`market_exposures` does) `rank_ic_neutral` and `rank_icir_neutral` of the raw score.
    With the oracle: its Rank IC and the model's share of it.
    """
    require_columns(preds, PRED_COLUMNS, "predictions")
    known = labelled_rows(preds)
    if known.empty:
        raise EvaluationError("predictions have no row with a finite 'fwd_return'")
    metrics = ic_metrics(known)
    labelled = known[known["label"] >= 0]
    cm = confusion_matrix(labelled["label"].to_numpy(), predicted_class(labelled))
    metrics.update(classification_metrics(cm))
    traded = labelled_rows(traded_scores(preds, cfg.smoothing_half_life, history))
    if cfg.smoothing_half_life:
        metrics["rank_ic_smoothed"] = ic_summary(daily_ic(traded, "spearman"))[0]
    daily = long_short_returns(traded, cfg.long_short_quantile, cfg.cost_bps)
    metrics.update(portfolio_metrics(daily, cfg.annualization_days))
    book, topk = topk_dropout(traded, cfg.topk, cfg.n_drop, cfg.cost_bps, cfg.annualization_days)
    metrics.update(topk)
    quantiles = quantile_returns(known, QUANTILES)
    metrics.update(quantile_metrics(quantiles))
    if exposures is not None:
        exposures = within_dates(exposures, known["date"])  # the market's history: join less
        metrics.update(exposure_metrics(known, exposures))
        if has_neutral_factors(exposures):
            metrics.update(neutral_ic_metrics(known, exposures))
    if oracle is not None:
        metrics.update(oracle_metrics(known, oracle))
        ratio = metrics["rank_ic"] / metrics["oracle_rank_ic"]
        metrics["rank_ic_vs_oracle"] = ratio if np.isfinite(ratio) else math.nan
    artifacts: dict[str, Any] = {"quantile_returns.csv": quantiles}
    if with_figures:
        from alphaloom.tasks.evaluation import plots

        artifacts.update(
            plots.evaluation_figures(
                daily=daily,
                rank_ic=daily_ic(known, "spearman"),
                cm=cm,
                probs=labelled[PROB_COLUMNS].to_numpy(dtype=float),
                labels=labelled["label"].to_numpy(),
                quantiles=quantiles,
                topk_daily=book,
            )
        )
    return metrics, artifacts


def traded_scores(
    preds: pd.DataFrame, half_life: float, history: pd.DataFrame | None = None
) -> pd.DataFrame:
    """`preds` with the score the books trade: itself when `half_life` is 0, else the causal
    EMA of its daily ranks (`smooth_scores`), started on `history`'s days before `preds`'."""
    if not half_life:
        return preds
    if history is None or history.empty or preds.empty:
        return smooth_scores(preds, half_life)
    require_columns(history, ["symbol", "date", "score"], "history")
    columns = ["symbol", "date", "score"]
    past = history.loc[history["date"] < preds["date"].min(), columns]
    both = pd.concat([past, preds[columns]], ignore_index=True)
    smoothed = smooth_scores(both, half_life)["score"].to_numpy()[len(past) :]
    return preds.assign(score=smoothed)


def within_dates(frame: pd.DataFrame, dates: pd.Series) -> pd.DataFrame:
    """The rows of `frame` (with a `date` column) between the first and last of `dates`."""
    first, last = pd.Timestamp(dates.min()).normalize(), pd.Timestamp(dates.max()).normalize()
    return frame[(frame["date"] >= first) & (frame["date"] <= last)]


def has_neutral_factors(exposures: pd.DataFrame) -> bool:
    """Whether `exposures` carry what the factor-neutral Rank IC needs (`neutral_exposures`)."""
    return all(column in exposures for column in (*FACTORS, "industry"))


# ----------------------------------------------------------------------------------------------
# pipeline entry points


def read_oracle(path: str | Path) -> pd.DataFrame:
    """An oracle table (symbol, date, expected_return) from parquet or CSV."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"oracle file not found: {path}")
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    require_columns(frame, ["symbol", "date", "expected_return"], f"oracle {path}")
    return frame


def evaluate_splits(
    model: torch.nn.Module,
    shard_dir: str | Path,
    cfg: PipelineConfig,
    oracle: pd.DataFrame | None = None,
    splits: tuple[str, ...] = ("valid", "test"),
    device: torch.device | str = "cpu",
    exposures: pd.DataFrame | None = None,
) -> dict[str, tuple[dict[str, float], dict[str, Any]]]:
    """(metrics, figures) of each split, scored by the in-memory model; with smoothing on, each
    split's EMA starts on the previous split's scores (valid before test)."""
    out = {}
    coverage = ShardSetInfo.open(shard_dir)
    history = None  # the previous split's scores start the next split's smoothing
    for split in splits:
        preds = predict(model, shard_dir, split, cfg, device=device)
        out[split] = evaluate_predictions(
            preds, cfg.evaluate, oracle=oracle, exposures=exposures, history=history
        )
        out[split][0].update(coverage.label_coverage(split))  # rows, rows_no_fwd_return
        if cfg.evaluate.smoothing_half_life:
            history = preds[["symbol", "date", "score"]]
    return out


def evaluate_and_log(
    model: torch.nn.Module,
    shard_dir: str | Path,
    cfg: PipelineConfig,
    run_id: str | None,
    oracle: pd.DataFrame | None = None,
    splits: tuple[str, ...] = ("valid", "test"),
    device: torch.device | str = "cpu",
    exposures: pd.DataFrame | None = None,
) -> dict[str, float]:
    """Evaluate every split and log `<split>/<metric>` plus plots and tables to run `run_id`.

    Returns the flat metrics ("test/rank_ic", ...).
    """
    from alphaloom.tasks.tracking import runs

    run = None if run_id is None else runs.TrackedRun.of(cfg, run_id)
    flat: dict[str, float] = {}
    for split, (metrics, figures) in evaluate_splits(
        model, shard_dir, cfg, oracle, splits, device, exposures
    ).items():
        flat.update({f"{split}/{key}": value for key, value in metrics.items()})
        if run is not None:
            run.log_evaluation(split, metrics, figures)
    return flat


@task(
    name="evaluate",
    retries=1,
    timeout_seconds=12 * 3600,  # a hang guard, as training's: it scores every valid/test window
    persist_result=False,
    cache_policy=NO_CACHE,
)
def evaluate_task(
    model: torch.nn.Module,
    shard_dir: str,
    cfg: PipelineConfig,
    run_id: str | None,
    oracle: pd.DataFrame | None = None,
    exposures: pd.DataFrame | None = None,
    splits: tuple[str, ...] = ("valid", "test"),
) -> dict[str, float]:
    """Prefect wrapper of `evaluate_and_log` (by default the validation and test splits)."""
    return evaluate_and_log(model, shard_dir, cfg, run_id, oracle, splits, exposures=exposures)
