"""Value checks on input tables (numbers, dates, symbols, unique keys) and price adjustment."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


PRICE_COLUMNS = ("open", "high", "low", "close")
_NUMERIC = (*PRICE_COLUMNS, "adj_close", "adj_factor", "volume", "amount")
_POSITIVE = (*PRICE_COLUMNS, "adj_close", "adj_factor")
_NA_STRINGS = ["", "NA", "N/A", "n/a", "NaN", "nan", "NULL", "null", "None", "#N/A", "-"]


class DataValidationError(ValueError):
    """Input data is unusable; the message names the file, the column and how many rows."""


def _first_bad(values: pd.Series, bad: pd.Series) -> str:
    """' (first: 'x' at data row 3)' for an error message (rows counted from 1, header excluded)."""
    pos = int(np.flatnonzero(bad.to_numpy())[0])
    return f" (first: {values.iloc[pos]!r} at data row {pos + 1})"


def _fail(source: str, column: str, n_bad: int, what: str, detail: str = "") -> None:
    raise DataValidationError(f"{source}: column '{column}' has {n_bad} row(s) with {what}{detail}")


def _to_float(values: pd.Series, source: str, column: str) -> pd.Series:
    """float64 copy of a column; text that is not a number is an error naming the rows."""
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        numeric = pd.to_numeric(values, errors="coerce")
        bad = numeric.isna() & values.notna()
        if bad.any():
            _fail(source, column, int(bad.sum()), "non-numeric values", _first_bad(values, bad))
        values = numeric
    return values.astype("float64")


def _check_numbers(frame: pd.DataFrame, source: str, labels: dict[str, str]) -> None:
    """Prices finite and > 0; volume and amount finite and >= 0."""
    for col in _NUMERIC:
        if col not in frame:
            continue
        values = frame[col]
        missing = ~np.isfinite(values.to_numpy())
        if missing.any():
            bad = pd.Series(missing)
            _fail(source, labels[col], int(missing.sum()), "NaN/inf/missing values",
                  _first_bad(values, bad))  # fmt: skip
        if col in _POSITIVE:
            bad = values <= 0
            if bad.any():
                _fail(source, labels[col], int(bad.sum()), "non-positive prices",
                      _first_bad(values, bad))  # fmt: skip
        elif (bad := values < 0).any():
            _fail(source, labels[col], int(bad.sum()), "negative values", _first_bad(values, bad))


def _parse_dates(values: pd.Series, source: str, column: str) -> pd.Series:
    """Dates as datetime64[ns] at midnight; accepts ISO text, 20200102 and datetimes."""
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
    else:
        text = values.astype("string").str.strip()
        compact = text.dropna().str.fullmatch(r"\d{8}").all() and text.notna().any()
        try:
            with warnings.catch_warnings():  # "could not infer format": the retry handles it
                warnings.simplefilter("ignore", UserWarning)
                parsed = pd.to_datetime(text, errors="coerce", format="%Y%m%d" if compact else None)
            retry = parsed.isna() & text.notna()
            if retry.any() and not compact:
                parsed[retry] = pd.to_datetime(text[retry], errors="coerce", format="mixed")
        except (ValueError, TypeError) as err:
            raise DataValidationError(f"{source}: column '{column}': {err}") from err
    bad = parsed.isna()
    if bad.any():
        _fail(source, column, int(bad.sum()), "missing or unparseable dates",
              _first_bad(values, bad))  # fmt: skip
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_localize(None)
    return parsed.dt.normalize().astype("datetime64[ns]")


def _parse_symbols(values: pd.Series, source: str, column: str) -> pd.Series:
    """Symbols as stripped strings; an empty symbol is an error."""
    text = values.astype("string").str.strip()
    bad = text.isna() | (text == "")
    if bad.any():
        _fail(source, column, int(bad.sum()), "missing symbols", _first_bad(values, bad))
    return text.astype(str)


def _check_unique(frame: pd.DataFrame, keys: list[str], source: str) -> None:
    """Duplicate (symbol, date) rows are an error: which one to keep is the user's call."""
    dup = frame.duplicated(keys, keep=False)
    if dup.any():
        first = frame.loc[dup, keys].iloc[0].tolist()
        raise DataValidationError(
            f"{source}: {int(dup.sum())} rows share a duplicate ({', '.join(keys)}) key "
            f"(first: {first[0]!r}, {first[1]:%Y-%m-%d})"
        )


def _adjust(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Apply adj_factor (or adj_close / close) to OHLC and its inverse to volume."""
    if "adj_factor" in frame:
        if "adj_close" in frame:
            logger.info("%s: both adj_factor and adj_close present; using adj_factor", source)
        factor = frame["adj_factor"]
    elif "adj_close" in frame:
        factor = frame["adj_close"] / frame["close"]
    else:
        return frame
    for col in PRICE_COLUMNS:
        frame[col] = frame[col] * factor
    frame["volume"] = frame["volume"] / factor
    return frame.drop(columns=[c for c in ("adj_factor", "adj_close") if c in frame])


def _warn_inconsistent_ohlc(frame: pd.DataFrame, source: str) -> None:
    """Real vendors ship a few high < close or low > open rows; count them, do not drop them."""
    tol = 1e-9 * frame["close"]
    top = frame[["open", "close"]].max(axis=1)
    bottom = frame[["open", "close"]].min(axis=1)
    bad = int(((frame["high"] < top - tol) | (frame["low"] > bottom + tol)).sum())
    if bad:
        logger.warning("%s: %d row(s) have high/low outside open/close (kept as is)", source, bad)
