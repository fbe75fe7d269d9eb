"""The registered model's `predict`: raw bars or factor rows in, ranked scores out.

Inputs (see tasks/serving/requests.py for the frame columns):

* a DataFrame of **raw bars** or **raw factor rows** (+ optional instrument fields): returns one
  row per scored (symbol, date): `rank` (1 = highest score that day), `symbol`, `date`, `score`
  and the class probabilities `p0..p3`, sorted by date and rank. By default only windows ending
  on the request's latest date are scored (the cross-section to trade); the parameter
  `all_dates=True` scores every date with a window of at least `min_valid_days` rows. Factors of
  a window are exact (equal to the pipeline's) when the symbol's bars reach `history_bars` rows
  back; a shorter history is scored like a newly listed stock's (partial windows, as training).
* a dict of arrays with the batch keys of alphaloom.model.batch (`x`, `mask`, `text`, ...),
  already normalised, as the registry sends shard-set batches: returns `score, p0..p3` per row.

The score is always the network's `score(logits)` (the ordinal head's utility, or the class
values it was trained with), computed by the same scorer evaluation uses. A seed ensemble's score
is the per-day mean of its members' percentile ranks over the request's rows of that day
(tasks/evaluation/ensemble.py; a tensor request is one cross-section, or one per value of its
optional `date` array); the parameter `member` (>= 0) scores with that member alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException

from alphaloom.model.batch import NUM_CLASSES
from alphaloom.model.ensemble import members_of
from alphaloom.tasks.data.alpha158 import compute_alpha158
from alphaloom.tasks.data.features import apply_normalizer
from alphaloom.tasks.evaluation.ensemble import combine_members
from alphaloom.tasks.evaluation.metrics import PROB_COLUMNS
from alphaloom.tasks.evaluation.predictions import torch_scorer
from alphaloom.tasks.serving import requests
from alphaloom.tasks.serving.bundle import ServingBundle
from alphaloom.tasks.serving.windows import (
    SymbolTable,
    request_panel,
    scored_rows,
    window_batches,
)

log = logging.getLogger(__name__)

RANKED_COLUMNS = ["rank", "symbol", "date", "score", *PROB_COLUMNS]
TENSOR_COLUMNS = ["score", *PROB_COLUMNS]
BATCH_SIZE = 512
# dtypes of the batch contract (alphaloom.model.batch): JSON requests arrive as float64 / int64
TENSOR_DTYPES = {
    "x": np.float32,
    "mask": np.bool_,
    "text": np.float32,
    "has_text": np.float32,
    "industry": np.int64,
    "index": np.int64,
    "dow": np.int64,
    "month": np.int64,
}


def scoring_members(model: torch.nn.Module, member: int | None) -> list[torch.nn.Module]:
    """The networks a request is scored with: all (combined), or the one `member` names."""
    members = members_of(model)
    if member is None:
        return members
    if not 0 <= member < len(members):
        raise requests.RequestError(
            f"request: parameter member={member} names no member of this model "
            f"(0..{len(members) - 1})"
        )
    return [members[member]]


def score_tensors(
    model: torch.nn.Module, inputs: Mapping[str, Any], member: int | None = None
) -> pd.DataFrame:
    """`score, p0..p3` of a batch dict (only the network's input keys are read)."""
    missing = [key for key in model.input_keys if key not in inputs]
    if missing:
        raise requests.RequestError(f"request: tensor input lacks key(s) {missing}")
    batch = {
        key: torch.as_tensor(np.asarray(inputs[key], dtype=TENSOR_DTYPES.get(key)))
        for key in model.input_keys
    }
    frames = []
    for network in scoring_members(model, member):
        score, probs = torch_scorer(network)(batch)
        out = pd.DataFrame(np.asarray(probs, np.float64), columns=PROB_COLUMNS[:NUM_CLASSES])
        out.insert(0, "score", np.asarray(score, np.float64))
        frames.append(out)
    if len(frames) == 1:
        return frames[0]
    rows = len(frames[0])
    day = np.asarray(inputs["date"]) if "date" in inputs else np.zeros(rows, np.int64)
    combined = combine_members([frame.assign(date=day) for frame in frames])
    return combined.drop(columns="date")


def normalised_table(bundle: ServingBundle, frame: pd.DataFrame) -> pd.DataFrame:
    """symbol, date and the bundle's normalised factors of a raw-bars or raw-factor request,
    sorted by (symbol, date)."""
    names = bundle.feature_names
    if requests.input_kind(frame, names) == "bars":
        bars = requests.canonical_bars(frame)
        raw = compute_alpha158(bars, names)
    else:
        raw = requests.canonical_factors(frame, names)
    return apply_normalizer(raw[["symbol", "date", *names]], names, bundle.stats)


def rank_by_date(scored: pd.DataFrame) -> pd.DataFrame:
    """Rank 1 = the highest score of each date (ties by symbol), sorted by date then rank."""
    ordered = scored.sort_values(["date", "score", "symbol"], ascending=[True, False, True])
    ordered = ordered.reset_index(drop=True)
    ordered.insert(0, "rank", ordered.groupby("date").cumcount().to_numpy() + 1)
    return ordered[RANKED_COLUMNS]


def score_frame(
    model: torch.nn.Module,
    bundle: ServingBundle,
    frame: pd.DataFrame,
    all_dates: bool = False,
    member: int | None = None,
) -> pd.DataFrame:
    """Ranked scores of a raw-bars or raw-factor request (see the module docstring)."""
    normed = normalised_table(bundle, frame)
    symbols = list(pd.unique(normed["symbol"]))
    instruments = requests.request_instruments(frame, symbols)
    inputs = bundle.symbol_inputs(symbols, instruments, use_text="text" in model.input_keys)
    panel, names = request_panel(normed, bundle.feature_names, bundle.window, inputs)
    last_day = None if all_dates else np.array([panel.date.max()])
    rows = scored_rows(panel, bundle.min_valid_days, last_day)
    if len(rows) == 0:
        raise requests.RequestError(
            f"request: no symbol has the {bundle.min_valid_days} rows a window needs"
            + ("" if all_dates else " up to the latest date")
        )
    _warn_short_histories(panel.symbol, rows, names, bundle.history_bars)
    table = SymbolTable(text=inputs.text, has_text=inputs.has_text.astype(np.float32))
    frames = []
    for network in scoring_members(model, member):
        scorer = torch_scorer(network)
        parts = [scorer(batch) for batch in window_batches(panel, rows, table, BATCH_SIZE)]
        probs = np.concatenate([p for _, p in parts]).astype(np.float64)
        scored = pd.DataFrame(
            {
                "symbol": np.asarray(names, dtype=object)[panel.symbol[rows]],
                "date": pd.to_datetime(panel.date[rows].astype("datetime64[D]")),
                "score": np.concatenate([s for s, _ in parts]).astype(np.float64),
            }
        )
        for k, column in enumerate(PROB_COLUMNS):
            scored[column] = probs[:, k]
        frames.append(scored)
    return rank_by_date(combine_members(frames))


def _warn_short_histories(
    codes: np.ndarray, rows: np.ndarray, names: list[str], needed: int
) -> None:
    """Log the symbols whose scored windows rest on fewer bars than `needed`."""
    order = np.arange(len(codes))
    first_row = np.maximum.accumulate(np.where(np.r_[True, codes[1:] != codes[:-1]], order, 0))
    bars_so_far = order - first_row + 1
    short = np.unique(codes[rows][bars_so_far[rows] < needed])
    if len(short):
        log.warning(
            "%d symbol(s) (e.g. %s) sent fewer than %d bars before a scored date: their factors "
            "use the shorter history, as for a newly listed stock",
            len(short), [names[c] for c in short[:3]], needed,
        )  # fmt: skip


def requested_member(params: Mapping[str, Any] | None) -> int | None:
    """The `member` parameter: one ensemble member's index, or None (-1, absent: all)."""
    member = (params or {}).get("member")
    if member is None or int(member) < 0:
        return None
    return int(member)


def predict(
    model: torch.nn.Module,
    bundle: ServingBundle,
    model_input: Any,
    params: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The pyfunc's predict: a frame request or a tensor batch (see the module docstring).

    Bad input raises MlflowException(INVALID_PARAMETER_VALUE) with the problems found, which
    `mlflow models serve` answers with HTTP 400.
    """
    try:
        member = requested_member(params)
        if isinstance(model_input, pd.DataFrame):
            all_dates = bool((params or {}).get("all_dates", False))
            return score_frame(model, bundle, model_input, all_dates, member)
        if isinstance(model_input, Mapping) and "x" in model_input:
            return score_tensors(model, model_input, member)
        raise requests.RequestError(
            f"request: expected a DataFrame of raw bars or factor rows, or a dict of batch "
            f"arrays (x, mask, ...); got {type(model_input).__name__}"
        )
    except requests.RequestError as err:
        raise MlflowException.invalid_parameter_value(str(err)) from err
