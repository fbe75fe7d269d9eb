"""Reading bar, instrument and oracle files: discovery, column spellings, checked tables."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import pandas as pd
import pyarrow.parquet as pq

from alphaloom.tasks.common.storage import FsPath, Location
from alphaloom.tasks.data.checks import (
    _NA_STRINGS,
    _NUMERIC,
    PRICE_COLUMNS,
    DataValidationError,
    _adjust,
    _check_numbers,
    _check_unique,
    _parse_dates,
    _parse_symbols,
    _to_float,
    _warn_inconsistent_ohlc,
)

logger = logging.getLogger(__name__)


BAR_COLUMNS = ("symbol", "date", "open", "high", "low", "close", "volume")


INSTRUMENT_COLUMNS = ("symbol", "industry", "index", "description")


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


INSTRUMENT_ALIASES: dict[str, tuple[str, ...]] = {
    "symbol": BAR_ALIASES["symbol"],
    "industry": ("industry", "sector", "industry_name", "gics_sector"),
    "index": ("index", "index_name", "indices", "index_code", "benchmark"),
    "description": ("description", "desc", "business_summary", "long_business_summary", "summary"),
}


ORACLE_ALIASES: dict[str, tuple[str, ...]] = {
    "symbol": ("symbol",),
    "date": ("date",),
    "expected_return": ("expected_return",),
}


_REQUIRED = ("date", *PRICE_COLUMNS, "volume")


_SUFFIXES = (".csv.gz", ".csv", ".parquet", ".pq")


_NOT_BARS = {"instruments", "oracle", "meta", "synthetic"}


def _strip_suffix(name: str) -> tuple[str, str]:
    """('AAPL', '.csv') for 'AAPL.csv'; ('', '') when the suffix is not a supported one."""
    lower = name.lower()
    for suffix in _SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return "", ""


def _is_market_dir(path: FsPath) -> bool:
    """A directory written by `write_market` or `save_market` (its bars live in bars.parquet)."""
    marker = (path / "synthetic.json").is_file() or (path / "meta.json").is_file()
    return marker and (path / "bars.parquet").is_file()


def bar_files(path: Location) -> list[FsPath]:
    """The bar files `read_bars` reads for `path`: the file itself or a directory's data files.

    In a directory, files named instruments.* / oracle.* and hidden files are not bars. `path`
    may be an fsspec URL (s3://, memory://, file://).
    """
    path = FsPath.of(path)
    if not path.exists():
        raise DataValidationError(f"{path}: no such file or directory")
    if path.is_file():
        if not _strip_suffix(path.name)[1]:
            raise DataValidationError(
                f"{path}: unsupported file type; expected one of {', '.join(_SUFFIXES)}"
            )
        return [path]
    if _is_market_dir(path):
        return [path / "bars.parquet"]
    files = []
    for entry in path.iterdir():
        stem, suffix = _strip_suffix(entry.name)
        hidden = entry.name.startswith((".", "_"))
        if suffix and not hidden and stem.lower() not in _NOT_BARS and entry.is_file():
            files.append(entry)
    if not files:
        raise DataValidationError(f"{path}: empty input, no CSV or parquet bar files in it")
    return files


def _companion(bars_path: Location, stems: Iterable[str]) -> FsPath | None:
    """instruments.* / oracle.* next to the bars when `bars_path` is a directory."""
    path = FsPath.of(bars_path)
    if not path.is_dir():
        return None
    for stem in stems:
        if (path / stem).is_file():
            return path / stem
    return None


def _normalise(name: str) -> str:
    """'Adj Close' -> 'adj_close', so spellings compare case- and punctuation-insensitively."""
    return re.sub(r"[^0-9a-z]+", "_", str(name).strip().lstrip("\ufeff").lower()).strip("_")


def _user_map(column_map: dict[str, str] | None, canonical: Iterable[str]) -> dict[str, str]:
    """data.column_map as {normalised file column: canonical name}, either direction accepted."""
    canonical = set(canonical)
    out: dict[str, str] = {}
    for key, value in (column_map or {}).items():
        k, v = _normalise(key), _normalise(value)
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


def _resolve_columns(
    columns: Iterable[str], aliases: dict[str, tuple[str, ...]], column_map: dict[str, str] | None
) -> dict[str, str]:
    """{file column: canonical name}: user mappings first, then the first matching spelling."""
    by_norm: dict[str, str] = {}
    for col in columns:
        by_norm.setdefault(_normalise(col), col)
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


def _is_parquet(path: FsPath) -> bool:
    return _strip_suffix(path.name)[1] in (".parquet", ".pq")


def _file_columns(path: FsPath) -> list[str]:
    """Column names of a CSV header or a parquet schema, without reading the data."""
    try:
        if _is_parquet(path):
            with path.open() as handle:
                names = pq.read_schema(handle).names
            return [c for c in names if not c.startswith("__index_level_")]
        return [str(c) for c in pd.read_csv(str(path), nrows=0).columns]
    except pd.errors.EmptyDataError:
        raise DataValidationError(f"{path}: empty input (the file has no header or rows)") from None
    except Exception as err:
        raise DataValidationError(f"{path}: cannot be read as CSV/parquet: {err}") from err


def _read_table(path: FsPath, mapping: dict[str, str], text: tuple[str, ...]) -> pd.DataFrame:
    """Read only the mapped columns, renamed to canonical names; `text` columns stay strings.

    pandas reads URLs through fsspec itself.
    """
    try:
        if _is_parquet(path):
            frame = pd.read_parquet(str(path), columns=list(mapping))
        else:
            frame = pd.read_csv(
                str(path),
                usecols=list(mapping),
                dtype={c: str for c, canon in mapping.items() if canon in text},
                keep_default_na=False,
                na_values={c: _NA_STRINGS for c, canon in mapping.items() if canon not in text},
            )
    except Exception as err:
        raise DataValidationError(f"{path}: cannot be read as CSV/parquet: {err}") from err
    return frame.rename(columns=mapping).reset_index(drop=True)


def _read_bar_file(path: FsPath, column_map: dict[str, str] | None) -> pd.DataFrame:
    """One file -> validated canonical bars (not yet sorted across files)."""
    source = str(path)
    mapping = _resolve_columns(_file_columns(path), BAR_ALIASES, column_map)
    labels = {canon: col for col, canon in mapping.items()}
    missing = [c for c in _REQUIRED if c not in labels]
    if missing:
        raise DataValidationError(
            f"{source}: missing required column(s) {', '.join(repr(c) for c in missing)} "
            f"(found {', '.join(_file_columns(path))}); map other names with data.column_map"
        )
    frame = _read_table(path, mapping, text=("symbol", "date"))
    if frame.empty:
        raise DataValidationError(f"{source}: empty input (0 rows)")
    if "symbol" in frame:
        frame["symbol"] = _parse_symbols(frame["symbol"], source, labels["symbol"])
    else:
        frame.insert(0, "symbol", _strip_suffix(path.name)[0])
    frame["date"] = _parse_dates(frame["date"], source, labels["date"])
    for col in _NUMERIC:
        if col in frame:
            frame[col] = _to_float(frame[col], source, labels[col])
    _check_numbers(frame, source, labels)
    _check_unique(frame, ["symbol", "date"], source)
    frame = _adjust(frame, source)
    _warn_inconsistent_ohlc(frame, source)
    extra = ["amount"] if "amount" in frame else []
    return frame[[*BAR_COLUMNS, *extra]]


def read_bars(path: Location, column_map: dict[str, str] | None = None) -> pd.DataFrame:
    """Read a bar file or directory (long format or one file per symbol) into canonical bars."""
    files = bar_files(path)
    frames = [_read_bar_file(f, column_map) for f in files]
    if len({"amount" in f for f in frames}) > 1:
        logger.warning("%s: only some files have an amount column; amount is dropped", path)
        frames = [f.drop(columns="amount", errors="ignore") for f in frames]
    bars = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if len(frames) > 1:
        _check_unique(bars, ["symbol", "date"], f"{path} (across its files)")
    return _sorted(bars)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    """Sort by (symbol, date) with a fresh RangeIndex (dates in files may be in any order)."""
    return frame.sort_values(["symbol", "date"], kind="stable").reset_index(drop=True)


def drop_short_histories(bars: pd.DataFrame, min_history: int, source: str = "") -> pd.DataFrame:
    """Drop symbols with fewer than `min_history` rows (they cannot fill one window + label)."""
    counts = bars.groupby("symbol", sort=False)["date"].transform("size")
    keep = counts >= min_history
    if keep.all():
        return bars
    n_all = bars["symbol"].nunique()
    n_dropped = n_all - bars.loc[keep, "symbol"].nunique()
    if not keep.any():
        raise DataValidationError(
            f"{source or 'bars'}: none of the {n_all} symbols has the {min_history} rows "
            "needed (window + horizon)"
        )
    logger.warning(
        "%s: dropped %d of %d symbols with fewer than %d rows (window + horizon)",
        source or "bars", n_dropped, n_all, min_history,
    )  # fmt: skip
    return bars.loc[keep].reset_index(drop=True)


def read_instruments(path: Location | None, symbols: Iterable[str]) -> pd.DataFrame:
    """One row per symbol (in the given order) with industry, index and description as str.

    Every field is optional; symbols absent from the file (or no file at all) get "".
    """
    symbols = list(dict.fromkeys(symbols))
    out = pd.DataFrame({"symbol": pd.Series(symbols, dtype=str)})
    if path is None:
        return out.assign(industry="", index="", description="").astype(str)
    path = FsPath.of(path)
    source = str(path)
    if not path.is_file():
        raise DataValidationError(f"{path}: instruments file not found")
    mapping = _resolve_columns(_file_columns(path), INSTRUMENT_ALIASES, None)
    if "symbol" not in mapping.values():
        raise DataValidationError(
            f"{source}: missing required column 'symbol' (found {', '.join(_file_columns(path))})"
        )
    table = _read_table(path, mapping, text=tuple(INSTRUMENT_COLUMNS))
    labels = {canon: col for col, canon in mapping.items()}
    table["symbol"] = _parse_symbols(table["symbol"], source, labels["symbol"])
    dup = table["symbol"].duplicated(keep=False)
    if dup.any():
        raise DataValidationError(
            f"{source}: column '{labels['symbol']}' has {int(dup.sum())} rows with duplicate "
            f"symbols (first: {table.loc[dup, 'symbol'].iloc[0]!r})"
        )
    for col in INSTRUMENT_COLUMNS[1:]:
        table[col] = table[col].astype("string").fillna("").str.strip() if col in table else ""
    unknown = int((~out["symbol"].isin(table["symbol"])).sum())
    if unknown:
        logger.info(
            "%s: %d symbol(s) have no instrument row; their fields are empty", path, unknown
        )
    merged = out.merge(table[list(INSTRUMENT_COLUMNS)], on="symbol", how="left")
    return merged.fillna("").astype(str)


def read_oracle(path: Location) -> pd.DataFrame:
    """An oracle.parquet written by `write_market`: symbol, date, expected_return."""
    path = FsPath.of(path)
    source = str(path)
    if not path.is_file():
        raise DataValidationError(f"{path}: oracle file not found")
    mapping = _resolve_columns(_file_columns(path), ORACLE_ALIASES, None)
    missing = [c for c in ORACLE_COLUMNS if c not in mapping.values()]
    if missing:
        raise DataValidationError(f"{source}: missing required column(s) {missing}")
    frame = _read_table(path, mapping, text=("symbol", "date"))
    frame["symbol"] = _parse_symbols(frame["symbol"], source, "symbol")
    frame["date"] = _parse_dates(frame["date"], source, "date")
    frame["expected_return"] = _to_float(frame["expected_return"], source, "expected_return")
    _check_unique(frame, ["symbol", "date"], source)
    return _sorted(frame[list(ORACLE_COLUMNS)])
