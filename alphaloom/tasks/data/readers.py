"""Reading input files: discovery, encodings, column spellings, raw tables with canonical names.

Readers never stop at the first bad file: a file that cannot be used comes back as a `Problem`
for the validation report, so one run lists every file's trouble. Only an IO error that may pass
(a dropped connection) is raised, so the stage's retry can take it.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd
import pyarrow.parquet as pq

from alphaloom.tasks.common.storage import FsPath, Location
from alphaloom.tasks.data.checks import (
    NA_STRINGS,
    DataValidationError,
    parse_dates,
    parse_numbers,
    parse_symbols,
)
from alphaloom.tasks.data.validation import Problem
from alphaloom.tasks.orchestration.retries import is_transient

logger = logging.getLogger(__name__)


BAR_COLUMNS = ("symbol", "date", "open", "high", "low", "close", "volume")


ORACLE_COLUMNS = ("symbol", "date", "expected_return")


# Canonical name -> accepted spellings (after lower-casing and turning non-alphanumerics into
# "_"), in priority order: when a file has two of them the first one wins.
BAR_ALIASES: dict[str, tuple[str, ...]] = {
    "symbol": ("symbol", "ts_code", "ticker", "code", "instrument", "stock_code", "name"),
    "date": ("date", "trade_date", "datetime", "trading_date", "timestamp", "time", "day"),
    "open": ("open", "open_price", "openprice"),
    "high": ("high", "high_price", "highprice"),
    "low": ("low", "low_price", "lowprice"),
    "close": ("close", "close_price", "closeprice"),
    "adj_close": ("adj_close", "adjclose", "adjusted_close", "adj_close_price"),
    "adj_factor": ("adj_factor", "adjfactor", "adjustment_factor"),
    "volume": ("volume", "vol", "volume_traded"),
    "amount": ("amount", "turnover", "money", "amt"),
}


ORACLE_ALIASES: dict[str, tuple[str, ...]] = {
    "symbol": ("symbol",),
    "date": ("date",),
    "expected_return": ("expected_return",),
}


REQUIRED_BAR_COLUMNS = ("date", "open", "high", "low", "close", "volume")


SUFFIXES = (".csv.gz", ".csv", ".parquet", ".pq")


_NOT_BARS = {"instruments", "oracle", "meta", "synthetic"}


def strip_suffix(name: str) -> tuple[str, str]:
    """('AAPL', '.csv') for 'AAPL.csv'; ('', '') when the suffix is not a supported one."""
    lower = name.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return "", ""


def _is_market_dir(path: FsPath) -> bool:
    """A directory written by `write_market` or `save_market` (its bars live in bars.parquet)."""
    marker = (path / "synthetic.json").is_file() or (path / "meta.json").is_file()
    return marker and (path / "bars.parquet").is_file()


@dataclass
class Discovery:
    """The bar files of a path, and the entries next to them that were not read (as notes)."""

    files: list[FsPath]
    skipped: list[Problem] = field(default_factory=list)


def discover_bar_files(path: Location) -> Discovery:
    """The bar files `path` holds: the file itself or a directory's data files.

    In a directory, files named instruments.* / oracle.* and hidden files are not bars; any
    other file of an unsupported type (README.txt, a spreadsheet) is skipped with a note. `path`
    may be an fsspec URL (s3://, memory://, file://).
    """
    path = FsPath.of(path)
    if not path.exists():
        raise DataValidationError(f"{path}: no such file or directory")
    if path.is_file():
        if not strip_suffix(path.name)[1]:
            raise DataValidationError(
                f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}"
            )
        return Discovery([path])
    if _is_market_dir(path):
        return Discovery([path / "bars.parquet"])
    found = Discovery([])
    for entry in sorted(path.iterdir(), key=lambda e: e.name):
        stem, suffix = strip_suffix(entry.name)
        if entry.name.startswith((".", "_")) or stem.lower() in _NOT_BARS:
            continue
        if suffix and entry.is_file():
            found.files.append(entry)
        elif entry.is_file():
            found.skipped.append(
                Problem(
                    "note", str(entry), "", f"not a data file ({', '.join(SUFFIXES)}); ignored", 0
                )
            )
    if not found.files:
        raise DataValidationError(f"{path}: empty input, no CSV or parquet bar files in it")
    return found


def bar_files(path: Location) -> list[FsPath]:
    """The bar files `read_bars` reads for `path` (see `discover_bar_files`)."""
    return discover_bar_files(path).files


def companion(bars_path: Location, stems: Iterable[str]) -> FsPath | None:
    """instruments.* / oracle.* next to the bars when `bars_path` is a directory."""
    path = FsPath.of(bars_path)
    if not path.is_dir():
        return None
    for stem in stems:
        if (path / stem).is_file():
            return path / stem
    return None


def normalise(name: str) -> str:
    """'Adj Close' -> 'adj_close', so spellings compare case- and punctuation-insensitively."""
    return re.sub(r"[^0-9a-z]+", "_", str(name).strip().lstrip("\ufeff").lower()).strip("_")


def _user_map(column_map: dict[str, str] | None, canonical: Iterable[str]) -> dict[str, str]:
    """data.column_map as {normalised file column: canonical name}, either direction accepted."""
    canonical = set(canonical)
    out: dict[str, str] = {}
    for key, value in (column_map or {}).items():
        k, v = normalise(key), normalise(value)
        if v in canonical:
            out[k] = v
        elif k in canonical:
            out[v] = k
        else:
            raise DataValidationError(
                f"data.column_map: neither '{key}' nor '{value}' is a canonical column "
                f"(one of {', '.join(sorted(canonical))})"
            )
    return out


def resolve_columns(
    columns: Iterable[str], aliases: dict[str, tuple[str, ...]], column_map: dict[str, str] | None
) -> dict[str, str]:
    """{file column: canonical name}: user mappings first, then the first matching spelling."""
    by_norm: dict[str, str] = {}
    for col in columns:
        by_norm.setdefault(normalise(col), col)
    mapping: dict[str, str] = {}
    for norm, canon in _user_map(column_map, aliases).items():
        if norm in by_norm and canon not in mapping.values():
            mapping[by_norm[norm]] = canon
    for canon, spellings in aliases.items():
        if canon in mapping.values():
            continue
        for spelling in spellings:
            original = by_norm.get(spelling)
            if original is not None and original not in mapping:
                mapping[original] = canon
                break
    return mapping


def is_parquet(path: FsPath) -> bool:
    return strip_suffix(path.name)[1] in (".parquet", ".pq")


class FileProblem(Exception):
    """A file cannot be used at all; carries the report line (caught by the validation pass)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.line())
        self.problem = problem


def _unreadable(path: FsPath, err: Exception) -> FileProblem | DataValidationError:
    """A transient IO error is raised for the retry; anything else is a problem of the file."""
    if is_transient(err):
        return DataValidationError(f"{path}: cannot be read: {err}")
    return FileProblem(Problem("error", str(path), "", f"cannot be read as CSV/parquet: {err}", 0))


@dataclass
class TextFile:
    """A CSV file's bytes and the encoding they decode with."""

    data: bytes
    encoding: str
    note: Problem | None = None  # set when the encoding is not UTF-8


# Encodings data vendors ship besides UTF-8; detection picks among these only, so a short file
# with one accented letter is not read as some rare code page.
VENDOR_ENCODINGS = (
    "utf_16", "utf_32", "cp1252", "cp1250", "cp1251", "latin_1", "gb18030", "big5",
    "shift_jis", "cp932", "euc_kr", "euc_jp", "koi8_r",
)  # fmt: skip


def decode_csv(path: FsPath, encoding: str | None = None) -> TextFile:
    """The file's bytes and its encoding: `encoding` (data.encoding) when given; else UTF-8 (a
    BOM allowed), else what charset-normalizer detects among VENDOR_ENCODINGS, reported as a
    note so a wrong guess can be overridden."""
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        import gzip

        data = gzip.decompress(data)
    if encoding is not None:
        return TextFile(data, encoding)
    try:
        data.decode("utf-8")
        return TextFile(data, "utf-8-sig")
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data, cp_isolation=list(VENDOR_ENCODINGS)).best()
    if best is None:
        raise FileProblem(Problem("error", str(path), "", "not text in any known encoding", 0))
    note = Problem(
        "note", str(path), "", f"not UTF-8; read as {best.encoding} (set data.encoding if wrong)", 0
    )
    return TextFile(data, best.encoding, note)


@dataclass
class RawTable:
    """One file's rows under canonical column names, before any value is parsed."""

    path: FsPath
    frame: pd.DataFrame
    labels: dict[str, str]  # canonical name -> the file's spelling
    notes: list[Problem] = field(default_factory=list)


def _read_csv(text: TextFile, **kwargs) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(text.data), encoding=text.encoding, **kwargs)


def read_table(
    path: FsPath,
    aliases: dict[str, tuple[str, ...]],
    column_map: dict[str, str] | None,
    text_columns: tuple[str, ...],
    encoding: str | None = None,
) -> tuple[RawTable, list[str]]:
    """The file's mapped columns under canonical names (text columns as strings, numbers as
    read, NA spellings as missing), and all of its column names. Raises FileProblem."""
    notes: list[Problem] = []
    try:
        if is_parquet(path):
            with path.open() as handle:
                names = [c for c in pq.read_schema(handle).names if not c.startswith("__index")]
            mapping = resolve_columns(names, aliases, column_map)
            frame = pd.read_parquet(str(path), columns=list(mapping))
        else:
            text = decode_csv(path, encoding)
            notes += [text.note] if text.note else []
            names = [str(c) for c in _read_csv(text, nrows=0).columns]
            mapping = resolve_columns(names, aliases, column_map)
            frame = _read_csv(
                text,
                usecols=list(mapping),
                dtype={c: str for c, canon in mapping.items() if canon in text_columns},
                keep_default_na=False,
                na_values={
                    c: NA_STRINGS for c, canon in mapping.items() if canon not in text_columns
                },
            )
    except (FileProblem, DataValidationError):
        raise
    except pd.errors.EmptyDataError:
        raise FileProblem(Problem("note", str(path), "", "empty file (no header)", 0)) from None
    except Exception as err:
        raise _unreadable(path, err) from err
    labels = {canon: col for col, canon in mapping.items()}
    table = RawTable(path, frame.rename(columns=mapping).reset_index(drop=True), labels, notes)
    return table, names


def read_bar_table(
    path: FsPath, column_map: dict[str, str] | None, encoding: str | None = None
) -> RawTable:
    """A bar file's raw table; the symbol comes from a column or else from the file name.

    Raises FileProblem for a file without the required columns or without rows.
    """
    table, names = read_table(path, BAR_ALIASES, column_map, ("symbol", "date"), encoding)
    missing = [c for c in REQUIRED_BAR_COLUMNS if c not in table.labels]
    if missing:
        raise FileProblem(
            Problem(
                "error",
                str(path),
                "",
                f"missing required column(s) {', '.join(repr(c) for c in missing)} (found "
                f"{', '.join(names)}); map other names with data.column_map",
                len(table.frame),
            )
        )
    if table.frame.empty:
        raise FileProblem(Problem("note", str(path), "", "empty file (0 rows)", 0))
    if "symbol" not in table.frame:
        table.frame.insert(0, "symbol", strip_suffix(path.name)[0])
        table.labels["symbol"] = "(file name)"
    return table


def read_oracle(path: Location) -> pd.DataFrame:
    """An oracle.parquet written by `write_market`: symbol, date, expected_return."""
    path = FsPath.of(path)
    if not path.is_file():
        raise DataValidationError(f"{path}: oracle file not found")
    try:
        table, _ = read_table(path, ORACLE_ALIASES, None, text_columns=("symbol", "date"))
    except FileProblem as err:
        raise DataValidationError(err.problem.line()) from None
    missing = [c for c in ORACLE_COLUMNS if c not in table.labels]
    if missing:
        raise DataValidationError(f"{path}: missing required column(s) {missing}")
    frame = table.frame
    frame["symbol"] = parse_symbols(frame["symbol"])
    frame["date"] = parse_dates(frame["date"]).values
    frame["expected_return"] = parse_numbers(frame["expected_return"]).values
    if frame[list(ORACLE_COLUMNS)].isna().any().any() or frame.duplicated(["symbol", "date"]).any():
        raise DataValidationError(f"{path}: missing values or duplicate (symbol, date) rows")
    return frame[list(ORACLE_COLUMNS)].sort_values(["symbol", "date"], ignore_index=True)
