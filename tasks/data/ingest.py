"""Market data in: the synthetic market or the user's own CSV/parquet bars, validated and canonical.

Why: every later stage trusts the canonical bars table, so all the mess of real files (column
spellings, per-symbol files, adjusted prices, bad rows) is handled and rejected here, with an
error that names the file, the column and how many rows, before anything is written.

Canonical bars: `symbol` (str), `date` (datetime64[ns], midnight), `open, high, low, close,
volume` (float64) and optional `amount` (float64); sorted by (symbol, date), RangeIndex, unique
(symbol, date). Prices are adjusted when the input has `adj_factor` (price * adj_factor) or
`adj_close` (factor = adj_close / close); volume is divided by the same factor (Qlib's
convention) so amount / volume stays a VWAP on the adjusted price scale.

`data.column_map` maps a file's column to a canonical name, e.g. `{"PX_LAST": "close"}`
(the reverse `{"close": "PX_LAST"}` is accepted too); it wins over the built-in spellings.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from alphaloom.tasks.common.config import DataSection, PipelineConfig
from alphaloom.tasks.common.hashing import combine, hash_frame, hash_json, sha256_file
from alphaloom.tasks.common.storage import (
    Location,
    atomic_dir,
    base_name,
    child,
    exists,
    is_dir,
    is_file,
    list_dir,
    local_copy,
    local_or_url,
    output_complete,
    read_text,
    sha256_of,
    url_filesystem,
)
from alphaloom.tasks.data import synthetic
from alphaloom.tasks.orchestration.caching import StageRef, stage_dir, stage_key, stage_task

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PRICE_COLUMNS = ("open", "high", "low", "close")
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
_NUMERIC = (*PRICE_COLUMNS, "adj_close", "adj_factor", "volume", "amount")
_POSITIVE = (*PRICE_COLUMNS, "adj_close", "adj_factor")
_NA_STRINGS = ["", "NA", "N/A", "n/a", "NaN", "nan", "NULL", "null", "None", "#N/A", "-"]
_SUFFIXES = (".csv.gz", ".csv", ".parquet", ".pq")
_NOT_BARS = {"instruments", "oracle", "meta", "synthetic"}


class DataValidationError(ValueError):
    """Input data is unusable; the message names the file, the column and how many rows."""


@dataclass
class MarketData:
    """Canonical bars, instruments (one row per bar symbol) and, for synthetic data, the oracle."""

    bars: pd.DataFrame
    instruments: pd.DataFrame
    oracle: pd.DataFrame | None
    source_hash: str


# --------------------------------------------------------------------------- files and columns


def _strip_suffix(name: str) -> tuple[str, str]:
    """('AAPL', '.csv') for 'AAPL.csv'; ('', '') when the suffix is not a supported one."""
    lower = name.lower()
    for suffix in _SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return "", ""


def _is_market_dir(path: Path | str) -> bool:
    """A directory written by `write_market` or `save_market` (its bars live in bars.parquet)."""
    marker = is_file(child(path, "synthetic.json")) or is_file(child(path, "meta.json"))
    return marker and is_file(child(path, "bars.parquet"))


def bar_files(path: str | Path) -> list[Path | str]:
    """The bar files `read_bars` reads for `path`: the file itself or a directory's data files.

    In a directory, files named instruments.* / oracle.* and hidden files are not bars. `path`
    may be an fsspec URL (s3://, memory://, file://); remote files come back as URLs.
    """
    path = local_or_url(path)
    if not exists(path):
        raise DataValidationError(f"{path}: no such file or directory")
    if is_file(path):
        if not _strip_suffix(base_name(path))[1]:
            raise DataValidationError(
                f"{path}: unsupported file type; expected one of {', '.join(_SUFFIXES)}"
            )
        return [path]
    if _is_market_dir(path):
        return [child(path, "bars.parquet")]
    files = []
    for entry in list_dir(path):
        stem, suffix = _strip_suffix(base_name(entry))
        hidden = base_name(entry).startswith((".", "_"))
        if suffix and not hidden and stem.lower() not in _NOT_BARS and is_file(entry):
            files.append(entry)
    if not files:
        raise DataValidationError(f"{path}: empty input, no CSV or parquet bar files in it")
    return files


def _companion(bars_path: str | Path, stems: Iterable[str]) -> Path | str | None:
    """instruments.* / oracle.* next to the bars when `bars_path` is a directory."""
    path = local_or_url(bars_path)
    if not is_dir(path):
        return None
    for stem in stems:
        if is_file(child(path, stem)):
            return child(path, stem)
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


def _parquet_schema(path: Path | str) -> list[str]:
    if isinstance(path, Path):
        return pq.read_schema(path).names
    fs, inner = url_filesystem(path)
    return pq.read_schema(inner, filesystem=fs).names


def _file_columns(path: Path | str) -> list[str]:
    """Column names of a CSV header or a parquet schema, without reading the data."""
    try:
        if _strip_suffix(base_name(path))[1] in (".parquet", ".pq"):
            return [c for c in _parquet_schema(path) if not c.startswith("__index_level_")]
        return [str(c) for c in pd.read_csv(path, nrows=0).columns]
    except pd.errors.EmptyDataError:
        raise DataValidationError(f"{path}: empty input (the file has no header or rows)") from None
    except Exception as err:
        raise DataValidationError(f"{path}: cannot be read as CSV/parquet: {err}") from err


def _read_table(path: Path | str, mapping: dict[str, str], text: tuple[str, ...]) -> pd.DataFrame:
    """Read only the mapped columns, renamed to canonical names; `text` columns stay strings.

    pandas reads URLs through fsspec itself.
    """
    try:
        if _strip_suffix(base_name(path))[1] in (".parquet", ".pq"):
            frame = pd.read_parquet(path, columns=list(mapping))
        else:
            frame = pd.read_csv(
                path,
                usecols=list(mapping),
                dtype={c: str for c, canon in mapping.items() if canon in text},
                keep_default_na=False,
                na_values={c: _NA_STRINGS for c, canon in mapping.items() if canon not in text},
            )
    except Exception as err:
        raise DataValidationError(f"{path}: cannot be read as CSV/parquet: {err}") from err
    return frame.rename(columns=mapping).reset_index(drop=True)


# --------------------------------------------------------------------------- value checks


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


# --------------------------------------------------------------------------- bars


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


def _read_bar_file(path: Path | str, column_map: dict[str, str] | None) -> pd.DataFrame:
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
        frame.insert(0, "symbol", _strip_suffix(base_name(path))[0])
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


def read_bars(path: str | Path, column_map: dict[str, str] | None = None) -> pd.DataFrame:
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


# --------------------------------------------------------------------------- instruments, oracle


def read_instruments(path: str | Path | None, symbols: Iterable[str]) -> pd.DataFrame:
    """One row per symbol (in the given order) with industry, index and description as str.

    Every field is optional; symbols absent from the file (or no file at all) get "".
    """
    symbols = list(dict.fromkeys(symbols))
    out = pd.DataFrame({"symbol": pd.Series(symbols, dtype=str)})
    if path is None:
        return out.assign(industry="", index="", description="").astype(str)
    path = local_or_url(path)
    source = str(path)
    if not is_file(path):
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


def read_oracle(path: str | Path) -> pd.DataFrame:
    """An oracle.parquet written by `write_market`: symbol, date, expected_return."""
    path = local_or_url(path)
    source = str(path)
    if not is_file(path):
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


# --------------------------------------------------------------------------- market


def _input_files(
    data: DataSection,
) -> tuple[list[Path | str], Path | str | None, Path | str | None]:
    """(bar files, instruments file, oracle file) a files-source config reads."""
    assert data.bars_path is not None  # guaranteed by DataSection's validator
    instruments = data.instruments_path or _companion(
        data.bars_path, ("instruments.csv", "instruments.parquet")
    )
    oracle = data.oracle_path or _companion(data.bars_path, ("oracle.parquet",))
    return (
        bar_files(data.bars_path),
        local_or_url(instruments) if instruments else None,
        local_or_url(oracle) if oracle else None,
    )


def source_fingerprint(data: DataSection) -> str:
    """Cheap input hash for cache keys: sha256 of the input files' bytes, or of the section.

    Covers the bar files (with their names: per-symbol files take the symbol from the name),
    the instruments and oracle files and `column_map`, without parsing anything.
    """
    if data.source == "synthetic":
        return combine("synthetic", hash_json(data.synthetic))
    bars, instruments, oracle = _input_files(data)
    parts = ["files", hash_json(data.column_map)]
    for role, files in (("bars", bars), ("instruments", [instruments]), ("oracle", [oracle])):
        for path in files:
            if path is not None:
                parts += [role, base_name(path), sha256_of(path)]
    return combine(*parts)


def _content_hash(bars: pd.DataFrame, instruments: pd.DataFrame, oracle: pd.DataFrame | None):
    """Hash of the canonical tables: equal content, equal hash, however it was read."""
    oracle_hash = hash_frame(oracle) if oracle is not None else "no-oracle"
    return combine(hash_frame(bars), hash_frame(instruments), oracle_hash)


def load_market(data: DataSection, min_history: int) -> MarketData:
    """Generate the synthetic market or read the user's files, validated and canonical.

    Symbols with fewer than `min_history` (= window + horizon) rows are dropped with a log line.
    """
    if min_history < 1:
        raise ValueError(f"min_history must be >= 1, got {min_history}")
    if data.source == "synthetic":
        market = synthetic.generate_market(data.synthetic)
        bars, instruments, oracle = market.bars, market.instruments, market.oracle
        source = "synthetic market"
    else:
        _, inst_path, oracle_path = _input_files(data)
        bars = read_bars(data.bars_path, data.column_map)
        instruments = read_instruments(inst_path, bars["symbol"].unique())
        oracle = read_oracle(oracle_path) if oracle_path else None
        source = str(data.bars_path)
    bars = drop_short_histories(bars, min_history, source)
    symbols = bars["symbol"].unique()
    instruments = instruments[instruments["symbol"].isin(symbols)].reset_index(drop=True)
    if oracle is not None:
        oracle = oracle[oracle["symbol"].isin(symbols)].reset_index(drop=True)
    return MarketData(bars, instruments, oracle, _content_hash(bars, instruments, oracle))


def save_market(market: MarketData, out_dir: str | Path) -> Path:
    """Write bars/instruments/oracle parquet and meta.json (with checksums) atomically.

    `out_dir` is meant to be content-addressed (named by `source_hash`): if it already holds the
    same market it is kept; if it holds a different one that is an error, never an overwrite.
    """
    out = local_or_url(out_dir)
    present = out.exists() if isinstance(out, Path) else output_complete(out)
    if present:
        meta = _read_meta(out) if is_file(child(out, "meta.json")) else None
        if meta is not None and meta.get("source_hash") == market.source_hash:
            return out
        raise FileExistsError(
            f"{out}: already exists and holds {'a different market' if meta else 'other files'}; "
            "choose a directory named by the market's source_hash"
        )
    tables = {"bars": market.bars, "instruments": market.instruments, "oracle": market.oracle}
    with atomic_dir(out) as tmp:
        checksums = {}
        for name, frame in tables.items():
            if frame is not None:
                frame.to_parquet(tmp / f"{name}.parquet", index=False)
                checksums[f"{name}.parquet"] = sha256_file(tmp / f"{name}.parquet")
        meta = {
            "schema_version": SCHEMA_VERSION,
            "source_hash": market.source_hash,
            "n_symbols": int(market.bars["symbol"].nunique()),
            "n_rows": len(market.bars),
            "first_date": f"{market.bars['date'].min():%Y-%m-%d}",
            "last_date": f"{market.bars['date'].max():%Y-%m-%d}",
            "has_oracle": market.oracle is not None,
            "files": checksums,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _read_meta(out: Location) -> dict:
    """meta.json of a saved market (a path or URL), or a clear error."""
    path = child(out, "meta.json")
    try:
        return json.loads(read_text(path))
    except FileNotFoundError:
        raise DataValidationError(f"{path}: not found; {out} is not a saved market") from None
    except json.JSONDecodeError as err:
        raise DataValidationError(f"{path}: not valid JSON: {err}") from None


def load_saved_market(out_dir: str | Path) -> MarketData:
    """Read a market written by `save_market`, verifying every file's checksum first (a URL
    market is read through its verified local copy)."""
    out = local_copy(out_dir)
    meta = _read_meta(out)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DataValidationError(
            f"{out / 'meta.json'}: schema_version {meta.get('schema_version')} is not "
            f"{SCHEMA_VERSION}; re-run ingestion"
        )
    for name, digest in meta["files"].items():
        path = out / name
        if not path.is_file() or sha256_file(path) != digest:
            raise DataValidationError(f"{path}: missing or checksum mismatch (corrupt market)")
    oracle = pd.read_parquet(out / "oracle.parquet") if meta["has_oracle"] else None
    return MarketData(
        bars=pd.read_parquet(out / "bars.parquet"),
        instruments=pd.read_parquet(out / "instruments.parquet"),
        oracle=oracle,
        source_hash=meta["source_hash"],
    )


# --------------------------------------------------------------------------- the stage


def load_saved_oracle(market: StageRef) -> pd.DataFrame | None:
    """The generator's true expected returns of a saved market, or None for real data."""
    meta = _read_meta(market.location)
    return pd.read_parquet(market.file("oracle.parquet")) if meta["has_oracle"] else None


def min_history_for(cfg: PipelineConfig) -> int:
    """Rows a symbol needs to be kept: one window plus the label horizon."""
    return cfg.shards.window + cfg.features.label.horizon


def ingest_location(cfg: PipelineConfig) -> tuple[str, Location]:
    """The market stage's key and directory.

    The key hashes the input files' bytes (or the synthetic section), the data section, the
    minimum history and this module's and the generator's code, so any change re-ingests.
    """
    min_history = min_history_for(cfg)
    key = stage_key(
        "market",
        [source_fingerprint(cfg.data)],
        {"data": cfg.data.model_dump(mode="json"), "min_history": min_history},
        (sys.modules[__name__], synthetic),
    )
    return key, stage_dir(cfg.work_dir, "market", key)


def run_ingest_stage(cfg: PipelineConfig) -> StageRef:
    """Load, validate and save the market under `<work_dir>/market/<key>`, reusing it if there."""
    key, out = ingest_location(cfg)
    if output_complete(out, "meta.json"):
        logger.info("market %s already ingested at %s", key, out)
    else:
        save_market(load_market(cfg.data, min_history_for(cfg)), out)
    return StageRef(stage="market", key=key, path=str(out))


@stage_task("ingest", ingest_location)
def ingest_task(cfg: PipelineConfig) -> StageRef:
    """Prefect task: cached on the input files' content, the data section and the code."""
    return run_ingest_stage(cfg)
