"""Labels and windows follow the trading calendar, not a symbol's rows.

A symbol with missing bars (a halt, a vendor gap) must not get a "1-day" label that spans the
gap, nor a window that closes it up; these tests build bars with gaps, run them through the
features stage, the shard writer and the loader, and check every label and window against a
reference computed independently from the calendar.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alphaloom.model.dataset import ShardedWindowDataset
from alphaloom.model.shard_format import days_to_dates
from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.config import FeaturesSection, LabelSection, ShardsSection
from alphaloom.tasks.data.features import build_feature_table
from alphaloom.tasks.data.labels import compute_labels, forward_return
from alphaloom.tasks.data.trading_calendar import fill_gaps
from alphaloom.tasks.dataset.row_layout import label_coverage
from alphaloom.tasks.dataset.shards import build_shards_from

N_DAYS = 120
WINDOW = 10
FACTORS = ["KMID", "ROC5", "MA5"]


def bars_with_gaps(gaps: dict[str, list[int]], n_symbols: int = 6, seed: int = 0) -> pd.DataFrame:
    """Random-walk bars on one business-day calendar; `gaps` removes days (by calendar
    position) from the named symbols."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2021-01-04", periods=N_DAYS)
    frames = []
    for s in range(n_symbols):
        symbol = f"S{s}"
        close = 20.0 * np.exp(np.cumsum(rng.normal(0.0, 0.02, N_DAYS)))
        frame = pd.DataFrame(
            {
                "symbol": symbol,
                "date": dates,
                "open": close,
                "high": close * 1.01,
                "low": close * 0.99,
                "close": close,
                "volume": rng.lognormal(8.0, 0.5, N_DAYS),
            }
        )
        frames.append(frame.drop(index=gaps.get(symbol, [])))
    return pd.concat(frames, ignore_index=True)


def reference_forward_return(bars: pd.DataFrame, horizon: int) -> np.ndarray:
    """close on calendar day t+1+h over close on calendar day t+1, by dictionary lookup."""
    calendar = sorted(bars["date"].unique())
    position = {day: i for i, day in enumerate(calendar)}
    close = {(s, d): c for s, d, c in zip(bars["symbol"], bars["date"], bars["close"], strict=True)}
    out = []
    for symbol, day in zip(bars["symbol"], bars["date"], strict=True):
        i = position[day]
        if i + 1 + horizon >= len(calendar):
            out.append(np.nan)
            continue
        entry = close.get((symbol, calendar[i + 1]))
        exit_ = close.get((symbol, calendar[i + 1 + horizon]))
        out.append(np.nan if entry is None or exit_ is None else exit_ / entry - 1.0)
    return np.asarray(out)


@pytest.mark.parametrize("horizon", [1, 3])
def test_forward_return_is_calendar_true_and_unknown_across_gaps(horizon: int):
    bars = bars_with_gaps({"S1": [30, 31, 32], "S2": [60], "S3": list(range(90, N_DAYS))})
    got = forward_return(bars, horizon)
    expected = reference_forward_return(bars, horizon)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got[~np.isnan(got)], expected[~np.isnan(expected)], rtol=1e-12)
    s1 = bars["symbol"].to_numpy() == "S1"
    before_gap = s1 & (bars["date"] == pd.bdate_range("2021-01-04", periods=N_DAYS)[29]).to_numpy()
    assert np.isnan(got[before_gap]).all()  # the next row is 4 trading days later: unknown
    row_based = bars.groupby("symbol")["close"].shift(-1 - horizon) / bars.groupby("symbol")[
        "close"
    ].shift(-1)
    assert np.isfinite(row_based[before_gap]).all()  # what counting rows would have made of it


def test_without_gaps_the_labels_are_the_row_based_ones():
    bars = bars_with_gaps({})
    got = compute_labels(bars, LabelSection(horizon=2))
    close = bars.groupby("symbol")["close"]
    expected = (close.shift(-3) / close.shift(-1) - 1).to_numpy()
    np.testing.assert_allclose(got["fwd_return"], expected.astype(np.float32), equal_nan=True)


def test_a_label_never_spans_a_gap_placed_just_before_a_split_boundary():
    """S1 has no bars on the last three days of the training split: counting rows, its last
    training bars would get labels reaching into the validation split, across the purge gap."""
    calendar = pd.bdate_range("2021-01-04", periods=N_DAYS)
    train_end = calendar[59]
    bars = bars_with_gaps({"S1": [57, 58, 59, 60]})
    cfg = FeaturesSection(
        factors=FACTORS,
        windows=[5],
        label={"horizon": 1},
        splits={"train_end": train_end.date(), "valid_end": calendar[89].date()},
    )
    table = build_feature_table(bars, cfg)
    frame = table.frame
    first_valid = pd.Timestamp(table.split_dates["valid"][0])
    position = {day: i for i, day in enumerate(calendar)}
    train = frame[(frame["split"] == 0) & (frame["label"] >= 0)]
    exit_day = np.array([calendar[position[d] + 1 + 1] for d in train["date"]])
    assert (exit_day < first_valid).all()  # every training label is known before valid starts
    s1 = frame[frame["symbol"] == "S1"].reset_index(drop=True)
    last = int(np.flatnonzero(s1["date"] <= train_end)[-1])
    assert s1.at[last, "date"] == calendar[56] and s1.at[last, "label"] == -1
    row_based_exit = s1.at[last + 2, "date"]  # entry = next row, exit = the row after it
    assert row_based_exit >= first_valid  # counting rows would reach into the validation split
    np.testing.assert_allclose(
        frame["fwd_return"].to_numpy(np.float64),
        reference_forward_return(bars.sort_values(["symbol", "date"]), 1).astype(np.float32),
        equal_nan=True,
        rtol=1e-6,
    )


def test_fill_gaps_inserts_interior_days_only():
    codes = np.array([0, 0, 0, 1, 1])
    positions = np.array([2, 3, 6, 0, 2])  # symbol 0 misses days 4, 5; symbol 1 misses day 1
    source, filled_codes, filled_positions = fill_gaps(codes, positions)
    assert source.tolist() == [0, 1, -1, -1, 2, 3, -1, 4]
    assert filled_codes.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert filled_positions.tolist() == [2, 3, 4, 5, 6, 0, 1, 2]


@pytest.fixture(scope="module")
def gap_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, pd.DataFrame]:
    gaps = {"S1": [40, 41, 42, 43, 44], "S2": list(range(70, 80)), "S4": [100]}
    bars = bars_with_gaps(gaps)
    cfg = FeaturesSection(factors=FACTORS, windows=[5])
    table = build_feature_table(bars, cfg)
    shards = build_shards_from(
        table,
        None,
        None,
        ShardsSection(window=WINDOW, n_shards=2),
        tmp_path_factory.mktemp("s"),
        "h",
    )
    return table, Path(shards), bars


def test_loader_windows_mask_interior_gap_days_end_to_end(gap_shards):
    """Through features, shards and the loader: a window's T positions are T trading days,
    the symbol's bars sit at their own days, gap days are masked and zero."""
    table, shard_dir, _ = gap_shards
    info = ShardSetInfo.open(shard_dir)
    calendar = np.unique(table.frame["date"].to_numpy().astype("datetime64[D]"))
    dataset = ShardedWindowDataset(
        info, None, batch_size=64, min_valid_days=1, seed=0, dates=calendar
    )
    rows = {
        (s, d): x
        for s, d, x in zip(
            table.frame["symbol"],
            table.frame["date"].to_numpy().astype("datetime64[D]"),
            table.frame[table.feature_names].to_numpy(),
            strict=True,
        )
    }
    seen_gap = 0
    for batch in dataset:
        names = info.symbol_names(batch["symbol"])
        ends = days_to_dates(batch["date"])
        for i in range(len(names)):
            end = int(np.searchsorted(calendar, ends[i]))
            days = calendar[max(end - WINDOW + 1, 0) : end + 1]
            offset = WINDOW - len(days)
            for k, day in enumerate(days):
                has_bar = (names[i], day) in rows
                assert bool(batch["mask"][i, offset + k]) == has_bar
                if has_bar:
                    np.testing.assert_array_equal(
                        batch["x"][i, offset + k].numpy(), rows[(names[i], day)]
                    )
                else:
                    assert not batch["x"][i, offset + k].any()
                    seen_gap += 1
            assert not batch["mask"][i, :offset].any()
    assert seen_gap > 0


def test_min_valid_days_counts_the_symbols_own_bars(gap_shards):
    """S2 has no bars on calendar days 70..79: with min_valid_days = WINDOW a window of S2 is
    emitted only when all WINDOW trading days are bars, so none ends on days 80..88."""
    table, shard_dir, _ = gap_shards
    info = ShardSetInfo.open(shard_dir)
    every_day = np.unique(table.frame["date"].to_numpy().astype("datetime64[D]"))

    def windows(min_valid: int) -> ShardedWindowDataset:
        return ShardedWindowDataset(
            info, None, batch_size=512, min_valid_days=min_valid, seed=0, dates=every_day
        )

    strict = windows(WINDOW)
    days = {
        day
        for batch in strict
        for name, day in zip(
            info.symbol_names(batch["symbol"]), days_to_dates(batch["date"]), strict=True
        )
        if name == "S2"
    }
    calendar = np.asarray(pd.bdate_range("2021-01-04", periods=N_DAYS), dtype="datetime64[D]")
    assert calendar[69] in days and calendar[80 + WINDOW - 1] in days
    assert not days & set(calendar[70 : 80 + WINDOW - 1])
    assert info.window_count(None, WINDOW) < info.window_count(None, 1)


def test_rows_without_forward_return_are_counted_per_split(gap_shards):
    table, shard_dir, _ = gap_shards
    info = ShardSetInfo.open(shard_dir)
    coverage = {split: info.label_coverage(split) for split in ("train", "valid", "test")}
    assert coverage == label_coverage(table.frame, {"train": 0, "valid": 1, "test": 2})
    frame = table.frame
    known_days = frame.groupby("date")["fwd_return"].apply(lambda r: r.notna().any())
    missing = frame["fwd_return"].isna() & frame["date"].map(known_days)
    assert (
        sum(c["rows_no_fwd_return"] for c in coverage.values())
        == int((missing & (frame["split"] >= 0)).sum())
        > 0
    )
    assert sum(c["rows"] for c in coverage.values()) == int((frame["split"] >= 0).sum())
