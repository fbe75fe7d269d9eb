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

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from alphaloom.tasks.data.checks import (
    PROBLEM_NAMES,
    BarKeys,
    BarRows,
    failure_cases,
    parse_dates,
    parse_numbers,
    parse_symbols,
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


Unparsed = dict[str, pd.Series]  # column -> the raw text that could not be parsed, by row


def _row(label: object) -> object:
    """A row label as the user indexed it (concatenating failure cases can make ints floats)."""
    if isinstance(label, (float, np.floating)) and float(label).is_integer():
        return int(label)
    return label


def _unparsed_problems(unparsed: Unparsed) -> list[str]:
    """One line per column with text that could not be parsed."""
    return [
        f"{SOURCE}: column '{column}' has {len(raw)} row(s) with "
        f"{'unparseable dates' if column == 'date' else 'non-numeric values'} "
        f"(first: {str(raw.iloc[0])!r} at row {_row(raw.index[0])})"
        for column, raw in unparsed.items()
        if not raw.empty
    ]


def _schema_problems(out: pd.DataFrame, unparsed: Unparsed, rows: bool) -> list[str]:
    """Every rule of the bars schema `out` breaks, one line per (column, rule): the key rules
    always, the row rules (prices, volume) when `rows`. Text already reported as unparseable
    is not reported again as missing."""
    keys = out[list(KEY_COLUMNS)]
    parts = [failure_cases(BarKeys, keys)]
    if rows:
        parts.append(failure_cases(BarRows, out))
    else:  # factor rows: the one row rule of the keys that BarKeys leaves to BarRows
        blank = keys.index[keys["symbol"] == ""]
        parts.append(
            pd.DataFrame({"column": "symbol", "check": "str_length(1, None)", "index": blank})
        )
    cases = pd.concat(parts, ignore_index=True).drop_duplicates(["column", "check", "index"])
    told = pd.Series(False, index=cases.index)
    for column, raw in unparsed.items():
        told |= cases["column"].eq(column) & cases["index"].isin(raw.index)
    lines = []
    for (column, check), found in cases[~told].groupby(["column", "check"], sort=True):
        name = PROBLEM_NAMES.get(check, check)
        if check == "multiple_fields_uniqueness":
            lines.append(f"{SOURCE}: {found['index'].nunique()} rows share a {name}")
        else:
            lines.append(
                f"{SOURCE}: column '{column}' has {found['index'].nunique()} row(s) with {name} "
                f"(first at row {_row(found['index'].iloc[0])})"
            )
    return lines


def _keys(frame: pd.DataFrame) -> tuple[pd.DataFrame, Unparsed]:
    """symbol and date parsed into a new frame; the date text that could not be parsed."""
    if frame.empty:
        raise RequestError(f"{SOURCE}: no rows")
    out = pd.DataFrame(index=frame.index)
    out["symbol"] = parse_symbols(frame["symbol"])
    dates = parse_dates(frame["date"])
    out["date"] = dates.values
    return out, {"date": dates.unparsed}


def _finish(out: pd.DataFrame, problems: list[str]) -> pd.DataFrame:
    """Raise every problem found at once, or return `out` sorted by (symbol, date)."""
    if problems:
        raise RequestError("\n".join(problems))
    return out.sort_values(list(KEY_COLUMNS), kind="stable", ignore_index=True)


def canonical_bars(frame: pd.DataFrame) -> pd.DataFrame:
    """Validated canonical bars (symbol, date, open, high, low, close, volume[, amount]),
    sorted by (symbol, date). The same schema as the training bars checks them, but a request
    with a bad row is refused, not trimmed: the caller asked for a score on every row."""
    out, unparsed = _keys(frame)
    for column in [c for c in (*BAR_COLUMNS[2:], *OPTIONAL_BAR_COLUMNS) if c in frame.columns]:
        numbers = parse_numbers(frame[column])
        out[column] = numbers.values
        unparsed[column] = numbers.unparsed
    problems = _unparsed_problems(unparsed) + _schema_problems(out, unparsed, rows=True)
    return _finish(out, problems)


def canonical_factors(frame: pd.DataFrame, feature_names: Sequence[str]) -> pd.DataFrame:
    """symbol, date and the raw factors as float64 (non-finite -> NaN, as compute_alpha158
    leaves them), sorted by (symbol, date)."""
    out, unparsed = _keys(frame)
    for name in feature_names:
        numbers = parse_numbers(frame[name])
        unparsed[name] = numbers.unparsed
        out[name] = numbers.values.where(np.isfinite(numbers.values))
    problems = _unparsed_problems(unparsed) + _schema_problems(out, unparsed, rows=False)
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
