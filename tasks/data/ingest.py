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
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from alphaloom.tasks.common.config import DataSection, PipelineConfig
from alphaloom.tasks.common.hashing import combine, hash_frame, hash_json, sha256_file
from alphaloom.tasks.common.storage import FsPath, Location, atomic_dir, local_copy
from alphaloom.tasks.data import synthetic
from alphaloom.tasks.data.checks import (
    DataValidationError,
)
from alphaloom.tasks.data.readers import (
    _companion,
    bar_files,
    drop_short_histories,
    read_bars,
    read_instruments,
    read_oracle,
)
from alphaloom.tasks.orchestration.caching import StageRef, stage_key, stage_task

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass
class MarketData:
    """Canonical bars, instruments (one row per bar symbol) and, for synthetic data, the oracle."""

    bars: pd.DataFrame
    instruments: pd.DataFrame
    oracle: pd.DataFrame | None
    source_hash: str


# --------------------------------------------------------------------------- files and columns


# --------------------------------------------------------------------------- value checks


# --------------------------------------------------------------------------- bars


# --------------------------------------------------------------------------- instruments, oracle


# --------------------------------------------------------------------------- market


def _input_files(data: DataSection) -> tuple[list[FsPath], FsPath | None, FsPath | None]:
    """(bar files, instruments file, oracle file) a files-source config reads."""
    assert data.bars_path is not None  # guaranteed by DataSection's validator
    instruments = data.instruments_path or _companion(
        data.bars_path, ("instruments.csv", "instruments.parquet")
    )
    oracle = data.oracle_path or _companion(data.bars_path, ("oracle.parquet",))
    return (
        bar_files(data.bars_path),
        FsPath.of(instruments) if instruments else None,
        FsPath.of(oracle) if oracle else None,
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
                parts += [role, path.name, path.sha256()]
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


def save_market(market: MarketData, out_dir: Location) -> Location:
    """Write bars/instruments/oracle parquet and meta.json (with checksums) atomically; return
    `out_dir`.

    `out_dir` is meant to be content-addressed (named by `source_hash`): if it already holds the
    same market intact it is kept (a broken one is replaced, see `atomic_dir`); if it holds a
    different one that is an error, never an overwrite.
    """
    out = FsPath.of(out_dir)
    held = _held_source_hash(out)
    if held is not None and held != market.source_hash:
        raise FileExistsError(
            f"{out}: already exists and holds a different market; "
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
    return out_dir


def _held_source_hash(out: FsPath) -> str | None:
    """The source hash of the market already at `out`, or None if there is no readable one."""
    meta = out / "meta.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("source_hash")
    except (ValueError, AttributeError):
        return None


def _read_meta(out: FsPath) -> dict:
    """meta.json of a saved market (a path or URL), or a clear error."""
    path = out / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataValidationError(f"{path}: not found; {out} is not a saved market") from None
    except json.JSONDecodeError as err:
        raise DataValidationError(f"{path}: not valid JSON: {err}") from None


def load_saved_market(out_dir: str | Path) -> MarketData:
    """Read a market written by `save_market`, verifying every file's checksum first (a URL
    market is read through its verified local copy)."""
    out = local_copy(out_dir)
    meta = _read_meta(FsPath.of(out))
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
    return pd.read_parquet(str(market.file("oracle.parquet"))) if meta["has_oracle"] else None


def min_history_for(cfg: PipelineConfig) -> int:
    """Rows a symbol needs to be kept: one window plus the label horizon."""
    return cfg.shards.window + cfg.features.label.horizon


def ingest_location(cfg: PipelineConfig) -> StageRef:
    """The market stage's output: `<work_dir>/market/<key>`.

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
    return StageRef.at(cfg.work_dir, "market", key)


def run_ingest_stage(cfg: PipelineConfig) -> StageRef:
    """Load, validate and save the market under `<work_dir>/market/<key>`."""
    ref = ingest_location(cfg)
    save_market(load_market(cfg.data, min_history_for(cfg)), ref.path)
    return ref


@stage_task("ingest", ingest_location)
def ingest_task(cfg: PipelineConfig) -> StageRef:
    """Prefect task: cached on the input files' content, the data section and the code."""
    return run_ingest_stage(cfg)
