"""Instruments: industry, index membership and description per symbol, optionally dated.

Why dates: today's index members and a business summary written years later, applied to the
whole history, are a look-ahead on real data. A file with `start_date` / `end_date` columns gives
each symbol several rows, and every (symbol, date) uses the row valid on that date
(`valid_rows`); dates outside every row of a symbol get empty fields. Without dates the fields
are static over the history, and the market records that (`static_fields`) so the run summary
and the MLflow run can say it.

Canonical table: `symbol, start_date, end_date, industry, index, description`, one row per
(symbol, period), periods of a symbol disjoint, `start_date` / `end_date` inclusive and NaT when
open-ended; the fields are strings, "" when empty.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from alphaloom.tasks.common.storage import FsPath, Location
from alphaloom.tasks.data.checks import DataValidationError, parse_dates, parse_symbols
from alphaloom.tasks.data.readers import BAR_ALIASES, FileProblem, read_table
from alphaloom.tasks.data.validation import Problem, ValidationReport, examples

FIELDS = ("industry", "index", "description")

INSTRUMENT_COLUMNS = ("symbol", "start_date", "end_date", *FIELDS)

INSTRUMENT_ALIASES: dict[str, tuple[str, ...]] = {
    "symbol": BAR_ALIASES["symbol"],
    "start_date": ("start_date", "start", "valid_from", "from_date", "effective_date"),
    "end_date": ("end_date", "end", "valid_to", "to_date", "until"),
    "industry": ("industry", "sector", "industry_name", "gics_sector"),
    "index": ("index", "index_name", "indices", "index_code", "benchmark"),
    "description": ("description", "desc", "business_summary", "long_business_summary", "summary"),
}


def empty_instruments(symbols: Iterable[str]) -> pd.DataFrame:
    """One open-ended row per symbol with empty fields (no instruments file)."""
    symbols = list(dict.fromkeys(symbols))
    return canonical(pd.DataFrame({"symbol": symbols}))


def canonical(table: pd.DataFrame) -> pd.DataFrame:
    """Any instruments frame (the generator's, a test's) in the canonical column layout."""
    out = pd.DataFrame({"symbol": table["symbol"].astype(str).to_numpy()})
    for col in ("start_date", "end_date"):
        values = table[col] if col in table else pd.Series(pd.NaT, index=table.index)
        out[col] = pd.to_datetime(values.to_numpy()).astype("datetime64[ns]")
    for col in FIELDS:
        values = table[col] if col in table else pd.Series("", index=table.index)
        out[col] = values.astype("string").fillna("").str.strip().astype(str).to_numpy()
    return out.sort_values(["symbol", "start_date"], kind="stable", na_position="first")[
        list(INSTRUMENT_COLUMNS)
    ].reset_index(drop=True)


def is_dated(instruments: pd.DataFrame) -> bool:
    """True when any row has a start or end date (the fields are point-in-time)."""
    if "start_date" not in instruments:
        return False
    return bool(instruments[["start_date", "end_date"]].notna().any().any())


def static_fields(instruments: pd.DataFrame) -> list[str]:
    """The fields that are filled for some symbol and applied to its whole history."""
    if is_dated(instruments):
        return []
    return [f for f in FIELDS if f in instruments and (instruments[f].astype(str) != "").any()]


def _overlaps(table: pd.DataFrame) -> np.ndarray:
    """Rows whose period starts on or before the end of the same symbol's previous period."""
    start = table["start_date"].fillna(pd.Timestamp.min).to_numpy()
    end = table["end_date"].fillna(pd.Timestamp.max).to_numpy()
    same = np.r_[False, table["symbol"].to_numpy()[1:] == table["symbol"].to_numpy()[:-1]]
    return same & (start <= np.r_[start[:1], end[:-1]])


def _check(table: pd.DataFrame, source: str, labels: dict[str, str]) -> list[Problem]:
    """Every problem of the instruments table at once (empty symbols, bad or crossed dates,
    overlapping or repeated rows of one symbol)."""
    rows = pd.Series(np.arange(1, len(table) + 1), index=table.index)
    found: list[tuple[str, str, pd.Series]] = []
    found.append(("symbol", "missing symbol", table["symbol"] == ""))
    for col in ("start_date", "end_date"):
        found.append((col, "unparseable date", table[f"_{col}_bad"]))
    crossed = table["start_date"] > table["end_date"]
    found.append(("end_date", "end_date before start_date", crossed))
    ordered = table.sort_values(["symbol", "start_date"], kind="stable", na_position="first")
    overlap = pd.Series(_overlaps(ordered), index=ordered.index).reindex(table.index)
    dated = is_dated(table)
    found.append(
        ("symbol", "periods of one symbol overlap" if dated else "duplicate symbol", overlap)
    )
    out = []
    for column, problem, bad in found:
        if bad.any():
            shown = [f"row {r}: {table.at[i, 'symbol']!r}" for i, r in rows[bad].items()]
            label = labels.get(column, column)
            out.append(Problem("error", source, label, problem, int(bad.sum()), examples(shown)))
    return out


def read_instruments(
    path: Location | None, symbols: Iterable[str], encoding: str | None = None
) -> tuple[pd.DataFrame, ValidationReport]:
    """The canonical instruments of `symbols` and the file's validation report.

    Symbols absent from the file (or no file at all) get one open-ended row of empty fields;
    rows of symbols without bars are left out.
    """
    symbols = list(dict.fromkeys(symbols))
    report = ValidationReport()
    if path is None:
        return empty_instruments(symbols), report
    path = FsPath.of(path)
    source = str(path)
    if not path.is_file():
        raise DataValidationError(f"{path}: instruments file not found")
    try:
        raw, names = read_table(path, INSTRUMENT_ALIASES, None, INSTRUMENT_COLUMNS, encoding)
    except FileProblem as err:
        raise DataValidationError(err.problem.line()) from None
    report.add(raw.notes)
    report.files_read = 1
    if "symbol" not in raw.labels:
        raise DataValidationError(
            f"{source}: missing required column 'symbol' (found {', '.join(names)})"
        )
    table = raw.frame
    table["symbol"] = parse_symbols(table["symbol"])
    for col in ("start_date", "end_date"):
        parsed = parse_dates(table[col]) if col in table else None
        table[col] = parsed.values if parsed else pd.NaT
        table[f"_{col}_bad"] = table.index.isin(parsed.unparsed.index) if parsed else False
    report.add(_check(table, source, raw.labels))
    report.rows_read = len(table)
    unknown = sorted(set(symbols) - set(table["symbol"]))
    if unknown:
        report.add(
            [
                Problem(
                    "note",
                    source,
                    raw.labels["symbol"],
                    "symbols with bars but no instrument row (empty fields)",
                    len(unknown),
                    examples(unknown),
                )
            ]
        )
    known = canonical(table[table["symbol"].isin(symbols)])
    missing = empty_instruments(unknown)
    out = pd.concat([known, missing], ignore_index=True) if unknown else known
    return canonical(out), report


def valid_rows(instruments: pd.DataFrame, symbols: np.ndarray, days: np.ndarray) -> np.ndarray:
    """For each (symbol, day), the position of the instruments row valid on that day, or -1.

    `symbols` are names, `days` datetime64 values (any unit). A row is valid from its start date
    to its end date inclusive, NaT meaning open; periods of a symbol are disjoint.
    """
    table = canonical(instruments) if "start_date" not in instruments else instruments
    names = pd.Index(sorted(set(table["symbol"]).union(symbols)))
    inst_code = names.get_indexer(table["symbol"]).astype(np.int64)
    row_code = names.get_indexer(pd.Index(symbols)).astype(np.int64)
    day = np.asarray(days, dtype="datetime64[D]").astype(np.int64)
    start = table["start_date"].to_numpy("datetime64[D]").astype(np.int64)
    end = table["end_date"].to_numpy("datetime64[D]").astype(np.int64)
    nat = np.iinfo(np.int64).min
    lo, hi = -(1 << 40), 1 << 40
    start = np.where(start == nat, lo, start)
    end = np.where(end == nat, hi, end)
    span = 1 << 42  # wider than any day number, so symbols never interleave
    order = np.lexsort((start, inst_code))
    keys = inst_code[order] * span + (start[order] - lo)
    probe = row_code * span + (day - lo)
    at = np.searchsorted(keys, probe, side="right") - 1
    found = at >= 0
    candidate = order[np.clip(at, 0, None)]
    found &= inst_code[candidate] == row_code
    found &= day <= end[candidate]
    return np.where(found, candidate, -1)
