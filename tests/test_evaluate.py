"""Metrics on hand-made predictions equal independent, hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from alphaloom.tasks.common.config import EvaluateSection
from alphaloom.tasks.data.ingest import MarketData, load_market, save_market
from alphaloom.tasks.evaluation import evaluate as evaluate_module
from alphaloom.tasks.evaluation.evaluate import evaluate_predictions
from alphaloom.tasks.evaluation.exposures import exposure_metrics, risk_exposures
from alphaloom.tasks.evaluation.metrics import (
    EvaluationError,
    classification_metrics,
    confusion_matrix,
    daily_ic,
    long_short_returns,
    oracle_metrics,
    quantile_metrics,
    quantile_returns,
)
from alphaloom.tasks.evaluation.neutral import (
    market_exposures,
    neutral_exposures,
    neutral_ic_metrics,
)
from alphaloom.tasks.evaluation.plots import drawdown
from alphaloom.tasks.evaluation.portfolio import topk_dropout
from alphaloom.tasks.evaluation.smoothing import smooth_scores
from alphaloom.tasks.orchestration.caching import StageRef


def _preds(n_days: int = 5, n_symbols: int = 10, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    dates = pd.date_range("2024-01-01", periods=n_days, freq="B")
    for d in dates:
        ret = rng.normal(0, 0.02, n_symbols)
        score = ret * 50 + rng.normal(0, 1, n_symbols)
        probs = rng.dirichlet(np.ones(4), n_symbols)
        label = np.digitize(ret, np.quantile(ret, [0.3, 0.6, 0.9]))
        for i in range(n_symbols):
            rows.append(
                {
                    "symbol": f"S{i:02d}",
                    "date": d,
                    "score": score[i],
                    **{f"p{k}": probs[i, k] for k in range(4)},
                    "label": int(label[i]),
                    "fwd_return": ret[i],
                }
            )
    return pd.DataFrame(rows)


def test_ic_matches_per_day_pearson_and_spearman() -> None:
    preds = _preds()
    ic = daily_ic(preds, "pearson")
    ric = daily_ic(preds, "spearman")
    for date, day in preds.groupby("date"):
        assert ic[date] == pytest.approx(np.corrcoef(day["score"], day["fwd_return"])[0, 1])
        assert ric[date] == pytest.approx(stats.spearmanr(day["score"], day["fwd_return"])[0])


def test_icir_is_mean_over_sample_std_not_annualised() -> None:
    preds = _preds(n_days=8)
    metrics, _ = evaluate_predictions(preds, EvaluateSection(), with_figures=False)
    per_day = [np.corrcoef(d["score"], d["fwd_return"])[0, 1] for _, d in preds.groupby("date")]
    ranks = [stats.spearmanr(d["score"], d["fwd_return"])[0] for _, d in preds.groupby("date")]
    assert metrics["ic"] == pytest.approx(np.mean(per_day))
    assert metrics["icir"] == pytest.approx(np.mean(per_day) / np.std(per_day, ddof=1))
    assert metrics["rank_ic"] == pytest.approx(np.mean(ranks))
    assert metrics["rank_icir"] == pytest.approx(np.mean(ranks) / np.std(ranks, ddof=1))


def test_days_without_a_defined_correlation_are_dropped() -> None:
    preds = _preds(n_days=3)
    first = preds["date"] == preds["date"].min()
    preds.loc[first, "score"] = 1.0  # constant score: correlation undefined
    ic = daily_ic(preds)
    assert preds["date"].min() not in ic.index
    assert len(ic) == 2


def test_ties_get_average_ranks() -> None:
    day = pd.DataFrame(
        {
            "date": pd.Timestamp("2024-01-02"),
            "score": [1.0, 1.0, 2.0, 3.0],
            "fwd_return": [0.1, 0.3, 0.2, 0.4],
        }
    )
    assert daily_ic(day, "spearman").iloc[0] == pytest.approx(
        stats.spearmanr(day["score"], day["fwd_return"])[0]
    )


def test_long_short_returns_turnover_and_costs_by_hand() -> None:
    preds = _preds(n_days=4, n_symbols=10, seed=3)
    quantile, cost_bps = 0.2, 25.0
    daily = long_short_returns(preds, quantile, cost_bps)
    previous: dict[str, float] = {}
    for date, day in preds.groupby("date"):
        ordered = day.sort_values("score", ascending=False)
        longs, shorts = ordered.head(2), ordered.tail(2)
        gross = longs["fwd_return"].mean() - shorts["fwd_return"].mean()
        weights = {s: 0.5 for s in longs["symbol"]} | {s: -0.5 for s in shorts["symbol"]}
        names = set(weights) | set(previous)
        turnover = sum(abs(weights.get(s, 0.0) - previous.get(s, 0.0)) for s in names)
        previous = weights
        assert daily.loc[date, "gross"] == pytest.approx(gross)
        assert daily.loc[date, "turnover"] == pytest.approx(turnover)
        assert daily.loc[date, "net"] == pytest.approx(gross - turnover * cost_bps / 1e4)


def test_portfolio_summary_by_hand() -> None:
    preds = _preds(n_days=30, n_symbols=20, seed=5)
    cfg = EvaluateSection(
        long_short_quantile=0.1, cost_bps=10.0, annualization_days=252, smoothing_half_life=0
    )
    metrics, _ = evaluate_predictions(preds, cfg, with_figures=False)
    net = long_short_returns(preds, 0.1, 10.0)["net"].to_numpy()
    wealth = np.concatenate([[0.0], np.cumsum(net)])
    drawdown = np.min(wealth - np.maximum.accumulate(wealth))
    assert metrics["ls_ann_return"] == pytest.approx(net.mean() * 252)
    assert metrics["ls_sharpe"] == pytest.approx(net.mean() / net.std(ddof=1) * math.sqrt(252))
    assert metrics["max_drawdown"] == pytest.approx(drawdown)
    assert metrics["max_drawdown"] <= 0.0


def test_classification_metrics_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 2, 3, 3, 3])
    predicted = np.array([0, 1, 1, 1, 3, 3, 2, 3])
    cm = confusion_matrix(labels, predicted)
    assert cm.sum() == len(labels)
    assert cm[3, 2] == 1 and cm[0, 0] == 1
    metrics = classification_metrics(cm)
    assert metrics["accuracy"] == pytest.approx(np.mean(labels == predicted))
    f1 = []
    for k in range(4):
        tp = np.sum((labels == k) & (predicted == k))
        fp = np.sum((labels != k) & (predicted == k))
        fn = np.sum((labels == k) & (predicted != k))
        f1.append(2 * tp / (2 * tp + fp + fn))
        assert metrics[f"recall_{k}"] == pytest.approx(tp / (tp + fn))
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1))


def test_oracle_join_on_symbol_and_date() -> None:
    preds = _preds(n_days=6, n_symbols=12, seed=9)
    oracle = preds[["symbol", "date"]].copy()
    oracle["expected_return"] = preds["fwd_return"] * 2 + 0.01  # a perfect ranker
    oracle = oracle.sample(frac=1.0, random_state=0)  # order must not matter
    oracle["date"] = oracle["date"].dt.date  # plain dates join with timestamps
    result = oracle_metrics(preds, oracle)
    assert result["oracle_ic"] == pytest.approx(1.0)
    assert result["oracle_rank_ic"] == pytest.approx(1.0)
    metrics, _ = evaluate_predictions(preds, EvaluateSection(), oracle=oracle, with_figures=False)
    assert metrics["rank_ic_vs_oracle"] == pytest.approx(metrics["rank_ic"])


def test_unknown_outcomes_are_excluded() -> None:
    preds = _preds(n_days=4)
    last = preds["date"] == preds["date"].max()
    preds.loc[last, "fwd_return"] = np.nan
    preds.loc[last, "label"] = -1
    metrics, _ = evaluate_predictions(preds, EvaluateSection(), with_figures=False)
    known = preds[~last]
    expected = np.mean(
        [np.corrcoef(d["score"], d["fwd_return"])[0, 1] for _, d in known.groupby("date")]
    )
    assert metrics["ic"] == pytest.approx(expected)


def test_missing_column_is_named() -> None:
    preds = _preds().drop(columns=["fwd_return"])
    with pytest.raises(EvaluationError, match="fwd_return"):
        evaluate_predictions(preds, EvaluateSection())


def test_figures_and_the_quantile_table_are_rendered() -> None:
    metrics, artifacts = evaluate_predictions(_preds(n_days=6), EvaluateSection())
    assert set(artifacts) == {
        "long_short_cumulative.png",
        "rank_ic_over_time.png",
        "confusion_matrix.png",
        "calibration.png",
        "quantile_returns.png",
        "quantile_returns.csv",
        "topk_excess_cumulative.png",
    }
    table = artifacts["quantile_returns.csv"]
    assert metrics["q1_return"] == pytest.approx(table["mean_return"].iloc[0])
    assert {"q5_return", "q5_minus_q1"} <= set(metrics)
    _, tables_only = evaluate_predictions(_preds(n_days=6), EvaluateSection(), with_figures=False)
    assert set(tables_only) == {"quantile_returns.csv"}
    for name, fig in artifacts.items():
        if name.endswith(".csv"):
            continue
        fig.canvas.draw()
        assert fig.canvas.buffer_rgba().shape[0] > 100


# ----------------------------------------------------------------------------------------------
# what the score ranks: quantile returns and exposures


def _day_frame(n_days: int = 30, n_names: int = 50, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    dates = np.repeat(pd.bdate_range("2021-01-04", periods=n_days), n_names)
    symbols = np.tile([f"S{i:02d}" for i in range(n_names)], n_days)
    fwd = rng.normal(0.0, 0.02, n_days * n_names)
    return pd.DataFrame({"symbol": symbols, "date": dates, "fwd_return": fwd})


def test_quantile_returns_sort_a_perfect_score_and_flatten_a_random_one() -> None:
    frame = _day_frame()
    perfect = frame.assign(score=frame["fwd_return"])
    table = quantile_returns(perfect, 5)
    assert table["quantile"].tolist() == [1, 2, 3, 4, 5]
    assert (table["mean_return"].diff().dropna() > 0).all()
    assert (table["days"] == 30).all()
    # each bucket's mean equals the mean of that day-slice, computed by hand for quintile 5
    top = perfect.groupby("date")["fwd_return"].apply(lambda r: r.nlargest(10).mean()).mean()
    assert table["mean_return"].iloc[-1] == pytest.approx(top)
    metrics = quantile_metrics(table)
    assert metrics["q5_minus_q1"] == pytest.approx(
        table["mean_return"].iloc[-1] - table["mean_return"].iloc[0]
    )
    reversed_score = quantile_metrics(quantile_returns(frame.assign(score=-frame["fwd_return"])))
    assert reversed_score["q5_minus_q1"] == pytest.approx(-metrics["q5_minus_q1"])


def _bars_with_two_regimes() -> pd.DataFrame:
    """Half the names calm and liquid, half volatile and thin."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(20):
        vol, volume = (0.005, 1e6) if i % 2 == 0 else (0.04, 1e3)
        close = 50 * np.exp(np.cumsum(rng.normal(0, vol, 80)))
        for day, price in zip(pd.bdate_range("2021-01-04", periods=80), close, strict=True):
            rows.append((f"S{i:02d}", day, price, volume))
    return pd.DataFrame(rows, columns=["symbol", "date", "close", "volume"])


def test_exposures_measure_volatility_and_size_from_bars() -> None:
    bars = _bars_with_two_regimes()
    exposures = risk_exposures(bars)
    assert exposures["vol20"].iloc[:10].isna().all()  # fewer than 10 returns yet
    by_regime = exposures.assign(volatile=exposures["symbol"].str[1:].astype(int) % 2 == 1)
    means = by_regime.dropna().groupby("volatile")[["vol20", "log_dollar_volume"]].mean()
    assert means.loc[True, "vol20"] > 4 * means.loc[False, "vol20"]
    assert means.loc[True, "log_dollar_volume"] < means.loc[False, "log_dollar_volume"]


def test_a_volatility_loving_score_shows_in_score_vol_corr() -> None:
    bars = _bars_with_two_regimes()
    exposures = risk_exposures(bars)
    known = exposures.dropna()
    preds = known[["symbol", "date"]].copy()
    noise = np.random.default_rng(2).normal(0, 0.05, len(preds))
    preds["score"] = np.log(known["vol20"].to_numpy()) + noise  # ranks volatility, nothing else
    result = exposure_metrics(preds, exposures)
    assert result["score_vol_corr"] > 0.9
    assert result["score_size_corr"] < -0.5  # the volatile names are also the thin ones
    neutral = preds.assign(score=np.random.default_rng(3).normal(size=len(preds)))
    assert abs(exposure_metrics(neutral, exposures)["score_vol_corr"]) < 0.15


# ----------------------------------------------------------------------------------------------
# the TopkDropout book, score smoothing and the factor-neutral Rank IC, wired in


BOOK = EvaluateSection(  # an unsmoothed book; the smoothing tests turn it on
    topk=3, n_drop=1, cost_bps=10.0, long_short_quantile=0.2, smoothing_half_life=0.0
)


def test_topk_dropout_metrics_are_the_strategy_on_the_labelled_rows() -> None:
    preds = _preds(n_days=25, n_symbols=12)
    preds.loc[preds.index[-12:], "fwd_return"] = np.nan  # the newest day: no outcome yet
    metrics, artifacts = evaluate_predictions(preds, BOOK)
    daily, expected = topk_dropout(preds.iloc[:-12], 3, 1, 10.0, 252)
    assert {key for key in metrics if key.startswith("topk_")} == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, nan_ok=True), key
    assert metrics["topk_excess_ann_return_net"] < metrics["topk_excess_ann_return_gross"]
    assert "rank_ic_smoothed" not in metrics  # smoothing is off in this book
    # the figure's drawdown is the one the metric reports
    wealth = daily["excess_net"].cumsum()
    assert drawdown(wealth).min() == pytest.approx(metrics["topk_excess_max_drawdown_net"])
    figure = artifacts["topk_excess_cumulative.png"]
    lines = {line.get_label(): line for line in figure.axes[0].lines}
    np.testing.assert_allclose(lines["net of costs"].get_ydata(), wealth.to_numpy())
    np.testing.assert_allclose(
        lines["gross"].get_ydata(), daily["excess_gross"].cumsum().to_numpy()
    )
    # a different book (n_drop) gives different figures: the config is what is traded
    wide, _ = evaluate_predictions(preds, BOOK.model_copy(update={"n_drop": 3}), with_figures=False)
    assert wide["topk_excess_turnover"] > metrics["topk_excess_turnover"]


def test_smoothing_changes_the_books_but_not_the_models_rank_ic() -> None:
    preds = _preds(n_days=30, n_symbols=12, seed=4)
    raw, _ = evaluate_predictions(preds, BOOK, with_figures=False)
    smooth_cfg = BOOK.model_copy(update={"smoothing_half_life": 3.0})
    smoothed, _ = evaluate_predictions(preds, smooth_cfg, with_figures=False)
    for key in ("rank_ic", "ic", "rank_icir", "icir", "q5_minus_q1"):
        assert smoothed[key] == raw[key], key
    traded = smooth_scores(preds, 3.0)
    assert smoothed["rank_ic_smoothed"] == pytest.approx(daily_ic(traded, "spearman").mean())
    assert smoothed["rank_ic_smoothed"] != pytest.approx(raw["rank_ic"])
    _, book = topk_dropout(traded, 3, 1, 10.0, 252)
    assert smoothed["topk_ls_sharpe_net"] == pytest.approx(book["topk_ls_sharpe_net"])
    assert smoothed["topk_excess_turnover"] == pytest.approx(book["topk_excess_turnover"])
    decile = long_short_returns(traded, 0.2, 10.0)
    assert smoothed["ls_turnover"] == pytest.approx(decile["turnover"].mean())
    assert smoothed["ls_turnover"] < raw["ls_turnover"]  # the point of smoothing


def test_history_gives_the_smoothing_its_past_as_one_series_would() -> None:
    preds = _preds(n_days=30, n_symbols=12, seed=5)
    first_day = preds["date"].unique()[15]
    early, late = preds[preds["date"] < first_day], preds[preds["date"] >= first_day]
    cfg = BOOK.model_copy(update={"smoothing_half_life": 5.0})
    with_past, _ = evaluate_predictions(late, cfg, with_figures=False, history=preds)
    alone, _ = evaluate_predictions(late, cfg, with_figures=False)
    whole = smooth_scores(preds, 5.0)
    expected = daily_ic(whole[whole["date"] >= first_day], "spearman").mean()
    assert with_past["rank_ic_smoothed"] == pytest.approx(expected)
    assert alone["rank_ic_smoothed"] != pytest.approx(expected)
    assert with_past["rank_ic"] == alone["rank_ic"]  # history never touches the raw score
    assert early["date"].max() < first_day


def test_evaluate_splits_smooths_test_on_the_validation_scores(monkeypatch) -> None:
    preds = _preds(n_days=30, n_symbols=12, seed=6)
    first_day = preds["date"].unique()[15]
    by_split = {
        "valid": preds[preds["date"] < first_day],
        "test": preds[preds["date"] >= first_day],
    }
    monkeypatch.setattr(
        evaluate_module, "predict", lambda _m, _d, split, *_a, **_k: by_split[split]
    )

    class Coverage:
        @staticmethod
        def open(_dir):
            return Coverage()

        def label_coverage(self, split):
            return {"rows": float(len(by_split[split]))}

    monkeypatch.setattr(evaluate_module, "ShardSetInfo", Coverage)
    from alphaloom.tasks.common.config import PipelineConfig

    cfg = PipelineConfig(evaluate=BOOK.model_copy(update={"smoothing_half_life": 5.0}))
    out = evaluate_module.evaluate_splits(None, "unused", cfg)
    expected, _ = evaluate_predictions(
        by_split["test"], cfg.evaluate, with_figures=False, history=by_split["valid"]
    )
    assert out["test"][0]["topk_ls_sharpe_net"] == pytest.approx(expected["topk_ls_sharpe_net"])
    assert out["test"][0]["rank_ic_smoothed"] == pytest.approx(expected["rank_ic_smoothed"])
    first, _ = evaluate_predictions(by_split["valid"], cfg.evaluate, with_figures=False)
    assert out["valid"][0]["rank_ic_smoothed"] == pytest.approx(first["rank_ic_smoothed"])


def _instruments(bars: pd.DataFrame) -> pd.DataFrame:
    symbols = sorted(bars["symbol"].unique())
    return pd.DataFrame({"symbol": symbols, "industry": [f"I{i % 3}" for i in range(len(symbols))]})


def test_neutral_rank_ic_is_logged_when_the_exposures_carry_the_factors() -> None:
    bars = _bars_with_two_regimes()
    exposures = neutral_exposures(bars, _instruments(bars))
    known = exposures.dropna()
    rng = np.random.default_rng(7)
    preds = known[["symbol", "date"]].reset_index(drop=True)
    preds["fwd_return"] = rng.normal(0, 0.02, len(preds))
    preds["score"] = preds["fwd_return"] + np.log(known["vol20"].to_numpy()) * 0.01
    for k in range(4):
        preds[f"p{k}"] = 0.25
    preds["label"] = 0
    metrics, _ = evaluate_predictions(preds, BOOK, exposures=exposures, with_figures=False)
    expected = neutral_ic_metrics(preds, exposures)
    assert metrics["rank_ic_neutral"] == pytest.approx(expected["rank_ic_neutral"])
    assert metrics["rank_icir_neutral"] == pytest.approx(expected["rank_icir_neutral"])
    assert metrics["rank_ic_neutral"] != pytest.approx(metrics["rank_ic"])
    assert metrics["score_vol_corr"] == pytest.approx(
        exposure_metrics(preds, exposures)["score_vol_corr"]
    )
    # volatility and size only (no reversal, no industry): no neutral Rank IC, no error
    plain, _ = evaluate_predictions(preds, BOOK, exposures=risk_exposures(bars), with_figures=False)
    assert "rank_ic_neutral" not in plain and plain["score_vol_corr"] == metrics["score_vol_corr"]


def test_market_exposures_are_the_neutral_exposures_of_the_saved_market(tmp_path) -> None:
    from alphaloom.tasks.common.config import DataSection, SyntheticSection

    market = load_market(
        DataSection(synthetic=SyntheticSection(n_symbols=12, n_days=100, seed=3)), min_history=10
    )
    assert isinstance(market, MarketData)
    out = save_market(market, tmp_path / "market" / "m")
    exposures = market_exposures(StageRef(stage="market", key="m", path=str(out)))
    expected = neutral_exposures(market.bars, market.instruments)
    pd.testing.assert_frame_equal(exposures, expected)
    assert exposures["industry"].nunique() > 1  # the instruments' industries, not one group
    assert {"vol20", "log_dollar_volume", "reversal5"} <= set(exposures.columns)
