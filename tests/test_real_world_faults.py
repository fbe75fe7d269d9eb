"""Real data the way it arrives: each fault is a clear report line and nothing partial is written.

Per-symbol daily-bar CSVs like a vendor's (Date, High, Low, Open, Close, Volume, Name) with one
fault each; `run_ingest_stage` either saves a market (the report and quarantine inside it) or
writes only the report next to where the market would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.data.bar_validation import validate_bar_files
from alphaloom.tasks.data.checks import DataValidationError
from alphaloom.tasks.data.ingest import (
    ingest_location,
    load_saved_market,
    rejected_report_path,
    run_ingest_stage,
)
from alphaloom.tasks.data.validation import QUARANTINE_FILE, REPORT_FILE

N_DAYS = 40


def vendor_file(symbol: str, n_days: int = N_DAYS, seed: int = 0) -> pd.DataFrame:
    """One symbol's bars with Yahoo/Kaggle column names, a random walk around 50."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2019-01-02", periods=n_days)
    close = 50.0 * np.exp(np.cumsum(rng.normal(0, 0.01, n_days)))
    return pd.DataFrame(
        {
            "Date": dates.strftime("%Y-%m-%d"),
            "High": close * 1.01,
            "Low": close * 0.99,
            "Open": close,
            "Close": close,
            "Volume": rng.integers(1_000, 5_000, n_days).astype(float),
            "Name": symbol,
        }
    )


def write_dir(root: Path, frames: dict[str, pd.DataFrame]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        frame.to_csv(root / name, index=False)
    return root


def config(tmp_path: Path, bars: Path, **data) -> PipelineConfig:
    return PipelineConfig(
        work_dir=str(tmp_path / "work"),
        data={"source": "files", "bars_path": str(bars), **data},
        shards={"window": 10},
        loader={"min_valid_days": 5},
    )


def market_dirs(tmp_path: Path) -> list[Path]:
    market = tmp_path / "work" / "market"
    return sorted(p for p in market.iterdir() if p.is_dir()) if market.is_dir() else []


def zero_price_row(frame: pd.DataFrame, row: int) -> pd.DataFrame:
    """What a merger date looks like in a vendor file: every price 0.0."""
    frame = frame.copy()
    frame.loc[row, ["High", "Low", "Open", "Close"]] = 0.0
    return frame


# --------------------------------------------------------------------------- the case


@pytest.fixture(scope="module")
def five_hundred(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """500 symbol files; three of them hold one bad row each (a zero-price row, two rows with
    the same date, a negative volume)."""
    frames = {f"S{i:03d}.csv": vendor_file(f"S{i:03d}", seed=i) for i in range(500)}
    frames["S017.csv"] = zero_price_row(frames["S017.csv"], 11)
    dup = frames["S222.csv"]
    frames["S222.csv"] = pd.concat([dup.iloc[:20], dup.iloc[[19]], dup.iloc[21:]])  # 2 x row 19
    frames["S404.csv"].loc[30, "Volume"] = -100.0
    return write_dir(tmp_path_factory.mktemp("vendor") / "bars", frames)


def test_500_files_with_3_bad_rows_drop_policy_runs_and_quarantines_them(
    five_hundred: Path, tmp_path: Path
):
    ref = run_ingest_stage(config(tmp_path, five_hundred, on_invalid="drop"))
    report = pd.read_csv(Path(ref.path) / REPORT_FILE).fillna("")
    errors = report[report["severity"] == "error"]
    assert sorted(set(Path(f).name for f in errors["file"])) == ["S017.csv", "S222.csv", "S404.csv"]
    assert set(errors.loc[errors["file"].str.endswith("S017.csv"), "column"]) == {
        "Open", "High", "Low", "Close",
    }  # fmt: skip
    assert (errors["rows"] <= 2).all()
    quarantine = pd.read_parquet(Path(ref.path) / QUARANTINE_FILE)
    assert sorted(zip(quarantine["source_file"].map(lambda f: Path(f).name),
                      quarantine["source_row"], strict=True)) == [
        ("S017.csv", 12), ("S222.csv", 20), ("S222.csv", 21), ("S404.csv", 31),
    ]  # fmt: skip
    market = load_saved_market(ref.path)
    assert len(market.bars) == 500 * N_DAYS - 4  # the duplicated key's two rows both go
    facts = json.loads((Path(ref.path) / "meta.json").read_text())["facts"]
    assert facts["validation"]["invalid_rows"] == 4
    assert facts["quarantined_rows"] == 4 and facts["on_invalid"] == "drop"


def test_500_files_with_3_bad_rows_error_policy_fails_once_listing_all_three(
    five_hundred: Path, tmp_path: Path
):
    cfg = config(tmp_path, five_hundred, on_invalid="error")
    with pytest.raises(DataValidationError) as caught:
        run_ingest_stage(cfg)
    message = str(caught.value)
    for name, column in [("S017.csv", "Close"), ("S222.csv", "Name/Date"), ("S404.csv", "Volume")]:
        assert f"{name}: column '{column}'" in message
    assert "negative value, 1 row(s) (e.g. row 31: -100.0)" in message
    assert market_dirs(tmp_path) == []  # nothing partial
    rejected = rejected_report_path(cfg, ingest_location(cfg))
    assert str(rejected) in message
    report = pd.read_csv(str(rejected))
    assert len(report[report["severity"] == "error"]) == 6  # 4 prices + duplicate + volume


def test_too_many_invalid_rows_stop_even_the_drop_policy(tmp_path: Path):
    frames = {f"S{i}.csv": vendor_file(f"S{i}", seed=i) for i in range(4)}
    frames["S0.csv"] = zero_price_row(frames["S0.csv"], 3)
    bars = write_dir(tmp_path / "bars", frames)
    with pytest.raises(DataValidationError, match=r"0\.6250% of the rows are invalid, more than "):
        run_ingest_stage(config(tmp_path, bars, max_invalid_fraction=0.005))
    assert market_dirs(tmp_path) == []
    ref = run_ingest_stage(config(tmp_path, bars, max_invalid_fraction=0.01))
    assert len(load_saved_market(ref.path).quarantine) == 1


# --------------------------------------------------------------------------- one fault each


def test_zero_price_row_is_named_with_file_column_and_row(tmp_path: Path):
    bars = write_dir(tmp_path / "bars", {"AAA.csv": zero_price_row(vendor_file("AAA"), 7)})
    checked = validate_bar_files(bars)
    lines = {p.column: p.line() for p in checked.report.errors}
    assert sorted(lines) == ["Close", "High", "Low", "Open"]
    assert lines["Close"] == (
        f"[error] {bars / 'AAA.csv'}: column 'Close': non-positive price, 1 row(s) "
        "(e.g. row 8: 0.0)"
    )
    assert len(checked.bars) == N_DAYS - 1 and checked.quarantine["source_row"].tolist() == [8]


def test_duplicated_dates_quarantine_every_row_of_the_key(tmp_path: Path):
    frame = vendor_file("AAA")
    frame = pd.concat([frame, frame.iloc[[5]].assign(Close=51.0)], ignore_index=True)
    checked = validate_bar_files(write_dir(tmp_path / "bars", {"AAA.csv": frame}))
    (problem,) = checked.report.errors
    assert problem.problem == "duplicate (symbol, date) key" and problem.rows == 2
    assert "row 6: ('AAA', 2019-01-09)" in problem.examples
    assert sorted(checked.quarantine["source_row"]) == [6, N_DAYS + 1]
    assert checked.report.duplicate_rows == 2


def test_gap_and_delisting_keep_the_history(tmp_path: Path):
    gappy = vendor_file("GAP").drop(index=range(10, 15))  # a 5-day halt
    delisted = vendor_file("DEL").iloc[:25]  # stops trading on day 25
    bars = write_dir(tmp_path / "bars", {"GAP.csv": gappy, "DEL.csv": delisted,
                                         "FULL.csv": vendor_file("FULL")})  # fmt: skip
    market = load_saved_market(run_ingest_stage(config(tmp_path, bars)).path)
    counts = market.bars.groupby("symbol").size().to_dict()
    assert counts == {"DEL": 25, "FULL": N_DAYS, "GAP": N_DAYS - 5}
    assert not market.report.errors


def test_split_in_unadjusted_prices_is_reported_and_adjusted_when_asked(tmp_path: Path):
    frame = vendor_file("SPL", n_days=80)
    after = frame.index >= 50
    frame.loc[after, ["High", "Low", "Open", "Close"]] /= 2.0  # a 2:1 split on day 50
    frame.loc[after, "Volume"] *= 2.0
    bars = write_dir(tmp_path / "bars", {"SPL.csv": frame})
    kept = load_saved_market(run_ingest_stage(config(tmp_path, bars)).path)
    (warning,) = [p for p in kept.report.warnings if "split" in p.problem]
    day = frame["Date"].iloc[50]
    assert f"SPL on {day}: overnight move looks like a 2:1 split; NOT adjusted" in warning.problem
    close = kept.bars["close"].to_numpy()
    assert close[50] / close[49] < 0.6  # the -50 % day is still there
    adjusted = load_saved_market(run_ingest_stage(config(tmp_path, bars, detect_splits=True)).path)
    close = adjusted.bars["close"].to_numpy()
    assert abs(np.log(close[50] / close[49])) < 0.05
    np.testing.assert_allclose(close[:50], frame["Close"].to_numpy()[:50] / 2.0)
    np.testing.assert_allclose(adjusted.bars["volume"].to_numpy()[:50], frame["Volume"][:50] * 2)


def test_files_in_other_encodings_read_the_same_with_a_note(tmp_path: Path):
    frame = vendor_file("NESTLÉ")
    plain = write_dir(tmp_path / "utf8", {"a.csv": frame})
    for encoding in ("utf-16", "cp1252"):
        other = tmp_path / encoding
        other.mkdir()
        frame.to_csv(other / "a.csv", index=False, encoding=encoding)
        checked = validate_bar_files(other)
        pd.testing.assert_frame_equal(checked.bars, validate_bar_files(plain).bars)
        (note,) = [p for p in checked.report.problems if p.severity == "note"]
        assert note.problem.startswith("not UTF-8; read as ")
        assert checked.bars["symbol"].unique().tolist() == ["NESTLÉ"]
    forced = validate_bar_files(tmp_path / "cp1252", encoding="cp1252")  # data.encoding
    assert not forced.report.problems and forced.bars["symbol"].iloc[0] == "NESTLÉ"


@pytest.mark.parametrize(
    "write",
    [
        lambda d: d.dt.strftime("%Y%m%d").astype(int),  # 20190102 integers
        lambda d: [f"{x.month}/{x.day}/{x.year}" for x in d],  # 1/2/2019 strings
    ],
    ids=["yyyymmdd-integers", "m/d/yyyy-strings"],
)
def test_dates_as_integers_or_us_slashes_parse_to_the_same_days(tmp_path: Path, write):
    frame = vendor_file("AAA")
    iso = validate_bar_files(write_dir(tmp_path / "iso", {"a.csv": frame})).bars
    frame["Date"] = write(pd.to_datetime(frame["Date"]))
    other = validate_bar_files(write_dir(tmp_path / "other", {"a.csv": frame}))
    assert not other.report.errors
    pd.testing.assert_series_equal(other.bars["date"], iso["date"])


def test_day_first_dates_are_read_day_first_from_all_values_or_as_the_format_says(tmp_path: Path):
    frame = vendor_file("AAA")
    frame["Date"] = pd.to_datetime(frame["Date"]).dt.strftime("%d/%m/%Y")  # 02/01/2019 ...
    bars = write_dir(tmp_path / "bars", {"a.csv": frame})
    inferred = validate_bar_files(bars)  # 14/01/2019 and later decide: day first, every row
    assert not inferred.report.problems
    fixed = validate_bar_files(bars, date_format="%d/%m/%Y")
    assert not fixed.report.errors
    assert fixed.bars["date"].iloc[0] == pd.Timestamp("2019-01-02")
    pd.testing.assert_series_equal(inferred.bars["date"], fixed.bars["date"])


def test_tickers_differing_only_in_case_are_both_reported(tmp_path: Path):
    bars = write_dir(tmp_path / "bars", {"BRK.csv": vendor_file("BRK"),
                                         "brk.csv": vendor_file("brk"),
                                         "OK.csv": vendor_file("OK")})  # fmt: skip
    checked = validate_bar_files(bars)
    problems = {Path(p.file).name: p.problem for p in checked.report.errors}
    assert problems == {
        "BRK.csv": "ticker differs only in case from 'brk'",
        "brk.csv": "ticker differs only in case from 'BRK'",
    }
    assert checked.bars["symbol"].unique().tolist() == ["OK"]


def test_empty_file_and_stray_files_among_good_ones(tmp_path: Path):
    bars = write_dir(tmp_path / "bars", {"AAA.csv": vendor_file("AAA")})
    (bars / "BBB.csv").write_text("")
    (bars / "CCC.csv").write_text("Date,High,Low,Open,Close,Volume,Name\n")
    (bars / "README.txt").write_text("downloaded from somewhere")
    (bars / "prices.xlsx").write_bytes(b"PK\x03\x04")
    market = load_saved_market(run_ingest_stage(config(tmp_path, bars)).path)
    assert market.bars["symbol"].unique().tolist() == ["AAA"]
    lines = {Path(p.file).name: (p.severity, p.problem) for p in market.report.problems}
    assert lines["BBB.csv"] == ("note", "empty file (no header)")
    assert lines["CCC.csv"] == ("note", "empty file (0 rows)")
    assert lines["README.txt"][0] == lines["prices.xlsx"][0] == "note"
    assert market.report.files_skipped == 2 and not market.report.errors


def test_a_file_without_the_price_columns_is_named_and_its_rows_count_as_invalid(tmp_path: Path):
    frames = {f"S{i}.csv": vendor_file(f"S{i}", seed=i) for i in range(3)}
    frames["sectors.csv"] = pd.DataFrame({"Name": ["S0", "S1"], "Sector": ["a", "b"]})
    bars = write_dir(tmp_path / "bars", frames)
    checked = validate_bar_files(bars)
    (problem,) = checked.report.errors
    assert Path(problem.file).name == "sectors.csv" and problem.rows == 2
    assert problem.problem.startswith("missing required column(s) 'date', 'open'")
    assert checked.report.invalid_rows == 2 and checked.report.rows_read == 3 * N_DAYS + 2


def test_files_with_and_without_adjusted_prices_are_checked_by_their_own_columns(tmp_path: Path):
    adjusted = vendor_file("ADJ").assign(**{"Adj Close": lambda f: f["Close"] * 0.5})
    adjusted.loc[4, "Adj Close"] = np.nan  # a hole in the adjusted series
    bars = write_dir(tmp_path / "bars", {"ADJ.csv": adjusted, "RAW.csv": vendor_file("RAW")})
    checked = validate_bar_files(bars)
    (problem,) = checked.report.errors
    assert (Path(problem.file).name, problem.column, problem.problem) == (
        "ADJ.csv", "Adj Close", "missing value",
    )  # fmt: skip
    assert checked.unadjusted == {"RAW"}  # split detection looks at RAW only
    adj = checked.bars[checked.bars["symbol"] == "ADJ"]
    np.testing.assert_allclose(adj["close"], np.delete(adjusted["Close"].to_numpy(), 4) * 0.5)
