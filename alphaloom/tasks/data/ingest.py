"""Market data in: the synthetic market or the user's own CSV/parquet bars, validated and canonical.

Why: every later stage trusts the canonical bars table, so all the mess of real files (column
spellings, per-symbol files, encodings, adjusted prices, bad rows) is handled here, in one
validation pass (tasks/data/bar_validation.py) whose report lists every problem of every file;
`data.on_invalid` (tasks/data/policy.py) then quarantines the invalid rows or stops the run.
A rejected input writes nothing but its report, next to where the market would have been.

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
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from alphaloom.tasks.common.config import DataSection, PipelineConfig
from alphaloom.tasks.common.hashing import combine, hash_frame, hash_json, sha256_file
from alphaloom.tasks.common.storage import FsPath, Location, atomic_dir, atomic_file, local_copy
from alphaloom.tasks.data import synthetic
from alphaloom.tasks.data.bar_validation import validate_bar_files
from alphaloom.tasks.data.checks import DataValidationError
from alphaloom.tasks.data.instruments import canonical, is_dated, read_instruments, static_fields
from alphaloom.tasks.data.policy import drop_short_histories, enforce_policy, handle_splits
from alphaloom.tasks.data.readers import bar_files, companion, read_oracle
from alphaloom.tasks.data.validation import (
    QUARANTINE_FILE,
    REPORT_FILE,
    ValidationReport,
    log_report,
    publish_report,
)
from alphaloom.tasks.orchestration.caching import StageRef, run_logger, stage_key, stage_task

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2


@dataclass
class MarketData:
    """Canonical bars, instruments and, for synthetic data, the oracle; and how the input was."""

    bars: pd.DataFrame
    instruments: pd.DataFrame  # canonical (tasks/data/instruments.py), possibly dated
    oracle: pd.DataFrame | None
    source_hash: str
    report: ValidationReport = field(default_factory=ValidationReport)
    quarantine: pd.DataFrame | None = None  # invalid rows removed under on_invalid: drop
    splits: pd.DataFrame | None = None  # split-like moves found in unadjusted prices


def _input_files(data: DataSection) -> tuple[list[FsPath], FsPath | None, FsPath | None]:
    """(bar files, instruments file, oracle file) a files-source config reads."""
    assert data.bars_path is not None  # guaranteed by DataSection's validator
    instruments = data.instruments_path or companion(
        data.bars_path, ("instruments.csv", "instruments.parquet")
    )
    oracle = data.oracle_path or companion(data.bars_path, ("oracle.parquet",))
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


def _read_files(data: DataSection) -> MarketData:
    """Validate the user's files in one pass and apply the `data.on_invalid` policy."""
    _, inst_path, oracle_path = _input_files(data)
    checked = validate_bar_files(data.bars_path, data.column_map, data.date_format, data.encoding)
    report = checked.report
    symbols = checked.bars["symbol"].unique()
    instruments, inst_report = read_instruments(inst_path, symbols, data.encoding)
    report.add(inst_report.problems)
    bars, splits = handle_splits(checked.bars, checked.unadjusted, data, report)
    enforce_policy(report, data, str(inst_path))
    oracle = read_oracle(oracle_path) if oracle_path else None
    return MarketData(bars, instruments, oracle, "", report, checked.quarantine, splits)


def load_market(data: DataSection, min_history: int) -> MarketData:
    """Generate the synthetic market or read the user's files, validated and canonical.

    Symbols with fewer than `min_history` (= window + horizon) rows are dropped (a note in the
    report). Raises DataValidationError, with the report attached, when the policy says stop.
    """
    if min_history < 1:
        raise ValueError(f"min_history must be >= 1, got {min_history}")
    if data.source == "synthetic":
        generated = synthetic.generate_market(data.synthetic)
        report = ValidationReport(rows_read=len(generated.bars))
        market = MarketData(
            generated.bars, canonical(generated.instruments), generated.oracle, "", report
        )
    else:
        market = _read_files(data)
    bars = drop_short_histories(market.bars, min_history, market.report)
    symbols = bars["symbol"].unique()
    market.bars = bars
    market.instruments = market.instruments[market.instruments["symbol"].isin(symbols)]
    market.instruments = market.instruments.reset_index(drop=True)
    if market.oracle is not None:
        oracle = market.oracle
        market.oracle = oracle[oracle["symbol"].isin(symbols)].reset_index(drop=True)
    market.source_hash = _content_hash(market.bars, market.instruments, market.oracle)
    return market


def market_facts(market: MarketData, data: DataSection) -> dict:
    """What the run summary and the MLflow run say about the input (kept in meta.json)."""
    return {
        "source": data.source,
        "on_invalid": data.on_invalid,
        "validation": market.report.counts(),
        "quarantined_rows": 0 if market.quarantine is None else len(market.quarantine),
        "suspected_splits": 0 if market.splits is None else len(market.splits),
        "splits_adjusted": bool(data.detect_splits and market.splits is not None),
        "instruments_point_in_time": is_dated(market.instruments),
        "static_fields": static_fields(market.instruments),
    }


def save_market(market: MarketData, out_dir: Location, facts: dict | None = None) -> Location:
    """Write bars/instruments/oracle parquet, the quarantined rows, the validation report and
    meta.json (with checksums and `facts`) atomically; return `out_dir`.

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
    tables = {
        "bars.parquet": market.bars,
        "instruments.parquet": market.instruments,
        "oracle.parquet": market.oracle,
        QUARANTINE_FILE: market.quarantine,
    }
    with atomic_dir(out) as tmp:
        checksums = {}
        for name, frame in tables.items():
            if frame is not None:
                frame.to_parquet(tmp / name, index=False)
                checksums[name] = sha256_file(tmp / name)
        market.report.frame().to_csv(tmp / REPORT_FILE, index=False)
        checksums[REPORT_FILE] = sha256_file(tmp / REPORT_FILE)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "source_hash": market.source_hash,
            "n_symbols": int(market.bars["symbol"].nunique()),
            "n_rows": len(market.bars),
            "first_date": f"{market.bars['date'].min():%Y-%m-%d}",
            "last_date": f"{market.bars['date'].max():%Y-%m-%d}",
            "has_oracle": market.oracle is not None,
            "facts": facts or {},
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


def load_saved_bars(out_dir: str | Path) -> pd.DataFrame:
    """Only the canonical bars of a market written by `save_market` (checksums verified as by
    `load_saved_market`): what the features stage needs, without the oracle's table of the
    same length."""
    out = _verified_market_dir(out_dir)
    return pd.read_parquet(out / "bars.parquet")


def _verified_market_dir(out_dir: str | Path) -> Path:
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
    return out


def load_saved_market(out_dir: str | Path) -> MarketData:
    """Read a market written by `save_market`, verifying every file's checksum first (a URL
    market is read through its verified local copy)."""
    out = _verified_market_dir(out_dir)
    meta = _read_meta(FsPath.of(out))
    oracle = pd.read_parquet(out / "oracle.parquet") if meta["has_oracle"] else None
    quarantine = out / QUARANTINE_FILE
    counts = meta.get("facts", {}).get("validation", {})
    report = pd.read_csv(out / REPORT_FILE, dtype=str, keep_default_na=False)
    return MarketData(
        bars=pd.read_parquet(out / "bars.parquet"),
        instruments=pd.read_parquet(out / "instruments.parquet"),
        oracle=oracle,
        source_hash=meta["source_hash"],
        report=ValidationReport.from_frame(report, counts),
        quarantine=pd.read_parquet(quarantine) if quarantine.is_file() else None,
    )


def saved_facts(market: StageRef) -> dict:
    """The `facts` a saved market's meta.json records (see `market_facts`)."""
    return dict(_read_meta(market.location).get("facts", {}))


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


def rejected_report_path(cfg: PipelineConfig, ref: StageRef) -> FsPath:
    """Where the report of a rejected input goes: next to the market it would have been."""
    return FsPath.of(cfg.work_dir) / ref.stage / f"{ref.key}.{REPORT_FILE}"


def run_ingest_stage(cfg: PipelineConfig) -> StageRef:
    """Load, validate and save the market under `<work_dir>/market/<key>`.

    The validation report is logged, published as a Prefect table artifact and saved with the
    market; when the input is rejected it is written next to where the market would be (nothing
    else is), and the error names that file.
    """
    ref = ingest_location(cfg)
    log = run_logger()
    try:
        market = load_market(cfg.data, min_history_for(cfg))
    except DataValidationError as err:
        if isinstance(err.report, ValidationReport):
            path = rejected_report_path(cfg, ref)
            with atomic_file(path) as tmp:
                err.report.frame().to_csv(tmp, index=False)
            log_report(err.report, log)
            publish_report(err.report)
            raise DataValidationError(f"{err}\n(report: {path})", err.report) from None
        raise
    log_report(market.report, log)
    publish_report(market.report)
    save_market(market, ref.path, market_facts(market, cfg.data))
    return ref


@stage_task("ingest", ingest_location)
def ingest_task(cfg: PipelineConfig) -> StageRef:
    """Prefect task: cached on the input files' content, the data section and the code."""
    return run_ingest_stage(cfg)
