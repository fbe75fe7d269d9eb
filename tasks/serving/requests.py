"""What a user may send the registered model, checked and put in canonical form.

Two frame shapes are accepted (besides the tensor batch of `alphaloom.model.batch`, which the
registry sends; see tasks/serving/ranking.py):

* **raw bars**: one row per (symbol, date) with `symbol, date, open, high, low, close, volume`
  and optionally `amount` (for VWAP), the columns of the canonical bars contract; prices
  adjusted the way the training bars were. Alpha158 factors are computed from them.
* **raw factor rows**: `symbol, date` plus every factor the model was trained on, un-normalised
  (as `alphaloom.tasks.data.alpha158.compute_alpha158` returns them; NaN allowed).

Either may carry the instrument fields `industry`, `index` and `description` (constant per
symbol; empty = not sent). Dates may be ISO text, 20200102 or datetimes. Every problem that can
be seen at once is reported at once, one line per column, in one `RequestError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd

from alphaloom.tasks.data.checks import (
    DataValidationError,
    _check_numbers,
    _check_unique,
    _parse_dates,
    _parse_symbols,
    _to_float,
)

BAR_COLUMNS = ("symbol", "date", "open", "high", "low", "close", "volume")
OPTIONAL_BAR_COLUMNS = ("amount",)
INSTRUMENT_FIELDS = ("industry", "index", "description")
KEY_COLUMNS = ("symbol", "date")
SOURCE = "request"

InputKind = Literal["bars", "factors"]


class RequestError(ValueError):
    """The request cannot be scored; the message names every column and problem found."""


def input_kind(frame: pd.DataFrame, feature_names: Sequence[str]) -> InputKind:
    """Which shape the frame is: raw bars if it has the bar columns, else raw factor rows."""
    missing_bars = [c for c in BAR_COLUMNS if c not in frame.columns]
    if not missing_bars:
        return "bars"
    missing_factors = [c for c in (*KEY_COLUMNS, *feature_names) if c not in frame.columns]
    if not missing_factors:
        return "factors"
    raise RequestError(
        f"{SOURCE}: send raw bars (missing column(s) {missing_bars}) or raw factor rows "
        f"(missing {len(missing_factors)} column(s), e.g. {missing_factors[:5]}); "
        f"got columns {list(frame.columns)[:12]}"
    )


def _collect(checks: Sequence[Callable[[], None]]) -> list[str]:
    """Run every check; return the messages of those that failed."""
    problems = []
    for check in checks:
        try:
            check()
        except DataValidationError as err:
            problems.append(str(err))
    return problems


def _keys(frame: pd.DataFrame, out: pd.DataFrame) -> list[str]:
    """Parse symbol and date into `out`; the problems found."""

    def symbols() -> None:
        out["symbol"] = _parse_symbols(frame["symbol"], SOURCE, "symbol")

    def dates() -> None:
        out["date"] = _parse_dates(frame["date"], SOURCE, "date")

    if frame.empty:
        return [f"{SOURCE}: no rows"]
    return _collect([symbols, dates])


def _finish(out: pd.DataFrame, problems: list[str]) -> pd.DataFrame:
    """Raise the problems, or check unique keys and sort by (symbol, date)."""
    if not problems:
        problems += _collect([lambda: _check_unique(out, list(KEY_COLUMNS), SOURCE)])
    if problems:
        raise RequestError("\n".join(problems))
    return out.sort_values(list(KEY_COLUMNS), kind="stable", ignore_index=True)


def canonical_bars(frame: pd.DataFrame) -> pd.DataFrame:
    """Validated canonical bars (symbol, date, open, high, low, close, volume[, amount]),
    sorted by (symbol, date)."""
    out = pd.DataFrame(index=frame.index)
    problems = _keys(frame, out)
    numeric = [c for c in (*BAR_COLUMNS[2:], *OPTIONAL_BAR_COLUMNS) if c in frame.columns]

    def number(column: str) -> Callable[[], None]:
        def check() -> None:
            values = _to_float(frame[column], SOURCE, column)
            _check_numbers(pd.DataFrame({column: values}), SOURCE, {column: column})
            out[column] = values

        return check

    problems += _collect([number(column) for column in numeric])
    return _finish(out, problems)


def canonical_factors(frame: pd.DataFrame, feature_names: Sequence[str]) -> pd.DataFrame:
    """symbol, date and the raw factors as float64 (non-finite -> NaN, as compute_alpha158
    leaves them), sorted by (symbol, date)."""
    out = pd.DataFrame(index=frame.index)
    problems = _keys(frame, out)
    for name in feature_names:
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = values.isna() & frame[name].notna()
        if bad.any():
            problems.append(f"{SOURCE}: column '{name}' has {int(bad.sum())} non-numeric value(s)")
            continue
        out[name] = values.astype(np.float64).where(np.isfinite(values))
    return _finish(out, problems)


def request_instruments(frame: pd.DataFrame, symbols: Sequence[str]) -> pd.DataFrame:
    """One row per symbol (in `symbols`' order): industry, index, description as stripped
    strings ("" where not sent). A symbol with two different values of a field is an error."""
    out = pd.DataFrame({"symbol": list(symbols)})
    problems = []
    keys = frame["symbol"].astype("string").str.strip()
    for field in INSTRUMENT_FIELDS:
        if field not in frame.columns:
            out[field] = ""
            continue
        values = frame[field].astype("string").fillna("").str.strip()
        distinct = pd.DataFrame({"symbol": keys, field: values}).drop_duplicates()
        repeated = distinct["symbol"][distinct["symbol"].duplicated()].unique().tolist()
        if repeated:
            problems.append(
                f"{SOURCE}: column '{field}' differs between rows of symbol(s) {repeated[:5]}"
            )
            continue
        out[field] = out["symbol"].map(distinct.set_index("symbol")[field]).fillna("").astype(str)
    if problems:
        raise RequestError("\n".join(problems))
    return out
