"""A LightGBM baseline on the end-day factors, scored by the same evaluation code as the network.

Qlib's strongest simple baseline on Alpha158 is a gradient-boosted tree on the factors of the
prediction day alone. Here it reads those factors straight from the shard parquet (the row that
ends each window, selected by the loader's own `Selection` rule, so it sees exactly the windows
the network is trained and scored on) and never re-runs feature engineering.

Objective (see `LightGBMParams`): regression on the per-day rank-normalised forward return
(Qlib's CSRankNorm label), `regression` on the raw forward return, or `lambdarank` with the four
classes as relevance and one query per day. The rank-normalised regression was measured against
the alternatives on the default synthetic market's shard set by benchmarks/lightgbm_objective.py
(seed 0, test Rank IC; oracle 0.1368): rank-normalised regression 0.0919, raw-return regression
0.0789, lambdarank 0.0249 (NDCG rewards the top of each day's list, while Rank IC and the
long-short book use the whole cross-section).

The default tree parameters are Qlib's published ones for Alpha158
(examples/benchmarks/LightGBM/workflow_config_lightgbm_Alpha158.yaml: learning rate 0.0421, 210
leaves, depth 8, column sample 0.8879, L1 205.6999, L2 580.9768; `subsample` 0.8789 without a
bagging frequency, which LightGBM ignores, as it does in Qlib), and, as in Qlib's `LGBModel.fit`,
early stopping watches the validation loss (L2 of the target; 50 rounds of patience, at most
1000). The validation Rank IC of every round is still recorded (`history`): stopping on it was
noisy (on sp500-dev it stopped at round 4 of 54), since a per-round Rank IC on half a year of days
swings more than the loss does. `stop_on: rank_ic` keeps the old rule.

Prediction frame: `predict_with` runs the booster on the end day of every window the evaluation
loader yields, so the frame has the network's rows and columns. A regressor has no class
probabilities; p0..p3 are the one-hot class of the score's per-day rank bucket, with bucket
shares equal to the training split's class frequencies (for quantile labels these are the label
edges). That is an honest deterministic classifier: accuracy and macro-F1 mean what they mean for
the network, and the calibration plot shows it as the over-confident classifier it is.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from alphaloom.model.batch import NUM_CLASSES, Batch
from alphaloom.model.shard_format import SPLIT_CODES, Selection, valid_lengths
from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.evaluation.metrics import PROB_COLUMNS, daily_ic
from alphaloom.tasks.evaluation.predictions import ScoreFn, predict_with

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[lightgbm]'  (or: pip install 'lightgbm>=4')"
_RANK_NORM_SCALE = math.sqrt(12.0)  # a uniform(-1/2, 1/2) percentile has std 1/sqrt(12)
_LOSS_METRIC = {"regression": "l2", "lambdarank": "ndcg"}


class BaselineError(ValueError):
    """The baseline cannot run on this input; the message names the file, split or setting."""


class LightGBMParams(BaseModel):
    """The baseline's settings (a variant's `params` in tasks/comparison/variants.py).

    `objective`: "regression" (L2) or "lambdarank" (one query per day, the class as relevance).
    `target` (regression only): "rank" = per-day percentile rank of fwd_return, centred and
    scaled to unit variance (Qlib's CSRankNorm), or "return" = the raw forward return.
    `stop_on`: "loss" = the validation loss of the objective (L2, or NDCG@all for lambdarank,
    as Qlib), "rank_ic" = the validation mean daily Rank IC.
    Tree defaults: Qlib's published Alpha158 parameters (module docstring); `min_data_in_leaf`
    is LightGBM's default, which Qlib leaves unset.
    Any other LightGBM parameter goes in `extra` (it overrides the fields here).
    """

    model_config = ConfigDict(extra="forbid")

    objective: Literal["regression", "lambdarank"] = "regression"
    target: Literal["rank", "return"] = "rank"
    stop_on: Literal["loss", "rank_ic"] = "loss"
    learning_rate: float = Field(0.0421, gt=0.0)
    num_leaves: int = Field(210, ge=2)
    max_depth: int = 8
    min_data_in_leaf: int = Field(20, ge=1)
    feature_fraction: float = Field(0.8879, gt=0.0, le=1.0)
    bagging_fraction: float = Field(0.8789, gt=0.0, le=1.0)
    bagging_freq: int = Field(0, ge=0)
    lambda_l1: float = Field(205.6999, ge=0.0)
    lambda_l2: float = Field(580.9768, ge=0.0)
    max_rounds: int = Field(1000, ge=1)
    early_stopping_rounds: int = Field(50, ge=1)
    extra: dict[str, Any] = Field(default_factory=dict)


def lightgbm_available() -> bool:
    """Whether the optional `lightgbm` extra is installed."""
    return importlib.util.find_spec("lightgbm") is not None


def _import_lightgbm() -> Any:
    if not lightgbm_available():
        raise ModuleNotFoundError(f"LightGBM is not installed; install it with: {INSTALL_HINT}")
    import lightgbm

    return lightgbm


# ----------------------------------------------------------------------------------------------
# data: the end day of every window, straight from the shards


@dataclass(frozen=True)
class EndDayTable:
    """One row per window of a split, sorted by (date, symbol): end-day factors and outcome."""

    x: np.ndarray  # float32 [n, F]
    symbol: np.ndarray  # int64 symbol id
    date: np.ndarray  # int64 days since 1970-01-01
    label: np.ndarray  # int64 class 0..3
    fwd_return: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.date)


def end_day_table(shard_dir: str | Path, split: str, min_valid_days: int) -> EndDayTable:
    """The end-day rows of `split`'s windows (the loader's selection rule), read shard by shard."""
    if split not in SPLIT_CODES:
        raise BaselineError(f"split must be one of {list(SPLIT_CODES)}, got {split!r}")
    info = ShardSetInfo.open(shard_dir)
    selection = Selection(SPLIT_CODES[split], min_valid_days)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in EndDayTable.__dataclass_fields__}
    for shard in range(len(info.shards)):
        arrays = info.read_shard(shard)
        ends = selection.mask(arrays, valid_lengths(arrays.symbol, info.window, arrays.bar))
        parts["x"].append(arrays.x[ends])
        for name in ("symbol", "date", "label", "fwd_return"):
            parts[name].append(getattr(arrays, name)[ends])
    columns = {k: np.concatenate(v) for k, v in parts.items()}
    if len(columns["date"]) == 0:
        raise BaselineError(
            f"split {split!r} of {shard_dir} has no window with >= {min_valid_days} days"
        )
    order = np.lexsort((columns["symbol"], columns["date"]))
    return EndDayTable(
        x=np.ascontiguousarray(columns["x"][order], dtype=np.float32),
        symbol=columns["symbol"][order].astype(np.int64),
        date=columns["date"][order].astype(np.int64),
        label=columns["label"][order].astype(np.int64),
        fwd_return=columns["fwd_return"][order].astype(np.float64),
    )


def mid_rank_pct(values: np.ndarray, days: np.ndarray) -> np.ndarray:
    """Per-day (rank - 1/2) / n, ties averaged: in (0, 1), mean exactly 1/2 on every day."""
    groups = pd.Series(values).groupby(days)
    rank = groups.rank(method="average").to_numpy()
    return (rank - 0.5) / groups.transform("size").to_numpy()


def rank_normalised(values: np.ndarray, days: np.ndarray) -> np.ndarray:
    """Per-day percentile rank, centred and scaled to unit variance (Qlib's CSRankNorm)."""
    return (mid_rank_pct(values, days) - 0.5) * _RANK_NORM_SCALE


def query_sizes(days: np.ndarray) -> np.ndarray:
    """Rows per day of a date-sorted table (LightGBM's `group` for lambdarank)."""
    if len(days) and np.any(np.diff(days) < 0):
        raise BaselineError("lambdarank queries need rows sorted by date")
    _, counts = np.unique(days, return_counts=True)
    return counts


def training_target(table: EndDayTable, params: LightGBMParams) -> np.ndarray:
    """What the booster fits: the class (lambdarank), the rank-normalised or the raw return."""
    if params.objective == "lambdarank":
        return table.label.astype(np.float64)
    if params.target == "rank":
        return rank_normalised(table.fwd_return, table.date)
    return table.fwd_return


def class_shares(labels: np.ndarray) -> np.ndarray:
    """Share of each class 0..3 among known labels (the bucket sizes of the one-hot p's)."""
    known = labels[labels >= 0]
    if known.size == 0:
        raise BaselineError("the training split has no known label to size the class buckets")
    return np.bincount(known, minlength=NUM_CLASSES)[:NUM_CLASSES] / known.size


# ----------------------------------------------------------------------------------------------
# training


@dataclass
class LightGBMResult:
    """A fitted booster and how it got there."""

    booster: Any
    best_iteration: int
    best_val_rank_ic: float
    history: list[float]  # validation Rank IC per boosting round
    loss_history: list[float]  # validation loss per round (empty with stop_on=rank_ic)
    shares: np.ndarray  # training class frequencies (p bucket sizes)
    feature_names: list[str]
    fit_seconds: float
    params: dict[str, Any]


def booster_params(params: LightGBMParams, seed: int, num_threads: int | None) -> dict[str, Any]:
    """LightGBM's parameter dict: seeded and deterministic, built-in metrics off."""
    out: dict[str, Any] = {
        "objective": params.objective,
        "learning_rate": params.learning_rate,
        "num_leaves": params.num_leaves,
        "max_depth": params.max_depth,
        "min_data_in_leaf": params.min_data_in_leaf,
        "feature_fraction": params.feature_fraction,
        "bagging_fraction": params.bagging_fraction,
        "bagging_freq": params.bagging_freq,
        "lambda_l1": params.lambda_l1,
        "lambda_l2": params.lambda_l2,
        # the objective's own validation loss first (early stopping watches the first metric);
        # none with stop_on=rank_ic, so the Rank IC `feval` is the only metric
        "metric": _LOSS_METRIC[params.objective] if params.stop_on == "loss" else "None",
        "seed": seed,
        "deterministic": True,
        "force_col_wise": True,
        "verbosity": -1,
        "num_threads": num_threads or 0,
    }
    out.update(params.extra)
    return out


def rank_ic_eval(valid: EndDayTable) -> Any:
    """A LightGBM `feval`: mean daily Rank IC of the predictions on `valid` (higher is better)."""
    frame = pd.DataFrame({"date": valid.date, "fwd_return": valid.fwd_return})

    def feval(preds: np.ndarray, _data: Any) -> tuple[str, float, bool]:
        value = float(daily_ic(frame.assign(score=preds), "spearman").mean())
        return "rank_ic", value if math.isfinite(value) else -1.0, True

    return feval


def _dataset(lgb: Any, table: EndDayTable, params: LightGBMParams, names: list[str], ref=None):
    group = query_sizes(table.date) if params.objective == "lambdarank" else None
    return lgb.Dataset(
        table.x,
        label=training_target(table, params),
        group=group,
        feature_name=names,
        reference=ref,
        free_raw_data=True,
    )


def train_lightgbm(
    shard_dir: str | Path,
    cfg: PipelineConfig,
    params: LightGBMParams | dict[str, Any] | None = None,
    seed: int = 0,
) -> LightGBMResult:
    """Fit the baseline on the train split with early stopping on the validation loss (or,
    with `stop_on: rank_ic`, the validation Rank IC); the Rank IC of every round is recorded."""
    lgb = _import_lightgbm()
    params = LightGBMParams.model_validate(params or {})
    names = ShardSetInfo.open(shard_dir).feature_names
    min_valid = cfg.loader.min_valid_days
    train = end_day_table(shard_dir, "train", min_valid)
    valid = end_day_table(shard_dir, "valid", min_valid)
    started = time.perf_counter()
    train_set = _dataset(lgb, train, params, names)
    valid_set = _dataset(lgb, valid, params, names, ref=train_set)
    history: dict[str, dict[str, list[float]]] = {}
    full = booster_params(params, seed, cfg.train.num_threads)
    if params.objective == "lambdarank" and params.stop_on == "loss":
        full.setdefault("eval_at", [int(query_sizes(valid.date).max())])  # NDCG of whole days
    booster = lgb.train(
        full,
        train_set,
        num_boost_round=params.max_rounds,
        valid_sets=[valid_set],
        valid_names=["valid"],
        feval=rank_ic_eval(valid),
        callbacks=[
            # the first metric is the loss (stop_on=loss) or the Rank IC (the only metric)
            lgb.early_stopping(params.early_stopping_rounds, first_metric_only=True, verbose=False),
            lgb.record_evaluation(history),
        ],
    )
    curve = list(history.get("valid", {}).get("rank_ic", []))
    best = int(booster.best_iteration) or len(curve)
    log.info(
        "LightGBM: best round %d of %d (stopping on the validation %s), valid Rank IC %.4f",
        best, len(curve), params.stop_on, curve[best - 1],
    )  # fmt: skip
    return LightGBMResult(
        booster=booster,
        best_iteration=best,
        best_val_rank_ic=float(curve[best - 1]) if curve else math.nan,
        history=curve,
        loss_history=next(  # "l2" or "ndcg@<n>": the one metric besides the Rank IC
            (list(v) for k, v in history.get("valid", {}).items() if k != "rank_ic"), []
        ),
        shares=class_shares(train.label),
        feature_names=names,
        fit_seconds=time.perf_counter() - started,
        params=full,
    )


# ----------------------------------------------------------------------------------------------
# prediction


def end_day_scorer(result: LightGBMResult) -> ScoreFn:
    """A `predict_with` scorer: the booster on each window's end day (the last row of `x`).

    Probabilities are placeholders here (a day may span batches); `bucket_probabilities`
    replaces them once the whole split is scored.
    """

    def score(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        x_end = batch["x"][:, -1, :].cpu().numpy()
        raw = result.booster.predict(x_end, num_iteration=result.best_iteration)
        return np.asarray(raw, dtype=np.float64), np.zeros((len(raw), NUM_CLASSES))

    return score


def bucket_probabilities(preds: pd.DataFrame, shares: np.ndarray) -> pd.DataFrame:
    """One-hot p0..p3: each day's scores cut into rank buckets sized by the class `shares`."""
    edges = np.cumsum(np.asarray(shares, dtype=float))[:-1]
    pct = mid_rank_pct(preds["score"].to_numpy(), preds["date"].to_numpy())
    predicted = np.searchsorted(edges, pct, side="right")
    onehot = np.eye(NUM_CLASSES)[np.clip(predicted, 0, NUM_CLASSES - 1)]
    return preds.assign(**{col: onehot[:, k] for k, col in enumerate(PROB_COLUMNS)})


def predict_lightgbm(
    result: LightGBMResult, shard_dir: str | Path, split: str, cfg: PipelineConfig
) -> pd.DataFrame:
    """The prediction frame of `split` (the network's rows and columns), scored by the booster."""
    names = ShardSetInfo.open(shard_dir).feature_names
    if names != result.feature_names:
        raise BaselineError(
            f"{shard_dir} has other features than the booster was trained on "
            f"({len(names)} vs {len(result.feature_names)})"
        )
    preds = predict_with(end_day_scorer(result), shard_dir, split, cfg)
    return bucket_probabilities(preds, result.shares)
