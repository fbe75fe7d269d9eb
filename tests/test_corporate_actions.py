"""Split detection in unadjusted prices: clean ratios with a matching volume move, and only
those."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from alphaloom.tasks.data.corporate_actions import adjust_for_splits, detect_splits, ratio_label


def walk(symbol: str, n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 40.0 * np.exp(np.cumsum(rng.normal(0.0, 0.015, n)))
    open_ = close * np.exp(rng.normal(0.0, 0.005, n))
    return pd.DataFrame(
        {
            "symbol": symbol,
            "date": pd.bdate_range("2020-01-02", periods=n),
            "open": open_,
            "high": np.maximum(open_, close) * 1.01,
            "low": np.minimum(open_, close) * 0.99,
            "close": close,
            "volume": rng.lognormal(10.0, 0.3, n),
        }
    )


def with_event(frame: pd.DataFrame, day: int, price: float, volume: float) -> pd.DataFrame:
    """Prices from `day` on multiplied by `price`, volumes by `volume`."""
    frame = frame.copy()
    later = frame.index >= day
    frame.loc[later, ["open", "high", "low", "close"]] *= price
    frame.loc[later, "volume"] *= volume
    return frame


@pytest.mark.parametrize(
    ("ratio", "label"), [(2.0, "2:1"), (1.5, "3:2"), (10.0, "10:1"), (0.1, "1:10"), (0.5, "1:2")]
)
def test_clean_splits_are_found_with_their_ratio(ratio: float, label: str):
    bars = pd.concat(
        [with_event(walk("A"), 60, 1.0 / ratio, ratio), walk("B", seed=1)], ignore_index=True
    )
    found = detect_splits(bars)
    assert found[["symbol", "date"]].values.tolist() == [["A", bars["date"].iloc[60]]]
    assert found["ratio"].iloc[0] == pytest.approx(ratio)
    assert ratio_label(found["ratio"].iloc[0]) == label


def test_crashes_without_volume_change_and_odd_ratios_are_not_splits():
    crash = with_event(walk("C"), 50, 0.5, 1.0)  # -50 % on unchanged volume: news, not a split
    odd = with_event(walk("D", seed=2), 50, 1.0 / 2.6, 2.6)  # 2.6 is no clean ratio
    assert detect_splits(pd.concat([crash, odd], ignore_index=True)).empty


def test_only_the_named_symbols_are_examined():
    bars = with_event(walk("A"), 60, 0.5, 2.0)
    assert detect_splits(bars, symbols={"B"}).empty
    assert len(detect_splits(bars, symbols={"A"})) == 1


def test_adjustment_puts_the_history_on_todays_share_basis():
    raw = walk("A")
    bars = with_event(raw, 60, 0.5, 2.0)
    adjusted = adjust_for_splits(bars, detect_splits(bars))
    np.testing.assert_allclose(adjusted["close"].iloc[:60], raw["close"].iloc[:60] * 0.5)
    np.testing.assert_allclose(adjusted["volume"].iloc[:60], raw["volume"].iloc[:60] * 2.0)
    pd.testing.assert_frame_equal(adjusted.iloc[60:], bars.iloc[60:])
    returns = np.log(adjusted["close"]).diff().abs()
    assert returns.max() < 0.1  # the -50 % day is gone
