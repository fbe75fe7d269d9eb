"""Score smoothing: an EMA of daily ranks that is causal, halves at the half-life, skips gaps."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from alphaloom.tasks.evaluation.metrics import EvaluationError
from alphaloom.tasks.evaluation.portfolio import topk_dropout_returns
from alphaloom.tasks.evaluation.smoothing import smooth_scores

DAYS = pd.bdate_range("2024-01-01", periods=6)


def _panel(n_days: int = 30, n_names: int = 20, seed: int = 0) -> pd.DataFrame:
    """A persistent per-name signal plus fresh daily noise, and returns it predicts."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(0, 1, n_names)
    noise = rng.normal(0, 1, (n_days, n_names))
    return pd.DataFrame(
        {
            "symbol": np.tile([f"S{i:02d}" for i in range(n_names)], n_days),
            "date": np.repeat(pd.bdate_range("2023-01-02", periods=n_days), n_names),
            "score": (signal + noise).ravel(),
            "fwd_return": (0.01 * signal + rng.normal(0, 0.02, (n_days, n_names))).ravel(),
            "p0": 0.25,
        }
    )


@pytest.mark.parametrize("half_life", [0, 0.0, None])
def test_no_half_life_is_the_identity(half_life: float | None) -> None:
    frame = _panel()
    assert smooth_scores(frame, half_life) is frame


def test_a_future_day_never_changes_today() -> None:
    frame = _panel()
    smoothed = smooth_scores(frame, 3.0)
    cut = frame["date"].unique()[12]
    changed = frame.copy()
    later = changed["date"] > cut
    changed.loc[later, "score"] = np.random.default_rng(9).normal(size=int(later.sum()))
    changed = changed[~(later & (changed["symbol"] == "S03"))]  # and a name vanishes
    again = smooth_scores(changed, 3.0)
    upto = frame["date"] <= cut
    pd.testing.assert_frame_equal(smoothed[upto], again[upto.reindex(again.index)])
    assert not np.allclose(smoothed.loc[later, "score"].iloc[:19], again.loc[later, "score"][:19])


def _two_names(a_scores: list[float | None]) -> pd.DataFrame:
    """A against B (scored 0 every day); None: A has no row that day."""
    rows = [{"symbol": "B", "date": d, "score": 0.0} for d in DAYS[: len(a_scores)]]
    rows += [
        {"symbol": "A", "date": d, "score": s}
        for d, s in zip(DAYS, a_scores, strict=False)
        if s is not None
    ]
    return pd.DataFrame(rows)


def _a(frame: pd.DataFrame) -> list[float]:
    return frame[frame["symbol"] == "A"].sort_values("date")["score"].tolist()


def test_a_day_one_half_life_ago_weighs_half_of_today() -> None:
    # A tops the day (rank 2 of 2 = 1.0) on day 0 and is last (rank 1 of 2 = 0.5) on day 2;
    # with half-life 2 day 0 weighs 1/2 against day 2's 1: (0.5 * 1.0 + 1 * 0.5) / 1.5 = 2/3.
    # A has no row on day 1: nothing is added, but day 0 still ages by two days.
    out = smooth_scores(_two_names([1.0, None, -1.0]), 2.0)
    assert _a(out) == pytest.approx([1.0, 2.0 / 3.0])
    # with a row on day 1 too (rank 1.0, weight 2 ** -0.5) the same day 0 still weighs 1/2
    w = 2**-0.5
    out = smooth_scores(_two_names([1.0, 1.0, -1.0]), 2.0)
    expected = [1.0, 1.0, (0.5 * 1.0 + w * 1.0 + 1 * 0.5) / (0.5 + w + 1)]
    assert _a(out) == pytest.approx(expected)


def test_the_smoothed_score_is_a_rank_average_and_other_columns_stay() -> None:
    frame = _panel().sample(frac=1.0, random_state=1)  # row order is kept, whatever it is
    frame.loc[frame.index[:5], "score"] = math.nan
    out = smooth_scores(frame, 5.0)
    assert out.index.equals(frame.index)
    assert out["score"].iloc[:5].isna().all() and out["score"].iloc[5:].notna().all()
    assert out["score"].dropna().between(0.0, 1.0).all()
    pd.testing.assert_frame_equal(out.drop(columns="score"), frame.drop(columns="score"))
    first = frame["date"] == frame["date"].min()  # no history yet: the day's own rank
    ranks = frame[first].groupby("date")["score"].rank(pct=True)
    np.testing.assert_allclose(out.loc[first, "score"], ranks)


def test_smoothing_a_persistent_signal_cuts_turnover() -> None:
    frame = _panel(n_days=60, n_names=40)
    raw = topk_dropout_returns(frame, topk=8, n_drop=8, cost_bps=0.0)
    smooth = topk_dropout_returns(smooth_scores(frame, 5.0), topk=8, n_drop=8, cost_bps=0.0)
    assert smooth["long_turnover"].iloc[1:].mean() < 0.6 * raw["long_turnover"].iloc[1:].mean()


def test_bad_input_is_refused() -> None:
    frame = _panel()
    with pytest.raises(EvaluationError):
        smooth_scores(frame, -1.0)
    with pytest.raises(EvaluationError, match="repeat"):
        smooth_scores(pd.concat([frame, frame.iloc[:1]]), 2.0)
