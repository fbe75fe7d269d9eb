"""TopkDropout books on hand-made predictions: holdings, turnover, returns and costs by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from alphaloom.tasks.evaluation.metrics import EvaluationError
from alphaloom.tasks.evaluation.portfolio import (
    topk_dropout,
    topk_dropout_holdings,
    topk_dropout_metrics,
    topk_dropout_returns,
)

SYMBOLS = ["A", "B", "C", "D"]
# topk 2, n_drop 1. Day 1 builds {A, B}. Day 2: C (3) waits outside; of held + {C} the worst is
# A, so A is sold for C. Day 3: A and D both beat the held B and C, but only one name may go: C
# (the worst) is sold for A (the best outside); B stays although D outranks it. Day 4: the best
# outsider C ranks below both held names, so nothing is sold.
SCORES = [[4, 3, 2, 1], [1, 4, 3, 2], [4, 2, 1, 3], [4, 3, 2, 1]]
LONG = [{"A", "B"}, {"B", "C"}, {"A", "B"}, {"A", "B"}]
# the same rule on the negated score: day 1 {C, D}; day 2 A (-1) is the best outsider and C
# (-3) the worst of held + {A}; day 3 C (-1) comes back for A (-4); day 4 outsider B is worst
SHORT = [{"C", "D"}, {"A", "D"}, {"C", "D"}, {"C", "D"}]
RETURNS = [
    [0.01, 0.02, -0.01, 0.00],
    [0.03, -0.02, 0.01, 0.02],
    [0.0, 0.01, 0.02, -0.03],
    [0.02] * 4,
]


def _frame(scores: list[list[float]], returns: list[list[float]]) -> pd.DataFrame:
    days = pd.bdate_range("2024-01-01", periods=len(scores))
    rows = [
        {"symbol": s, "date": d, "score": float(sc), "fwd_return": float(r)}
        for d, day_scores, day_returns in zip(days, scores, returns, strict=True)
        for s, sc, r in zip(SYMBOLS, day_scores, day_returns, strict=True)
    ]
    return pd.DataFrame(rows)


def _names(held: np.ndarray) -> list[set[str]]:
    return [{SYMBOLS[j] for j in np.flatnonzero(row)} for row in held]


def test_hand_made_days_hold_and_replace_as_qlib_does() -> None:
    scores = np.array(SCORES, dtype=float)
    assert _names(topk_dropout_holdings(scores, topk=2, n_drop=1)) == LONG
    assert _names(topk_dropout_holdings(-scores, topk=2, n_drop=1)) == SHORT


def test_hand_made_returns_turnover_and_costs() -> None:
    daily = topk_dropout_returns(_frame(SCORES, RETURNS), topk=2, n_drop=1, cost_bps=10.0)
    ret = pd.DataFrame(RETURNS, columns=SYMBOLS)
    long = [ret.loc[t, sorted(names)].mean() for t, names in enumerate(LONG)]
    short = [ret.loc[t, sorted(names)].mean() for t, names in enumerate(SHORT)]
    bench = ret.mean(axis=1).tolist()
    np.testing.assert_allclose(daily["long_return"], long)
    np.testing.assert_allclose(daily["benchmark"], bench)
    np.testing.assert_allclose(daily["excess_gross"], np.subtract(long, bench))
    np.testing.assert_allclose(daily["ls_gross"], np.subtract(long, short))
    # long book: built (0.5 + 0.5), one swap of 0.5 each way on days 2 and 3, nothing on day 4
    np.testing.assert_allclose(daily["long_turnover"], [1.0, 1.0, 1.0, 0.0])
    # long-short: built (4 x 0.5); day 2 A goes +0.5 -> -0.5 and C -0.5 -> +0.5; day 3 back
    np.testing.assert_allclose(daily["ls_turnover"], [2.0, 2.0, 2.0, 0.0])
    np.testing.assert_allclose(daily["excess_net"], daily["excess_gross"] - [1e-3, 1e-3, 1e-3, 0.0])
    np.testing.assert_allclose(daily["ls_net"], daily["ls_gross"] - [2e-3, 2e-3, 2e-3, 0.0])
    assert daily.index.name == "date" and len(daily) == 4


def _random_frame(n_days: int = 40, n_names: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    fwd = rng.normal(0.0, 0.02, (n_days, n_names))
    return pd.DataFrame(
        {
            "symbol": np.tile([f"S{i:02d}" for i in range(n_names)], n_days),
            "date": np.repeat(pd.bdate_range("2022-01-03", periods=n_days), n_names),
            "score": (fwd + rng.normal(0.0, 0.02, fwd.shape)).ravel(),
            "fwd_return": fwd.ravel(),
        }
    )


def test_n_drop_equal_to_topk_is_a_daily_top_k() -> None:
    scores = np.random.default_rng(1).normal(size=(25, 40))
    held = topk_dropout_holdings(scores, topk=5, n_drop=5)
    top = np.zeros_like(held)
    np.put_along_axis(top, np.argsort(-scores, axis=1)[:, :5], True, axis=1)
    np.testing.assert_array_equal(held, top)


def test_dropout_bounds_turnover_and_a_full_rebalance_trades_more() -> None:
    frame = _random_frame()
    slow = topk_dropout_returns(frame, topk=10, n_drop=2, cost_bps=0.0)
    fast = topk_dropout_returns(frame, topk=10, n_drop=10, cost_bps=0.0)
    # at most 2 of 10 names change a day: 2 * 2 * 0.1 of weight traded, after the first day
    assert (slow["long_turnover"].iloc[1:] <= 0.4 + 1e-12).all()
    assert slow["long_turnover"].iloc[0] == pytest.approx(1.0)
    assert fast["long_turnover"].mean() > slow["long_turnover"].mean()


def test_costs_zero_net_is_gross_and_cost_is_linear_in_turnover() -> None:
    frame = _random_frame()
    free = topk_dropout_returns(frame, topk=5, n_drop=2, cost_bps=0.0)
    pd.testing.assert_series_equal(free["excess_net"], free["excess_gross"], check_names=False)
    pd.testing.assert_series_equal(free["ls_net"], free["ls_gross"], check_names=False)
    for bps in (5.0, 10.0, 20.0):
        paid = topk_dropout_returns(frame, topk=5, n_drop=2, cost_bps=bps)
        for book, turnover in (("excess", "long_turnover"), ("ls", "ls_turnover")):
            cost = paid[f"{book}_gross"] - paid[f"{book}_net"]
            np.testing.assert_allclose(cost, paid[turnover] * bps / 1e4, atol=1e-15)
        pd.testing.assert_series_equal(paid["ls_gross"], free["ls_gross"])


def test_a_perfect_score_beats_the_universe_and_its_negation_loses() -> None:
    frame = _random_frame()
    perfect = frame.assign(score=frame["fwd_return"])
    _, good = topk_dropout(perfect, topk=5, n_drop=5, cost_bps=0.0, annualization_days=252)
    assert good["topk_excess_ann_return_gross"] > 0
    assert good["topk_excess_ir_gross"] > 0 and good["topk_ls_sharpe_gross"] > 0
    inverted = perfect.assign(score=-perfect["score"])
    _, bad = topk_dropout(inverted, topk=5, n_drop=5, cost_bps=0.0, annualization_days=252)
    assert bad["topk_excess_ann_return_gross"] < 0 and bad["topk_ls_sharpe_gross"] < 0


def test_metrics_by_hand() -> None:
    daily = topk_dropout_returns(_random_frame(), topk=5, n_drop=1, cost_bps=10.0)
    metrics = topk_dropout_metrics(daily, annualization_days=250)
    for book, column, ratio, turnover in (
        ("topk_excess", "excess", "ir", "long_turnover"),
        ("topk_ls", "ls", "sharpe", "ls_turnover"),
    ):
        for kind in ("gross", "net"):
            r = daily[f"{column}_{kind}"].to_numpy()
            wealth = np.cumsum(r)
            peak = np.maximum.accumulate(np.maximum(wealth, 0.0))  # wealth starts at 0
            assert metrics[f"{book}_ann_return_{kind}"] == pytest.approx(r.mean() * 250)
            assert metrics[f"{book}_vol_{kind}"] == pytest.approx(r.std(ddof=1) * math.sqrt(250))
            sharpe = r.mean() / r.std(ddof=1) * math.sqrt(250)
            assert metrics[f"{book}_{ratio}_{kind}"] == pytest.approx(sharpe)
            assert metrics[f"{book}_max_drawdown_{kind}"] == pytest.approx((wealth - peak).min())
        assert metrics[f"{book}_turnover"] == pytest.approx(daily[turnover].mean())
    assert metrics["topk_ls_ann_return_net"] < metrics["topk_ls_ann_return_gross"]


def test_a_held_name_without_a_return_leaves_and_thin_days_are_skipped() -> None:
    returns = [row[:] for row in RETURNS]
    returns[1][1] = math.nan  # B, held on day 1 and best scored on day 2, has no return there
    frame = _frame(SCORES, returns)
    # between day 1 and day 2, a day with a single eligible name: skipped, the books carry over
    lone = pd.DataFrame(
        {"symbol": SYMBOLS, "date": pd.Timestamp("2024-01-01 12:00"), "score": 1.0}
    ).assign(fwd_return=[0.5, math.nan, math.nan, math.nan])
    daily = topk_dropout_returns(pd.concat([frame, lone]), topk=2, n_drop=1, cost_bps=0.0)
    assert len(daily) == 4
    # day 2: B ranks below every eligible name, so it, not A, is the one name dropped; C (the
    # best outsider) replaces it. Without the gap A would have gone (LONG[1] == {B, C}).
    ret = np.array(returns)
    assert daily["long_return"].iloc[1] == pytest.approx(ret[1, [0, 2]].mean())
    assert daily["benchmark"].iloc[1] == pytest.approx(np.nanmean(ret[1]))
    assert daily["long_turnover"].iloc[1] == pytest.approx(1.0)
    np.testing.assert_allclose(daily["long_return"].iloc[[0, 3]], [0.015, 0.02])


def test_nan_scores_are_never_bought() -> None:
    scores = np.array([[np.nan, 1.0, 2.0, np.nan], [5.0, np.nan, np.nan, np.nan]])
    held = topk_dropout_holdings(scores, topk=3, n_drop=1)
    assert _names(held) == [{"B", "C"}, {"A"}]


@pytest.mark.parametrize(("topk", "n_drop"), [(0, 1), (2, -1), (2.5, 1)])
def test_a_book_that_cannot_exist_is_refused(topk: float, n_drop: int) -> None:
    with pytest.raises(EvaluationError):
        topk_dropout_holdings(np.zeros((2, 3)), topk=topk, n_drop=n_drop)  # type: ignore[arg-type]


def test_repeated_rows_are_refused() -> None:
    frame = _frame(SCORES, RETURNS)
    with pytest.raises(EvaluationError, match="repeat"):
        topk_dropout_returns(pd.concat([frame, frame.iloc[:1]]), 2, 1, 0.0)
