"""Factor-neutral Rank IC: exposures from bars, and what neutralising removes and keeps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from alphaloom.tasks.evaluation.exposures import risk_exposures
from alphaloom.tasks.evaluation.metrics import daily_ic
from alphaloom.tasks.evaluation.neutral import (
    FACTORS,
    neutral_daily_rank_ic,
    neutral_exposures,
    neutral_ic_metrics,
)

N_NAMES, N_DAYS = 80, 60
INDUSTRIES = ["tech", "energy", "banks"]


def _bars(seed: int = 0) -> pd.DataFrame:
    """Random walks with volatility and volume that differ by name."""
    rng = np.random.default_rng(seed)
    vol = rng.uniform(0.005, 0.04, N_NAMES)
    volume = np.exp(rng.uniform(8, 14, N_NAMES))
    close = 50 * np.exp(np.cumsum(rng.normal(0, 1, (N_DAYS, N_NAMES)) * vol, axis=0))
    return pd.DataFrame(
        {
            "symbol": np.tile([f"S{i:02d}" for i in range(N_NAMES)], N_DAYS),
            "date": np.repeat(pd.bdate_range("2021-01-04", periods=N_DAYS), N_NAMES),
            "close": close.ravel(),
            "volume": np.tile(volume, N_DAYS) * rng.uniform(0.5, 1.5, N_DAYS * N_NAMES),
        }
    )


def _instruments() -> pd.DataFrame:
    symbols = [f"S{i:02d}" for i in range(N_NAMES)]
    return pd.DataFrame({"symbol": symbols, "industry": [INDUSTRIES[i % 3] for i in range(80)]})


@pytest.fixture(scope="module")
def exposures() -> pd.DataFrame:
    return neutral_exposures(_bars(), _instruments())


def _preds(exposures: pd.DataFrame, score: np.ndarray, fwd: np.ndarray) -> pd.DataFrame:
    return exposures[["symbol", "date"]].assign(score=score, fwd_return=fwd)


def test_exposures_reuse_risk_exposures_and_add_reversal_and_industry(exposures) -> None:
    bars = _bars()
    base = risk_exposures(bars).merge(exposures, on=["symbol", "date"], suffixes=("", "_n"))
    for column in ("vol20", "log_dollar_volume"):
        pd.testing.assert_series_equal(base[column], base[f"{column}_n"], check_names=False)
    one = exposures[exposures["symbol"] == "S07"].sort_values("date")
    close = bars[bars["symbol"] == "S07"].sort_values("date")["close"].to_numpy()
    assert one["reversal5"].iloc[:5].isna().all()
    np.testing.assert_allclose(one["reversal5"].iloc[5:], close[5:] / close[:-5] - 1.0)
    assert set(one["industry"]) == {INDUSTRIES[7 % 3]}
    assert (neutral_exposures(bars)["industry"] == "").all()  # no instruments: one group


def test_dated_instruments_give_the_industry_valid_on_each_day() -> None:
    bars = _bars()
    switch = pd.Timestamp("2021-02-01")
    dated = pd.DataFrame(
        {
            "symbol": ["S01", "S01"],
            "start_date": [pd.NaT, switch],
            "end_date": [switch - pd.Timedelta(days=1), pd.NaT],
            "industry": ["banks", "tech"],
        }
    )
    out = neutral_exposures(bars, dated)
    s01 = out[out["symbol"] == "S01"]
    assert (s01.loc[s01["date"] < switch, "industry"] == "banks").all()
    assert (s01.loc[s01["date"] >= switch, "industry"] == "tech").all()
    assert (out.loc[out["symbol"] == "S02", "industry"] == "").all()  # no row: unknown


def test_a_score_that_is_the_volatility_factor_has_no_neutral_ic(exposures) -> None:
    rng = np.random.default_rng(1)
    vol = exposures["vol20"].to_numpy()
    fwd = 2.0 * vol + rng.normal(0, 0.005, len(vol))  # volatile names did well
    preds = _preds(exposures, vol, fwd)
    raw = daily_ic(preds.dropna(), "spearman").mean()
    assert raw > 0.5
    neutral = neutral_daily_rank_ic(preds, exposures)
    assert len(neutral) == N_DAYS - 10 - 5 + 5  # vol20 known from day 11, reversal from day 6
    assert (neutral == 0.0).all()  # explained completely: nothing left
    # the factor plus independent noise: what is left is mostly the noise, which predicts
    # nothing. Not all: the rank of (factor + noise) is not linear in the factor's rank, and a
    # linear neutralisation leaves that bend (about 0.05 of a raw 0.85 here)
    noisy = _preds(exposures, np.log(vol) + rng.normal(0, 0.3, len(vol)), fwd)
    raw_noisy = daily_ic(noisy.dropna(), "spearman").mean()
    assert raw_noisy > 0.5
    assert abs(neutral_ic_metrics(noisy, exposures)["rank_ic_neutral"]) < 0.1 * raw_noisy


def test_an_industry_bet_has_no_neutral_ic(exposures) -> None:
    rng = np.random.default_rng(2)
    tech = (exposures["industry"] == "tech").to_numpy(dtype=float)
    fwd = 0.01 * tech + rng.normal(0, 0.002, len(tech))
    preds = _preds(exposures, tech, fwd)
    assert daily_ic(preds.dropna(), "spearman").mean() > 0.5
    assert neutral_ic_metrics(preds, exposures)["rank_ic_neutral"] == 0.0


def test_a_score_independent_of_the_factors_keeps_its_rank_ic(exposures) -> None:
    rng = np.random.default_rng(3)
    fwd = rng.normal(0, 0.02, len(exposures))
    preds = _preds(exposures, fwd + rng.normal(0, 0.02, len(fwd)), fwd)
    known = preds[exposures[list(FACTORS)].notna().all(axis=1).to_numpy()]
    raw = daily_ic(known, "spearman").mean()
    result = neutral_ic_metrics(preds, exposures)
    assert raw > 0.5
    assert result["rank_ic_neutral"] == pytest.approx(raw, abs=0.02)
    assert np.isfinite(result["rank_icir_neutral"])


def test_days_with_too_few_names_are_skipped(exposures) -> None:
    rng = np.random.default_rng(4)
    known = exposures.dropna(subset=list(FACTORS))
    preds = _preds(known, rng.normal(size=len(known)), rng.normal(size=len(known)))
    days = sorted(known["date"].unique())
    # design columns: intercept, 3 exposures, 2 industry dummies = 6, so 8 names are needed
    thin = pd.concat([preds[preds["date"] != days[0]], preds[preds["date"] == days[0]].iloc[:7]])
    series = neutral_daily_rank_ic(thin, exposures)
    assert days[0] not in series.index and days[1] in series.index
    enough = pd.concat([preds[preds["date"] != days[0]], preds[preds["date"] == days[0]].iloc[:8]])
    assert days[0] in neutral_daily_rank_ic(enough, exposures).index
