"""Ingestion: column spellings, layouts, adjustment, validation errors and the saved market."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest

from alphaloom.tasks.common.config import DataSection, PipelineConfig, SyntheticSection
from alphaloom.tasks.data.bar_validation import read_bars
from alphaloom.tasks.data.checks import DataValidationError
from alphaloom.tasks.data.ingest import (
    MarketData,
    ingest_task,
    load_market,
    load_saved_market,
    run_ingest_stage,
    save_market,
    source_fingerprint,
)
from alphaloom.tasks.data.instruments import read_instruments
from alphaloom.tasks.data.synthetic import generate_market, write_market

SMALL = SyntheticSection(n_symbols=12, n_days=100, seed=3)


def make_bars(symbols: tuple[str, ...] = ("AAA", "BBB"), n_days: int = 6) -> pd.DataFrame:
    """A small valid long-format table with Yahoo-style column names."""
    dates = pd.bdate_range("2021-03-01", periods=n_days)
    rows = []
    for k, symbol in enumerate(symbols):
        close = 10.0 * (k + 1) + np.arange(n_days)
        rows.append(
            pd.DataFrame(
                {
                    "Date": dates.strftime("%Y-%m-%d"),
                    "Name": symbol,
                    "Open": close - 0.5,
                    "High": close + 1.0,
                    "Low": close - 1.0,
                    "Close": close,
                    "Volume": 1000.0 + np.arange(n_days),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def files_section(path: Path, **kw) -> DataSection:
    return DataSection(source="files", bars_path=str(path), **kw)


# --------------------------------------------------------------------------- formats


def test_long_csv_with_yahoo_spellings_is_canonical(tmp_path) -> None:
    raw = make_bars()
    bars = read_bars(write_csv(raw.sample(frac=1.0, random_state=0), tmp_path / "all.csv"))
    assert list(bars.columns) == ["symbol", "date", "open", "high", "low", "close", "volume"]
    assert bars["date"].dtype == "datetime64[ns]"
    assert pd.api.types.is_string_dtype(bars["symbol"])
    assert all(bars[c].dtype == "float64" for c in ["open", "high", "low", "close", "volume"])
    assert isinstance(bars.index, pd.RangeIndex)
    # shuffled input comes out sorted by (symbol, date)
    assert bars.equals(bars.sort_values(["symbol", "date"]).reset_index(drop=True))
    expected = raw.sort_values(["Name", "Date"])["Close"].to_numpy()
    np.testing.assert_array_equal(bars["close"].to_numpy(), expected)


def test_tushare_spellings_compact_dates_and_codes(tmp_path) -> None:
    raw = pd.DataFrame(
        {
            "ts_code": ["000001.SZ", "000001.SZ", "600000.SH"],
            "trade_date": [20210105, 20210104, 20210104],
            "OPEN": [10.0, 11.0, 5.0],
            "high": [10.5, 11.5, 5.5],
            "low": [9.5, 10.5, 4.5],
            "close": [10.2, 11.2, 5.2],
            "vol": [100.0, 200.0, 300.0],
            "turnover": [1020.0, 2240.0, 1560.0],
        }
    )
    bars = read_bars(write_csv(raw, tmp_path / "daily.csv"))
    assert bars["symbol"].tolist() == ["000001.SZ", "000001.SZ", "600000.SH"]
    assert bars["date"].tolist() == list(pd.to_datetime(["2021-01-04", "2021-01-05", "2021-01-04"]))
    assert bars["amount"].tolist() == [2240.0, 1020.0, 1560.0]
    assert bars["volume"].tolist() == [200.0, 100.0, 300.0]


def test_parquet_with_datetimes_and_leading_zero_symbols(tmp_path) -> None:
    raw = make_bars(("000001", "000002")).rename(columns={"Name": "code", "Date": "datetime"})
    raw["datetime"] = pd.to_datetime(raw["datetime"]) + pd.Timedelta(hours=15)  # intraday stamp
    raw.to_parquet(tmp_path / "bars.parquet")
    bars = read_bars(tmp_path / "bars.parquet")
    assert set(bars["symbol"]) == {"000001", "000002"}
    assert (bars["date"] == bars["date"].dt.normalize()).all()


def test_user_column_map_either_direction(tmp_path) -> None:
    raw = make_bars().rename(columns={"Close": "PX_LAST", "Volume": "shares"})
    path = write_csv(raw, tmp_path / "b.csv")
    a = read_bars(path, {"PX_LAST": "close", "shares": "volume"})
    b = read_bars(path, {"close": "PX_LAST", "volume": "shares"})
    pdt.assert_frame_equal(a, b)
    np.testing.assert_array_equal(np.sort(a["close"]), np.sort(raw["PX_LAST"]))
    with pytest.raises(DataValidationError, match="column_map: neither 'foo' nor 'bar'"):
        read_bars(path, {"foo": "bar"})


def test_per_symbol_directory_takes_symbol_from_file_name(tmp_path) -> None:
    raw = make_bars(("AAA", "BBB.US")).drop(columns="Name")
    write_csv(raw.iloc[:6], tmp_path / "AAA.csv")
    raw.iloc[6:].to_parquet(tmp_path / "BBB.US.parquet")
    write_csv(pd.DataFrame({"symbol": ["AAA"], "sector": ["tech"]}), tmp_path / "instruments.csv")
    (tmp_path / "notes.txt").write_text("not data")
    bars = read_bars(tmp_path)
    assert bars.groupby("symbol").size().to_dict() == {"AAA": 6, "BBB.US": 6}
    market = load_market(files_section(tmp_path), min_history=3)  # instruments picked up
    assert market.instruments.drop(columns=["start_date", "end_date"]).to_dict("list") == {
        "symbol": ["AAA", "BBB.US"],
        "industry": ["tech", ""],
        "index": ["", ""],
        "description": ["", ""],
    }
    assert market.instruments[["start_date", "end_date"]].isna().all().all()  # not dated
    notes = {p.file: p.problem for p in market.report.problems if p.severity == "note"}
    assert "not a data file" in notes[str(tmp_path / "notes.txt")]  # the stray file is named


def test_same_symbol_in_two_files_is_a_duplicate(tmp_path) -> None:
    raw = make_bars(("AAA",))
    write_csv(raw, tmp_path / "one.csv")
    write_csv(raw, tmp_path / "two.csv")
    with pytest.raises(DataValidationError) as caught:
        read_bars(tmp_path)
    for name in ("one.csv", "two.csv"):
        assert f"{name}: column 'Name/Date': duplicate (symbol, date) key, also in another " in (
            str(caught.value)
        )
    assert caught.value.report.duplicate_rows == 12


def test_adj_close_adjusts_prices_and_volume(tmp_path) -> None:
    raw = make_bars(("AAA",), n_days=3)
    raw["Adj Close"] = raw["Close"] * np.array([0.5, 0.5, 1.0])
    bars = read_bars(write_csv(raw, tmp_path / "a.csv"))
    factor = np.array([0.5, 0.5, 1.0])
    for col in ["Open", "High", "Low", "Close"]:
        np.testing.assert_allclose(bars[col.lower()], raw[col] * factor)
    np.testing.assert_allclose(bars["volume"], raw["Volume"] / factor)
    assert "adj_close" not in bars


def test_adj_factor_multiplies_prices(tmp_path) -> None:
    raw = make_bars(("AAA",), n_days=3)
    raw["adj_factor"] = [2.0, 2.0, 4.0]
    bars = read_bars(write_csv(raw, tmp_path / "a.csv"))
    np.testing.assert_allclose(bars["close"], raw["Close"] * raw["adj_factor"])
    np.testing.assert_allclose(bars["low"], raw["Low"] * raw["adj_factor"])


# --------------------------------------------------------------------------- validation


def _corrupt(edit):
    def make(tmp_path: Path) -> Path:
        raw = make_bars().astype({"Close": object, "Date": object})
        return write_csv(edit(raw) if edit else raw, tmp_path / "bad.csv")

    return make


def _set(col: str, rows: list[int], value):
    def edit(raw: pd.DataFrame) -> pd.DataFrame:
        raw.loc[rows, col] = value
        return raw

    return edit


def _empty_file(tmp_path: Path) -> Path:
    (tmp_path / "bad.csv").write_text("")
    return tmp_path / "bad.csv"


def _empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "dir").mkdir()
    return tmp_path / "dir"


BAD_INPUTS = {
    "missing column": (
        _corrupt(lambda r: r.drop(columns=["Volume", "Low"])),
        r"bad\.csv: missing required column\(s\) 'low', 'volume'",
    ),
    "non-numeric": (
        _corrupt(_set("Close", [1, 4], "abc")),
        r"bad\.csv: column 'Close': non-numeric value, 2 row\(s\) \(e\.g\. row 2: 'abc'; row 5",
    ),
    "nan price": (
        _corrupt(_set("High", [3], np.nan)),
        r"bad\.csv: column 'High': missing value, 1 row\(s\) \(e\.g\. row 4: missing\)",
    ),
    "inf price": (
        _corrupt(_set("Open", [0, 1, 2], np.inf)),
        r"bad\.csv: column 'Open': infinite value, 3 row\(s\)",
    ),
    "non-positive price": (
        _corrupt(_set("Low", [5, 6], 0.0)),
        r"bad\.csv: column 'Low': non-positive price, 2 row\(s\) \(e\.g\. row 6: 0\.0; row 7",
    ),
    "negative volume": (
        _corrupt(_set("Volume", [7], -5.0)),
        r"bad\.csv: column 'Volume': negative value, 1 row\(s\) \(e\.g\. row 8: -5\.0\)",
    ),
    "duplicate key": (
        _corrupt(lambda r: pd.concat([r, r.iloc[[2, 8]]], ignore_index=True)),
        r"bad\.csv: column 'Name/Date': duplicate \(symbol, date\) key, 4 row\(s\) "
        r"\(e\.g\. row 3: \('AAA', 2021-03-03\)",
    ),
    "unparseable dates": (
        _corrupt(_set("Date", [0, 9], "2021-13-45")),
        r"bad\.csv: column 'Date': unparseable date, 2 row\(s\) \(e\.g\. row 1: '2021-13-45'",
    ),
    "empty table": (
        _corrupt(lambda r: r.iloc[:0]),
        r"empty input, no rows in any of its 1 file\(s\)(.|\n)*bad\.csv: empty file \(0 rows\)",
    ),
    "empty file": (_empty_file, r"bad\.csv: empty file \(no header\)"),
    "empty directory": (_empty_dir, r"dir: empty input, no CSV or parquet"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_rejected_and_nothing_is_written(tmp_path, case) -> None:
    make, message = BAD_INPUTS[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataValidationError, match=message):
        save_market(load_market(files_section(path, on_invalid="error"), min_history=1), out)
    assert not out.exists()


def test_failed_save_leaves_no_directory(tmp_path) -> None:
    market = load_market(files_section(write_csv(make_bars(), tmp_path / "b.csv")), 1)
    broken = MarketData(market.bars, market.instruments, pd.DataFrame({"x": [object()]}), "h")
    with pytest.raises((TypeError, ValueError)):  # pyarrow cannot store a Python object
        save_market(broken, tmp_path / "out" / "m")
    assert list((tmp_path / "out").iterdir()) == []  # no partial dir, no temp dir


def test_short_symbols_dropped_with_a_note(tmp_path) -> None:
    raw = pd.concat([make_bars(("AAA", "BBB"), 8), make_bars(("CCC",), 3)], ignore_index=True)
    path = write_csv(raw, tmp_path / "b.csv")
    market = load_market(files_section(path), min_history=5)
    assert sorted(market.bars["symbol"].unique()) == ["AAA", "BBB"]
    assert market.instruments["symbol"].tolist() == ["AAA", "BBB"]
    assert "dropped 1 of 3 symbols with fewer than 5 rows" in market.report.render()
    assert "(e.g. CCC)" in market.report.render()
    with pytest.raises(DataValidationError, match="none of the 3 symbols has the 20 rows"):
        load_market(files_section(path), min_history=20)


# --------------------------------------------------------------------------- instruments


def test_read_instruments_aliases_blanks_and_missing(tmp_path) -> None:
    frame = pd.DataFrame(
        {
            "Ticker": ["BBB", "AAA", "ZZZ"],
            "Sector": ["energy", None, "x"],
            "Description": ["Oil.", "Chips.", "y"],
        }
    )
    frame.to_parquet(tmp_path / "inst.parquet")
    inst, report = read_instruments(tmp_path / "inst.parquet", ["AAA", "BBB", "CCC"])
    assert inst.drop(columns=["start_date", "end_date"]).to_dict("list") == {
        "symbol": ["AAA", "BBB", "CCC"],
        "industry": ["", "energy", ""],
        "index": ["", "", ""],
        "description": ["Chips.", "Oil.", ""],
    }
    assert not report.errors and "(e.g. CCC)" in report.render()  # no row for CCC: a note
    assert read_instruments(None, ["A"])[0]["description"].tolist() == [""]


def test_read_instruments_errors(tmp_path) -> None:
    write_csv(pd.DataFrame({"sector": ["a"]}), tmp_path / "i.csv")
    with pytest.raises(DataValidationError, match=r"i\.csv: missing required column 'symbol'"):
        read_instruments(tmp_path / "i.csv", ["A"])
    write_csv(pd.DataFrame({"symbol": ["A", "A", "B"]}), tmp_path / "d.csv")
    _, report = read_instruments(tmp_path / "d.csv", ["A"])
    assert [p.line() for p in report.errors] == [
        f"[error] {tmp_path / 'd.csv'}: column 'symbol': duplicate symbol, 1 row(s) "
        "(e.g. row 2: 'A')"
    ]


# --------------------------------------------------------------------------- market round trips


def test_synthetic_written_then_read_as_files_keeps_oracle(tmp_path) -> None:
    direct = load_market(DataSection(synthetic=SMALL), min_history=10)
    out = write_market(generate_market(SMALL), tmp_path / "synth", SMALL)
    via_files = load_market(files_section(out), min_history=10)
    pdt.assert_frame_equal(via_files.bars, direct.bars)
    pdt.assert_frame_equal(via_files.instruments, direct.instruments)
    pdt.assert_frame_equal(via_files.oracle, direct.oracle)
    assert via_files.source_hash == direct.source_hash  # same content, same hash


def test_save_and_load_saved_market(tmp_path) -> None:
    market = load_market(DataSection(synthetic=SMALL), min_history=10)
    out = save_market(market, tmp_path / market.source_hash[:12])
    back = load_saved_market(out)
    pdt.assert_frame_equal(back.bars, market.bars)
    pdt.assert_frame_equal(back.instruments, market.instruments)
    pdt.assert_frame_equal(back.oracle, market.oracle)
    assert back.source_hash == market.source_hash
    assert save_market(market, out) == out  # same content: kept
    other = MarketData(market.bars.iloc[:50], market.instruments, None, "other")
    with pytest.raises(FileExistsError, match="different market"):
        save_market(other, out)
    (out / "bars.parquet").write_bytes(b"garbage")
    with pytest.raises(DataValidationError, match=r"bars\.parquet: missing or checksum mismatch"):
        load_saved_market(out)


def test_source_fingerprint_tracks_inputs(tmp_path) -> None:
    raw = make_bars()
    path = write_csv(raw, tmp_path / "b.csv")
    first = source_fingerprint(files_section(path))
    assert source_fingerprint(files_section(path)) == first
    assert source_fingerprint(files_section(path, column_map={"Close": "close"})) != first
    raw.loc[0, "Close"] += 1.0
    write_csv(raw, path)
    assert source_fingerprint(files_section(path)) != first
    synth = source_fingerprint(DataSection(synthetic=SMALL))
    assert synth != source_fingerprint(DataSection(synthetic=SMALL.model_copy(update={"seed": 4})))
    assert synth == source_fingerprint(DataSection(synthetic=SMALL))


def test_run_ingest_stage_reuses_output_until_inputs_change(tmp_path) -> None:
    raw = make_bars(n_days=25)
    path = write_csv(raw, tmp_path / "b.csv")
    cfg = PipelineConfig(
        work_dir=str(tmp_path / "work"),
        data=files_section(path),
        shards={"window": 20},
    )
    ref = run_ingest_stage(cfg)
    assert ref.dir.parent == tmp_path / "work" / "market"
    market = load_saved_market(ref.path)
    assert market.bars["symbol"].nunique() == 2
    stamp = (ref.dir / "meta.json").stat().st_mtime_ns
    again = ingest_task.reuse_or_build(cfg)  # what the CLI and the cache do: verify, reuse
    assert again == ref
    assert (ref.dir / "meta.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    raw.loc[0, "Close"] += 0.5
    write_csv(raw, path)
    changed = run_ingest_stage(cfg)
    assert changed.key != ref.key
    assert load_saved_market(changed.path).bars["close"].iloc[0] == raw.loc[0, "Close"]
