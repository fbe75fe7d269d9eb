"""One validation pass over every bar file: typed rows, every problem, the invalid rows apart.

Why one pass: a vendor's directory with three bad rows in three files must produce one report
listing all three, not three failed runs. Each file is read and parsed without raising; then the
schema (tasks/data/checks.py) is checked once over the rows of all files, lazily, and its failure
cases become the report's lines and the invalid-row mask. What the policy does with the invalid
rows (`data.on_invalid`) is decided by the caller (tasks/data/ingest.py), with one exception: a
file whose dates are in no single order (day/month or month/day, tasks/data/date_order.py) stops
the run under any policy, because dropping it would silently lose a symbol and reading it would
be a guess; it needs `data.date_format`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from alphaloom.tasks.common.storage import FsPath, Location
from alphaloom.tasks.data.checks import (
    NUMERIC_COLUMNS,
    PROBLEM_NAMES,
    BarKeys,
    BarRows,
    DataValidationError,
    adjust_prices,
    failure_cases,
    inconsistent_ohlc,
    parse_dates,
    parse_numbers,
    parse_symbols,
)
from alphaloom.tasks.data.readers import (
    BAR_COLUMNS,
    FileProblem,
    discover_bar_files,
    read_bar_table,
)
from alphaloom.tasks.data.validation import Problem, ValidationReport, examples

logger = logging.getLogger(__name__)

SOURCE_FILE = "_file"  # bookkeeping columns: which file (its number) and which data row (from 1)
SOURCE_ROW = "_row"
OPTIONAL_COLUMNS = ("adj_close", "adj_factor", "amount")


@dataclass
class ValidatedBars:
    """The valid rows as canonical bars, the report, and the invalid rows as read."""

    bars: pd.DataFrame  # canonical, adjusted where the input says how, sorted by (symbol, date)
    report: ValidationReport
    quarantine: pd.DataFrame  # invalid rows: source file and row, problems, parsed values
    unadjusted: set[str] = field(default_factory=set)  # symbols without adj_close / adj_factor


@dataclass
class _Parsed:
    """All files' rows in one typed frame plus the raw text of cells that did not parse."""

    frame: pd.DataFrame
    files: list[str]
    labels: list[dict[str, str]]
    columns: list[tuple[str, ...]]  # optional columns each file has
    unparsed: dict[tuple[int, str], pd.Series]  # (file number, column) -> raw text by row
    stops: list[Problem] = field(default_factory=list)  # files that stop the run (date order)


class _NoDateOrder(FileProblem):
    """A file's dates are in no single order: the file is rejected whole and the run stops."""


def _parse_file(table, number: int, date_format: str | None, parsed: _Parsed) -> pd.DataFrame:
    frame = table.frame
    dates = parse_dates(frame["date"], date_format)
    if dates.problem:
        label = table.labels["date"]
        shown = examples(dates.examples)
        raise _NoDateOrder(
            Problem("error", str(table.path), label, dates.problem, len(frame), shown)
        )
    frame["symbol"] = parse_symbols(frame["symbol"])
    frame["date"] = dates.values
    if len(dates.unparsed):
        parsed.unparsed[(number, "date")] = dates.unparsed
    for col in NUMERIC_COLUMNS:
        if col in frame:
            numbers = parse_numbers(frame[col])
            frame[col] = numbers.values
            if len(numbers.unparsed):
                parsed.unparsed[(number, col)] = numbers.unparsed
    frame[SOURCE_FILE] = np.int32(number)
    frame[SOURCE_ROW] = np.arange(1, len(frame) + 1, dtype=np.int64)
    parsed.files.append(str(table.path))
    parsed.labels.append(table.labels)
    parsed.columns.append(tuple(c for c in OPTIONAL_COLUMNS if c in frame))
    return frame


def _read_all(
    path: Location, column_map: dict[str, str] | None, date_format: str | None, encoding: str | None
) -> tuple[_Parsed, ValidationReport]:
    """Read and parse every file; unusable files become report lines, never exceptions."""
    found = discover_bar_files(path)
    report = ValidationReport(problems=list(found.skipped))
    parsed = _Parsed(pd.DataFrame(), [], [], [], {})
    frames, skipped_rows = [], 0
    for file in found.files:
        try:
            table = read_bar_table(file, column_map, encoding)
            frame = _parse_file(table, len(frames), date_format, parsed)
        except FileProblem as err:  # its rows (if it has any) count as invalid
            report.add([err.problem])
            report.files_skipped += 1
            skipped_rows += err.problem.rows if err.problem.severity == "error" else 0
            parsed.stops += [err.problem] if isinstance(err, _NoDateOrder) else []
            continue
        report.add(table.notes)
        frames.append(frame)
    report.files_read = len(frames)
    if not frames:
        report.rows_read = report.invalid_rows = skipped_rows
        _stop_on_date_order(parsed.stops, report)
        raise DataValidationError(
            f"{path}: empty input, no rows in any of its {len(found.files)} file(s)\n"
            + report.render(),
            report,
        )
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    with_amount = ["amount" in cols for cols in parsed.columns]
    if any(with_amount) and not all(with_amount):
        problem = "only some files have it; dropped from all"
        report.add([Problem("note", str(path), "amount", problem, with_amount.count(False))])
        frame = frame.drop(columns="amount")
        parsed.columns = [tuple(c for c in cols if c != "amount") for cols in parsed.columns]
    parsed.frame = frame
    report.rows_read = len(frame) + skipped_rows
    report.invalid_rows = skipped_rows
    return parsed, report


def _stop_on_date_order(stops: list[Problem], report: ValidationReport) -> None:
    """Raise DataValidationError (with the report) when a file's dates are in no single order."""
    if not stops:
        return
    files = ", ".join(p.file for p in stops)
    reason = f"the dates of {files} are in no single order; set data.date_format"
    raise DataValidationError(f"invalid input data ({reason}):\n{report.render()}", report)


def _cases(parsed: _Parsed) -> pd.DataFrame:
    """Failure cases of the row schema (per group of files with the same optional columns)
    and of the key schema (over every row with a usable key)."""
    frame, parts = parsed.frame, []
    signatures = sorted(set(parsed.columns))
    group_of_file = np.array([signatures.index(cols) for cols in parsed.columns])
    group = group_of_file[frame[SOURCE_FILE].to_numpy()]
    for number, columns in enumerate(signatures):
        rows = frame.index[group == number] if len(signatures) > 1 else frame.index
        parts.append(failure_cases(BarRows, frame.loc[rows, [*BAR_COLUMNS, *columns]]))
    keyed = frame[(frame["symbol"] != "") & frame["date"].notna()]
    parts.append(failure_cases(BarKeys, keyed[["symbol", "date"]]))
    cases = pd.concat(parts, ignore_index=True)
    cases["index"] = cases["index"].astype(np.int64)
    return cases


def _value_text(parsed: _Parsed, case: pd.Series) -> str:
    """How a failing cell is shown: the raw text that did not parse, else the parsed value."""
    frame = parsed.frame
    if case["check"] in ("multiple_fields_uniqueness", "case_clash"):
        return (
            f"({frame.at[case['index'], 'symbol']!r}, {frame.at[case['index'], 'date']:%Y-%m-%d})"
        )
    raw = parsed.unparsed.get((case["file"], case["column"]))
    if raw is not None and case["row"] - 1 in raw.index:
        return repr(str(raw.loc[case["row"] - 1]))
    value = frame.at[case["index"], case["column"]]
    if pd.isna(value):
        return "missing"
    return (
        f"{value:%Y-%m-%d}"
        if isinstance(value, pd.Timestamp)
        else repr(getattr(value, "item", lambda: value)())
    )


def _problem_name(parsed: _Parsed, case: pd.Series) -> str:
    """The report's wording of a failure case (unparseable text is told apart from blanks)."""
    name = PROBLEM_NAMES.get(case["check"], case["check"])
    raw = parsed.unparsed.get((case["file"], case["column"]))
    if case["check"] == "not_nullable" and raw is not None and case["row"] - 1 in raw.index:
        return "unparseable date" if case["column"] == "date" else "non-numeric value"
    if case["column"] in ("open", "high", "low", "close", "adj_close", "adj_factor"):
        return name.replace("non-positive value", "non-positive price")
    return name


def _describe(parsed: _Parsed, cases: pd.DataFrame) -> pd.DataFrame:
    """Failure cases with their file, row, the file's column label, wording and shown value."""
    frame = parsed.frame
    cases = cases.assign(
        file=frame[SOURCE_FILE].to_numpy()[cases["index"]].astype(int),
        row=frame[SOURCE_ROW].to_numpy()[cases["index"]].astype(int),
    )
    cases["problem"] = [_problem_name(parsed, case) for _, case in cases.iterrows()]
    cases["shown"] = [_value_text(parsed, case) for _, case in cases.iterrows()]
    key = cases["check"].isin(["multiple_fields_uniqueness", "case_clash"])
    cases["label"] = [
        "/".join(parsed.labels[f][c] for c in ("symbol", "date"))
        if k
        else parsed.labels[f].get(c, c)
        for f, c, k in zip(cases["file"], cases["column"], key, strict=True)
    ]
    clash = cases["check"] == "case_clash"
    if clash.any():
        symbols = frame.loc[cases.loc[clash, "index"], "symbol"]
        spellings = symbols.groupby(symbols.str.casefold()).agg(lambda s: sorted(set(s)))
        cases.loc[clash, "problem"] = [
            "ticker differs only in case from "
            + ", ".join(repr(o) for o in spellings[s.casefold()] if o != s)
            for s in symbols
        ]
    dup = cases["check"] == "multiple_fields_uniqueness"
    if dup.any():
        keys = frame.loc[cases.loc[dup, "index"], ["symbol", "date"]]
        files_per_key = frame.loc[keys.index].groupby(["symbol", "date"])[SOURCE_FILE].nunique()
        across = files_per_key.reindex(pd.MultiIndex.from_frame(keys)).to_numpy() > 1
        cases.loc[dup, "problem"] = np.where(
            across, "duplicate (symbol, date) key, also in another file", cases.loc[dup, "problem"]
        )
    return cases


def _problems(parsed: _Parsed, cases: pd.DataFrame) -> list[Problem]:
    """One report line per (file, column, problem), with counts and the first examples."""
    out = []
    for (file, label, problem), group in cases.groupby(["file", "label", "problem"], sort=True):
        group = group.sort_values("row")
        shown = [f"row {r}: {v}" for r, v in zip(group["row"], group["shown"], strict=True)]
        out.append(
            Problem("error", parsed.files[file], label, problem, len(group), examples(shown))
        )
    return out


def _warnings(parsed: _Parsed, valid: np.ndarray) -> list[Problem]:
    """Rows kept as they are but worth a look: high/low outside open/close."""
    frame = parsed.frame
    bad = np.zeros(len(frame), bool)
    bad[valid] = inconsistent_ohlc(frame.iloc[valid])
    out = []
    for file, rows in frame.loc[bad, SOURCE_ROW].groupby(frame.loc[bad, SOURCE_FILE]):
        labels = parsed.labels[int(file)]
        column = f"{labels['high']}/{labels['low']}"
        shown = [f"row {r}" for r in rows.to_numpy()]
        out.append(
            Problem(
                "warning",
                parsed.files[int(file)],
                column,
                "high/low outside open/close (kept as is)",
                len(rows),
                examples(shown),
            )
        )
    return out


def _quarantine(parsed: _Parsed, cases: pd.DataFrame, invalid: np.ndarray) -> pd.DataFrame:
    """The invalid rows with where they came from and everything wrong with each."""
    frame = parsed.frame
    parts = [cases[c].astype(str) for c in ("label", "problem", "shown")]
    text = parts[0] + ": " + parts[1] + " (" + parts[2] + ")"
    problems = text.groupby(cases["index"]).agg("; ".join)
    rows = frame.loc[invalid]
    out = pd.DataFrame(
        {
            "source_file": np.asarray(parsed.files, dtype=object)[rows[SOURCE_FILE].to_numpy()],
            "source_row": rows[SOURCE_ROW].to_numpy(),
            "problems": problems.reindex(rows.index).to_numpy(),
        }
    )
    for col in (*BAR_COLUMNS, *OPTIONAL_COLUMNS):
        if col in rows:
            out[col] = rows[col].to_numpy()
    return out.astype({"source_file": str, "problems": str})


def validate_bar_files(
    path: Location,
    column_map: dict[str, str] | None = None,
    date_format: str | None = None,
    encoding: str | None = None,
) -> ValidatedBars:
    """Read every bar file under `path` and check all rows at once.

    Never raises for bad rows or bad files (they are in the report, and the rows in
    `quarantine`); raises DataValidationError, with the whole report attached, when no file has
    any row or when a file's dates are in no single order (it needs `data.date_format`).
    """
    parsed, report = _read_all(path, column_map, date_format, encoding)
    frame = parsed.frame
    cases = _describe(parsed, _cases(parsed))
    invalid = np.zeros(len(frame), bool)
    invalid[cases["index"].to_numpy()] = True
    report.add(_problems(parsed, cases))
    report.invalid_rows += int(invalid.sum())
    dup_rows = cases.loc[cases["check"] == "multiple_fields_uniqueness", "index"].unique()
    report.duplicate_rows = len(dup_rows)
    report.add(_warnings(parsed, np.flatnonzero(~invalid)))
    quarantine = _quarantine(parsed, cases, invalid)
    valid = frame.loc[~invalid]
    adjusted = pd.Series(False, index=valid.index)
    for col in ("adj_close", "adj_factor"):
        if col in valid:
            adjusted |= valid[col].notna()
    unadjusted = set(valid.loc[~adjusted, "symbol"]) - set(valid.loc[adjusted, "symbol"])
    bars = adjust_prices(valid.drop(columns=[SOURCE_FILE, SOURCE_ROW]).copy())
    extra = ["amount"] if "amount" in bars else []
    bars = bars[[*BAR_COLUMNS, *extra]].sort_values(["symbol", "date"], kind="stable")
    _stop_on_date_order(parsed.stops, report)
    return ValidatedBars(bars.reset_index(drop=True), report, quarantine, unadjusted)


def read_bars(path: Location, column_map: dict[str, str] | None = None) -> pd.DataFrame:
    """Canonical bars of a file or directory, or a DataValidationError listing every problem.

    The strict reader (`data.on_invalid: error`); the pipeline's policy lives in ingest.
    """
    checked = validate_bar_files(FsPath.of(path), column_map)
    if checked.report.errors:
        raise DataValidationError(checked.report.render(("error",)), checked.report)
    return checked.bars
