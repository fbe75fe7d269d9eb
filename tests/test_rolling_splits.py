"""Rolling splits: trailing lengths from the newest day, so a growing calendar moves every window
with it and training reaches up to the validation window."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alphaloom.tasks.common.config import ConfigError, SplitSection, load_config
from alphaloom.tasks.data.splits import assign_splits

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def calendar(n: int, symbols: int = 3) -> pd.Series:
    return pd.Series(np.repeat(pd.bdate_range("2022-01-03", periods=n).to_numpy(), symbols))


def day_runs(codes: np.ndarray, dates: pd.Series) -> list[tuple[int, int]]:
    """(split code, number of days) for each run of equal codes along the calendar."""
    by_day = pd.Series(codes, index=dates).groupby(level=0).first().to_numpy()
    return [(int(k), len(list(g))) for k, g in itertools.groupby(by_day)]


def test_production_mode_trains_up_to_validation_and_has_no_test_split() -> None:
    dates = calendar(100)
    splits = SplitSection(valid_days=20, promotion_days=10)
    codes, bounds = assign_splits(dates, splits, horizon=1)  # purge = 2
    # train, purge, valid, purge, promotion (in no split: no model trains or selects on it)
    assert day_runs(codes, dates) == [(0, 66), (-1, 2), (1, 20), (-1, 12)]
    assert set(bounds) == {"train", "valid", "promotion"}
    days = pd.bdate_range("2022-01-03", periods=100)
    assert bounds["promotion"] == [days[90].date().isoformat(), days[99].date().isoformat()]
    assert bounds["valid"][1] == days[87].date().isoformat()
    assert bounds["train"][1] == days[65].date().isoformat()


def test_every_window_moves_with_the_newest_day() -> None:
    """Twenty more days: every window shifts by exactly twenty days; training gains them all."""
    splits = SplitSection(valid_days=20, promotion_days=10)
    _, before = assign_splits(calendar(100), splits, horizon=1)
    codes, after = assign_splits(calendar(120), splits, horizon=1)
    days = pd.bdate_range("2022-01-03", periods=120)
    for name in before:
        for end in (0, 1):
            if (name, end) == ("train", 0):
                continue  # training always starts at the first day
            moved = days.get_loc(pd.Timestamp(after[name][end]))
            assert moved - days.get_loc(pd.Timestamp(before[name][end])) == 20, (name, end)
    assert int((codes == 0).sum()) == 3 * (66 + 20)


def test_fractions_leave_the_newest_days_out_of_training() -> None:
    """What rolling splits fix: with fractions, 20 more days give training only 14."""
    _, before = assign_splits(calendar(100), SplitSection(), horizon=1)
    _, after = assign_splits(calendar(120), SplitSection(), horizon=1)
    days = pd.bdate_range("2022-01-03", periods=120)
    gained = days.get_loc(pd.Timestamp(after["train"][1])) - days.get_loc(
        pd.Timestamp(before["train"][1])
    )
    assert gained == 14


def test_a_test_split_and_a_training_cap() -> None:
    dates = calendar(100)
    splits = SplitSection(valid_days=20, test_days=15, train_days=30, purge_days=3)
    codes, bounds = assign_splits(dates, splits, horizon=1)
    # before the 30 training days: no split; then train, purge, valid, purge, test
    assert day_runs(codes, dates) == [(-1, 29), (0, 30), (-1, 3), (1, 20), (-1, 3), (2, 15)]
    assert set(bounds) == {"train", "valid", "test"}


def test_promotion_window_and_test_split_together() -> None:
    dates = calendar(100)
    splits = SplitSection(valid_days=20, promotion_days=10, test_days=15, purge_days=2)
    codes, bounds = assign_splits(dates, splits, horizon=1)
    assert day_runs(codes, dates) == [(0, 49), (-1, 2), (1, 20), (-1, 14), (2, 15)]
    days = pd.bdate_range("2022-01-03", periods=100)
    assert bounds["promotion"] == [days[73].date().isoformat(), days[82].date().isoformat()]


def test_a_calendar_too_short_for_the_lengths_names_them() -> None:
    with pytest.raises(ValueError, match=r"no train dates with 30 trading dates, valid_days=20"):
        assign_splits(calendar(30), SplitSection(valid_days=20, promotion_days=10), horizon=1)


def test_rolling_settings_that_cannot_work_are_named() -> None:
    with pytest.raises(ValueError, match=r"features\.splits\.test_days .* needs .*valid_days"):
        SplitSection(test_days=10)
    with pytest.raises(ValueError, match=r"cannot be combined with features\.splits\.valid_end"):
        SplitSection(valid_days=20, test_days=5, valid_end="2022-03-01")
    with pytest.raises(ValueError, match="promotion_days or test_days"):
        SplitSection(valid_days=20)
    with pytest.raises(ConfigError, match=r"features\.splits\.promotion_days"):
        load_config(None, ["features.splits.promotion_days=-1"])


def test_nightly_config_is_rolling_and_survives_a_yaml_round_trip(tmp_path: Path) -> None:
    """Prefect passes the config as a full dict: every key is then set, fractions included."""
    cfg = load_config(CONFIGS / "nightly.yaml")
    assert cfg.features.splits.rolling and cfg.features.splits.test_days == 0
    assert cfg.features.splits.promotion_days >= cfg.registry.min_days
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(cfg.to_yaml())
    assert load_config(resolved) == cfg
