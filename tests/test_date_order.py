"""Slashed dates are read in one order per file, decided from all of its values, or not at all.

A directory of per-symbol CSVs like a vendor's, ISO-dated good files plus one file whose dates
are written day-first, month-first, in no decidable order, or in both orders. The first two are
read to the true dates; the last two stop the run (even under `data.on_invalid: drop`) with an
error naming the file, showing its values and the `data.date_format` that reads it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from alphaloom.flows.cli import main
from alphaloom.tasks.common.config import load_config
from alphaloom.tasks.data.bar_validation import validate_bar_files
from alphaloom.tasks.data.checks import DataValidationError, parse_dates
from alphaloom.tasks.data.ingest import ingest_location, rejected_report_path, run_ingest_stage

N_DAYS = 40
START = "2020-01-02"
DAY_FIRST, MONTH_FIRST = "%d/%m/%Y", "%m/%d/%Y"
HINT = "set data.date_format: '%d/%m/%Y' (day first) or '%m/%d/%Y' (month first)"


def bars(symbol: str, dates: pd.DatetimeIndex, date_format: str = "%Y-%m-%d") -> pd.DataFrame:
    """One symbol's bars with vendor column names, its dates written with `date_format`."""
    rng = np.random.default_rng(len(symbol) + len(dates))
    close = 50.0 * np.exp(np.cumsum(rng.normal(0, 0.01, len(dates))))
    return pd.DataFrame(
        {
            "Date": dates.strftime(date_format),
            "Open": close,
            "High": close * 1.01,
            "Low": close * 0.99,
            "Close": close,
            "Volume": 1000.0,
            "Name": symbol,
        }
    )


def daily(n: int = N_DAYS, start: str = START) -> pd.DatetimeIndex:
    return pd.bdate_range(start, periods=n)


def vendor_dir(root: Path, odd: dict[str, pd.DataFrame], date_format: str = "%Y-%m-%d") -> Path:
    """Three good files (dates written with `date_format`) and the `odd` ones."""
    root.mkdir(parents=True)
    good = {f"G{i}.csv": bars(f"G{i}", daily(), date_format) for i in range(3)}
    for name, frame in {**good, **odd}.items():
        frame.to_csv(root / name, index=False)
    return root


def config_file(tmp_path: Path, bars_path: Path, **data) -> Path:
    cfg = {
        "work_dir": str(tmp_path / "work"),
        "data": {"source": "files", "bars_path": str(bars_path), **data},
        "shards": {"window": 10},
        "loader": {"min_valid_days": 5},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def validate(tmp_path: Path, bars_path: Path, capsys, **data) -> tuple[int, str, pd.DataFrame]:
    """`alphaloom validate`: exit status, what it printed, the report it wrote."""
    report = tmp_path / "report.csv"
    args = ["validate", "--config", str(config_file(tmp_path, bars_path, **data))]
    status = main([*args, "--report", str(report)])
    return status, capsys.readouterr().out, pd.read_csv(report, dtype=str, keep_default_na=False)


# --------------------------------------------------------------------------- read in one order


@pytest.mark.parametrize("date_format", [DAY_FIRST, MONTH_FIRST, "%d.%m.%Y", "%m-%d-%Y"])
def test_a_slashed_file_among_iso_ones_is_read_to_its_true_dates(tmp_path: Path, date_format):
    """The first value (02/01/2020) fits both orders; the 13th onwards decides."""
    root = vendor_dir(tmp_path / "bars", {"ODD.csv": bars("ODD", daily(), date_format)})
    checked = validate_bar_files(root)
    assert not checked.report.problems
    odd = checked.bars.loc[checked.bars["symbol"] == "ODD", "date"]
    expected = daily().as_unit("ns")
    pd.testing.assert_index_equal(
        pd.DatetimeIndex(odd), expected, check_names=False, check_freq=False
    )
    assert pd.Timestamp("2020-01-10") in set(odd) and pd.Timestamp("2020-10-01") not in set(odd)
    assert set(checked.bars["date"]) == set(daily())  # no extra market dates


def test_the_validate_command_passes_a_day_first_file(tmp_path: Path, capsys):
    root = vendor_dir(tmp_path / "bars", {"DMY.csv": bars("DMY", daily(), DAY_FIRST)})
    status, out, report = validate(tmp_path, root, capsys)
    assert status == 0 and "a run would go ahead" in out.lower()
    assert report.empty


@pytest.mark.parametrize(
    ("date_format", "order"), [("%d.%m.%Y", "day"), ("%m-%d-%Y", "month")], ids=["day", "month"]
)
def test_when_no_value_decides_the_spacing_of_daily_bars_does(date_format, order):
    """2-10 January: every field is at most 12; read the wrong way the bars are a month apart."""
    dates = daily(7)
    written = pd.Series(dates.strftime(date_format))
    parsed = parse_dates(written)
    assert not parsed.problem and parsed.unparsed.empty
    pd.testing.assert_series_equal(parsed.values, pd.Series(dates.as_unit("ns")))
    assert written.iloc[0] == ("02.01.2020" if order == "day" else "01-02-2020")


def test_iso_compact_and_datetime_text_are_untouched(tmp_path: Path):
    dates = daily(3)
    for written in (
        dates.strftime("%Y-%m-%d"),
        dates.strftime("%Y%m%d"),
        dates.strftime("%Y-%m-%d 16:00:00"),
        dates.strftime("%Y-%m-%dT09:30:00Z"),
    ):
        parsed = parse_dates(pd.Series(written))
        assert not parsed.problem and parsed.unparsed.empty, written[0]
        assert parsed.values.tolist() == list(dates), written[0]


# --------------------------------------------------------------------------- refused whole


def monthly_on_the_5th() -> pd.DataFrame:
    """05/01/2020 ... 05/12/2020: day-first it is monthly bars, month-first 1-12 May with
    its weekends; neither reading is clearly daily bars, so nothing decides."""
    return bars("AMB", pd.date_range("2020-01-01", periods=12, freq="MS") + pd.Timedelta(days=4),
                DAY_FIRST)  # fmt: skip


def mixed() -> pd.DataFrame:
    """A vendor file glued from two exports: day-first up to 29 January, then month-first."""
    frame = bars("MIX", daily())
    dates = daily()
    frame["Date"] = np.where(
        np.arange(N_DAYS) < 20, dates.strftime(DAY_FIRST), dates.strftime(MONTH_FIRST)
    )
    return frame


CASES = {
    "undecidable": (monthly_on_the_5th, "dates in no decidable order", "row 1: '05/01/2020'"),
    "mixed": (mixed, "dates in two orders", "row 8: '13/01/2020' (only valid day first)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_file_in_no_single_order_is_an_error_naming_it(tmp_path: Path, case):
    make, wording, example = CASES[case]
    frame = make()
    root = vendor_dir(tmp_path / "bars", {"BAD.csv": frame})
    with pytest.raises(DataValidationError) as caught:
        validate_bar_files(root)
    first_line = str(caught.value).splitlines()[0]
    assert str(root / "BAD.csv") in first_line and "data.date_format" in first_line
    (error,) = caught.value.report.errors
    assert Path(error.file).name == "BAD.csv" and error.column == "Date"
    assert error.problem.startswith(wording) and HINT in error.problem
    assert error.rows == len(frame)  # the whole file, not some of its rows
    assert example in error.examples
    report = caught.value.report
    assert report.invalid_rows == len(frame) and report.files_skipped == 1
    assert report.rows_read == 3 * N_DAYS + len(frame)


def test_the_mixed_file_shows_both_orders():
    parsed = parse_dates(mixed()["Date"])
    assert parsed.values.isna().all() and len(parsed.unparsed) == N_DAYS  # nothing kept
    assert parsed.examples[:2] == [
        "row 8: '13/01/2020' (only valid day first)",
        "row 21: '01/30/2020' (only valid month first)",
    ]


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_exits_1_naming_the_file_even_under_the_drop_policy(tmp_path: Path, capsys, case):
    root = vendor_dir(tmp_path / "bars", {"BAD.csv": CASES[case][0]()})
    # the policy would drop any number of invalid rows; this file stops the run all the same
    status, out, report = validate(tmp_path, root, capsys, on_invalid="drop",
                                   max_invalid_fraction=1.0)  # fmt: skip
    assert status == 1
    verdict = out.strip().splitlines()[-1]
    assert verdict.lower().startswith("a run would stop: invalid input data (the dates of ")
    assert "data.date_format" in verdict
    assert str(root / "BAD.csv") in verdict
    assert f"[error] {root / 'BAD.csv'}: column 'Date': {CASES[case][1]}" in out and HINT in out
    (row,) = report[report["severity"] == "error"].to_dict("records")
    assert Path(row["file"]).name == "BAD.csv" and row["column"] == "Date"
    assert CASES[case][2] in row["examples"]


def test_a_run_writes_no_market_only_the_report(tmp_path: Path):
    root = vendor_dir(tmp_path / "bars", {"BAD.csv": monthly_on_the_5th()})
    cfg = load_config(config_file(tmp_path, root))
    with pytest.raises(DataValidationError, match=r"BAD\.csv are in no single order") as caught:
        run_ingest_stage(cfg)
    assert not [p for p in (tmp_path / "work" / "market").iterdir() if p.is_dir()]  # no market
    rejected = rejected_report_path(cfg, ingest_location(cfg))
    assert str(rejected) in str(caught.value)
    report = pd.read_csv(str(rejected))
    errors = report[report["severity"] == "error"]
    assert [Path(f).name for f in errors["file"]] == ["BAD.csv"]


def test_only_one_file_and_undecidable_is_the_same_error_not_empty_input(tmp_path: Path):
    root = tmp_path / "bars"
    root.mkdir()
    monthly_on_the_5th().to_csv(root / "BAD.csv", index=False)
    with pytest.raises(DataValidationError, match=r"the dates of .*BAD\.csv are in no single"):
        validate_bar_files(root)


def test_date_format_reads_the_undecidable_file(tmp_path: Path, capsys):
    frame = monthly_on_the_5th()
    root = vendor_dir(tmp_path / "bars", {"AMB.csv": frame}, date_format=DAY_FIRST)
    checked = validate_bar_files(root, date_format=DAY_FIRST)
    assert not checked.report.errors
    amb = checked.bars.loc[checked.bars["symbol"] == "AMB", "date"]
    assert amb.dt.strftime("%Y-%m-%d").tolist() == [f"2020-{m:02d}-05" for m in range(1, 13)]
    status, out, _ = validate(tmp_path, root, capsys, date_format=DAY_FIRST)
    assert status == 0 and "a run would go ahead" in out.lower()


# --------------------------------------------------------------------------- empty files


def test_an_empty_file_is_a_note(tmp_path: Path, capsys):
    root = vendor_dir(tmp_path / "bars", {})
    (root / "EMPTY.csv").write_text("")
    (root / "HEADER.csv").write_text("Date,Open,High,Low,Close,Volume,Name\n")
    status, out, report = validate(tmp_path, root, capsys)
    assert status == 0
    assert f"[note] {root / 'EMPTY.csv'}: empty file (no header)" in out
    assert f"[note] {root / 'HEADER.csv'}: empty file (0 rows)" in out
    assert "[warning]" not in out
    assert set(report["severity"]) == {"note"} and len(report) == 2
