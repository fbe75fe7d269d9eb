"""The one bars schema (pandera models, validated lazily) and the parsers that feed it.

Why pandera: the row rules of a canonical bar are declared once, as a `DataFrameModel`, and lazy
validation returns every failing row of every rule in one pass (`failure_cases`), which is what a
report of all problems at once needs; hand-written checks stopped at the first. The parsers turn
text into typed columns without raising: what they cannot parse becomes a missing value that the
schema then reports, and the raw text is kept so the report can show it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors
from pandera.typing import Series

from alphaloom.tasks.data.date_order import MIXED, UNDECIDED, DateOrder, read_order

PRICE_COLUMNS = ("open", "high", "low", "close")
NUMERIC_COLUMNS = (*PRICE_COLUMNS, "adj_close", "adj_factor", "volume", "amount")
NA_STRINGS = ["", "NA", "N/A", "n/a", "NaN", "nan", "NULL", "null", "None", "#N/A", "-"]


class DataValidationError(ValueError):
    """Input data is unusable; the message names the file, the column and how many rows.

    `report` (a tasks.data.validation.ValidationReport) holds every problem found, when the error
    comes from a full validation pass.
    """

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


def _finite(series: pd.Series) -> pd.Series:
    """True where a value is not +-inf (missing values are the nullable rule's business)."""
    return pd.Series(~np.isinf(series.to_numpy(np.float64)), index=series.index)


class BarRows(pa.DataFrameModel):
    """What every bar row must satisfy; a row breaking any rule is invalid.

    Optional columns are checked only in files that have them.
    """

    symbol: Series[str] = pa.Field(nullable=False, str_length={"min_value": 1})
    date: Series[pa.DateTime] = pa.Field(nullable=False)
    open: Series[float] = pa.Field(gt=0, nullable=False)
    high: Series[float] = pa.Field(gt=0, nullable=False)
    low: Series[float] = pa.Field(gt=0, nullable=False)
    close: Series[float] = pa.Field(gt=0, nullable=False)
    volume: Series[float] = pa.Field(ge=0, nullable=False)
    adj_close: Optional[Series[float]] = pa.Field(gt=0, nullable=False)  # noqa: UP045 (pandera)
    adj_factor: Optional[Series[float]] = pa.Field(gt=0, nullable=False)  # noqa: UP045
    amount: Optional[Series[float]] = pa.Field(ge=0, nullable=False)  # noqa: UP045

    @pa.check(*NUMERIC_COLUMNS, name="finite")
    def _no_infinity(cls, series: pd.Series) -> pd.Series:
        return _finite(series)

    class Config:
        strict = False  # bookkeeping columns (source file and row) ride along


class BarKeys(pa.DataFrameModel):
    """Rules across rows and files: one bar per (symbol, date), one spelling per ticker."""

    symbol: Series[str]
    date: Series[pa.DateTime]

    @pa.check("symbol", name="case_clash")
    def _one_spelling(cls, series: pd.Series) -> pd.Series:
        spellings = series.groupby(series.str.casefold()).transform("nunique")
        return spellings == 1

    class Config:
        strict = False
        unique = ("symbol", "date")


def failure_cases(model: type[pa.DataFrameModel], frame: pd.DataFrame) -> pd.DataFrame:
    """Every (column, check, row index) `frame` fails under `model`, from one lazy validation.

    Returns the columns `column, check, index` (index = the frame's index label of the row);
    a uniqueness failure appears once per row under the first key column.
    """
    try:
        model.validate(frame, lazy=True)
    except SchemaErrors as err:
        cases = err.failure_cases
        whole = cases["index"].isna()  # a wrong dtype or a failing check function: our bug
        if whole.any():
            raise RuntimeError(f"{model.__name__} could not be checked:\n{err}") from None
        cases = cases.copy()
        unique = cases["check"] == "multiple_fields_uniqueness"
        cases.loc[unique, "column"] = "symbol"
        cases = cases.drop_duplicates(["column", "check", "index"])
        return cases[["column", "check", "index"]].reset_index(drop=True)
    return pd.DataFrame({"column": [], "check": [], "index": []})


PROBLEM_NAMES = {
    "not_nullable": "missing value",
    "greater_than(0)": "non-positive value",
    "greater_than_or_equal_to(0)": "negative value",
    "finite": "infinite value",
    "str_length(1, None)": "empty symbol",
    "multiple_fields_uniqueness": "duplicate (symbol, date) key",
    "case_clash": "ticker differs from another only in case",
    UNDECIDED: "dates in no decidable order (day/month or month/day: no field above 12, and "
    "their spacing does not tell)",
    MIXED: "dates in two orders (some rows only valid day/month, others only month/day)",
}


# --------------------------------------------------------------------------- parsers


@dataclass
class Parsed:
    """A typed column and, where the text could not be parsed, the text itself.

    `problem` is set when the column cannot be read at all (dates in no single order); then
    every value is missing and every present one is in `unparsed`.
    """

    values: pd.Series
    unparsed: pd.Series  # raw value at the rows that failed to parse (index = frame index)
    problem: str = ""  # the report's wording, with what to do about it
    examples: list[str] = field(default_factory=list)  # "row 3: '13/01/2019' (...)"


def parse_numbers(values: pd.Series) -> Parsed:
    """float64 copy of a column; text that is not a number becomes NaN (kept in `unparsed`)."""
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        numeric = pd.to_numeric(values, errors="coerce")
        bad = numeric.isna() & values.notna()
        return Parsed(numeric.astype("float64"), values[bad])
    return Parsed(values.astype("float64"), values.iloc[:0])


COMPACT_DATE = "%Y%m%d"


def _order_problem(order: DateOrder) -> str:
    """The report's wording of a column whose dates have no single order, with the way out."""
    day, month = order.formats
    hint = f"set data.date_format: '{day}' (day first) or '{month}' (month first)"
    if order.kind == MIXED:
        hint += " and fix the rows of the other order"
    return f"{PROBLEM_NAMES[order.kind]}; {hint}; none of its rows is read"


def parse_dates(values: pd.Series, date_format: str | None = None) -> Parsed:
    """Dates as datetime64[ns] at midnight; unparseable ones become NaT (kept in `unparsed`).

    Accepted without configuration: datetimes, ISO text, 20190102 (integers or text) and
    slashed dates (12/01/2015, 12.01.2015, 12-01-2015), whose order (month/day or day/month)
    is decided once per column from all of its values (tasks/data/date_order.py) and applied to
    every row. A column whose order cannot be decided, or whose rows disagree, is not read at
    all: every value is missing and `problem` says why. `date_format` (strptime codes,
    data.date_format) overrides the inference.
    """
    present = values.notna()
    problem, shown = "", []
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
        if getattr(parsed.dt, "tz", None) is not None:
            parsed = parsed.dt.tz_localize(None)
    else:
        text = values.astype("string").str.strip()
        text = text.mask(text.isin(NA_STRINGS))  # a blank or "NA" date is missing, not bad text
        present = text.notna()
        given = text.dropna()
        if date_format is None and len(given) and given.str.fullmatch(r"\d{8}").all():
            date_format = COMPACT_DATE
        if date_format is None and len(given):
            order = read_order(text)
            if not order.decided:
                problem, shown = _order_problem(order), order.examples
                text = text.mask(present)  # never a partial read
            elif len(order.iso):
                text.iloc[order.iso.index] = order.iso.to_numpy()  # ISO text, NA if invalid
        with warnings.catch_warnings():  # "could not infer format": every row is still parsed
            warnings.simplefilter("ignore", UserWarning)
            parsed = pd.to_datetime(text, errors="coerce", format=date_format)
            retry = parsed.isna() & text.notna()
            if retry.any() and date_format is None:  # e.g. a time of day on some rows
                parsed[retry] = pd.to_datetime(text[retry], errors="coerce", format="ISO8601")
        if getattr(parsed.dt, "tz", None) is not None:
            parsed = parsed.dt.tz_convert(None)
    parsed = parsed.dt.normalize().astype("datetime64[ns]")
    bad = parsed.isna() & present
    return Parsed(parsed, values[bad], problem, shown)


def parse_symbols(values: pd.Series) -> pd.Series:
    """Symbols as stripped strings ("" where missing, which the schema reports)."""
    return values.astype("string").str.strip().fillna("").astype(str)


# --------------------------------------------------------------------------- soft checks


def inconsistent_ohlc(frame: pd.DataFrame) -> np.ndarray:
    """Rows whose high is below max(open, close) or low above min(open, close).

    Real vendors ship a few of these; they are reported as warnings and kept, not dropped.
    """
    tol = 1e-9 * frame["close"].to_numpy()
    top = frame[["open", "close"]].max(axis=1).to_numpy()
    bottom = frame[["open", "close"]].min(axis=1).to_numpy()
    return (frame["high"].to_numpy() < top - tol) | (frame["low"].to_numpy() > bottom + tol)


def adjust_prices(frame: pd.DataFrame) -> pd.DataFrame:
    """Apply adj_factor (or adj_close / close) to OHLC and its inverse to volume (Qlib's way).

    Rows without either column (NaN there) stay as they are.
    """
    factor = pd.Series(np.nan, index=frame.index)
    if "adj_close" in frame:
        factor = frame["adj_close"] / frame["close"]
    if "adj_factor" in frame:
        factor = frame["adj_factor"].fillna(factor)
    factor = factor.fillna(1.0)
    for col in PRICE_COLUMNS:
        frame[col] = frame[col] * factor
    frame["volume"] = frame["volume"] / factor
    return frame.drop(columns=[c for c in ("adj_factor", "adj_close") if c in frame])
