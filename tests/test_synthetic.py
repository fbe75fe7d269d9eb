"""The synthetic market: determinism, prefix stability, realistic bars and the planted signal."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest

from alphaloom.tasks.common.config import SyntheticSection
from alphaloom.tasks.data import synthetic
from alphaloom.tasks.data.labels import forward_return
from alphaloom.tasks.data.synthetic import THEMES, extend_market, generate_market, write_market
from alphaloom.tasks.evaluation.metrics import oracle_rank_ic

SMALL = SyntheticSection(n_symbols=20, n_days=120, seed=11)
# Big enough to measure a Rank IC to about +-0.005, small enough to generate in well under 1 s.
MEDIUM = SyntheticSection(n_symbols=150, n_days=400, seed=5)


@pytest.fixture(scope="module")
def medium() -> synthetic.SyntheticMarket:
    return generate_market(MEDIUM)


@pytest.fixture(scope="module")
def medium_panel(medium: synthetic.SyntheticMarket) -> pd.DataFrame:
    """Bars + oracle + the trailing features the planted effects are defined on."""
    panel = medium.bars.merge(medium.oracle, on=["symbol", "date"])
    panel = panel.merge(medium.instruments, on="symbol")
    by_symbol = panel.groupby("symbol")
    panel["ret5"] = by_symbol["close"].pct_change(5)
    vol = by_symbol["volume"]
    panel["vol_ratio"] = vol.transform(lambda v: v.rolling(5).mean() / v.rolling(20).mean())
    return panel.dropna(subset=["ret5", "vol_ratio"])


def test_same_seed_gives_identical_frames() -> None:
    a, b = generate_market(SMALL), generate_market(SMALL)
    pdt.assert_frame_equal(a.bars, b.bars)
    pdt.assert_frame_equal(a.instruments, b.instruments)
    pdt.assert_frame_equal(a.oracle, b.oracle)


def test_different_seed_differs() -> None:
    a = generate_market(SMALL)
    b = generate_market(SMALL.model_copy(update={"seed": SMALL.seed + 1}))
    assert not np.allclose(a.bars["close"], b.bars["close"])
    assert not a.instruments["description"].equals(b.instruments["description"])


def test_prefix_stable_when_days_are_added() -> None:
    short = generate_market(SMALL)
    long = generate_market(SMALL, n_days=SMALL.n_days + 15)
    keep = long.bars["date"] <= short.bars["date"].max()
    pdt.assert_frame_equal(long.bars[keep].reset_index(drop=True), short.bars)
    keep_o = long.oracle["date"] <= short.oracle["date"].max()
    pdt.assert_frame_equal(long.oracle[keep_o].reset_index(drop=True), short.oracle)
    assert long.bars["date"].nunique() == SMALL.n_days + 15


def test_canonical_bars_contract() -> None:
    bars = generate_market(SMALL).bars
    assert list(bars.columns) == [
        "symbol",
        "date",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "amount",
    ]
    assert bars["date"].dtype == "datetime64[ns]"
    assert (bars["date"] == bars["date"].dt.normalize()).all()
    assert all(bars[c].dtype == "float64" for c in bars.columns[2:])
    assert pd.api.types.is_string_dtype(bars["symbol"])
    assert isinstance(bars.index, pd.RangeIndex)
    assert bars.equals(bars.sort_values(["symbol", "date"]).reset_index(drop=True))
    assert not bars.duplicated(["symbol", "date"]).any()
    assert len(bars) == SMALL.n_symbols * SMALL.n_days
    assert (bars["date"].dt.day_of_week < 5).all()


def test_ohlc_volume_amount_are_consistent() -> None:
    bars = generate_market(SMALL).bars
    assert (bars[["open", "high", "low", "close"]] > 0).all().all()
    assert (bars["low"] <= bars[["open", "close"]].min(axis=1)).all()
    assert (bars["high"] >= bars[["open", "close"]].max(axis=1)).all()
    assert (bars["volume"] > 0).all()
    typical = (bars["high"] + bars["low"] + bars["close"]) / 3
    np.testing.assert_allclose(bars["amount"], bars["volume"] * typical)


def test_instruments_have_industry_index_and_description() -> None:
    inst = generate_market(SyntheticSection(n_symbols=60, n_days=100, n_indices=3)).instruments
    assert list(inst.columns) == ["symbol", "industry", "index", "description"]
    assert inst["industry"].nunique() == 10
    assert set(inst["index"]) - {""} == {"IDX1", "IDX2", "IDX3"}
    assert (inst["index"] == "").any()  # some symbols are in no index
    for industry, text in zip(inst["industry"], inst["description"], strict=True):
        assert industry in text
        assert any(theme in text for theme in THEMES)
    none = generate_market(SyntheticSection(n_symbols=10, n_days=100, n_indices=0)).instruments
    assert (none["index"] == "").all()


def test_returns_have_fat_tails_and_volatility_clustering(medium) -> None:
    ret = medium.bars.groupby("symbol")["close"].pct_change().dropna()
    assert ret.kurt() > 1.0  # excess kurtosis: a Gaussian would be ~0
    idio = medium.bars.assign(r=medium.bars.groupby("symbol")["close"].pct_change())
    sq = idio["r"] ** 2
    lag = idio.assign(sq=sq, sq_lag=sq.groupby(idio["symbol"]).shift(1)).dropna()
    assert lag["sq"].corr(lag["sq_lag"]) > 0.05  # GARCH: big moves follow big moves


def test_oracle_rank_ic_in_band(medium) -> None:
    ic = oracle_rank_ic(medium)
    assert 0.10 <= ic <= 0.20, ic


def test_oracle_rank_ic_vanishes_without_signal() -> None:
    flat = generate_market(MEDIUM.model_copy(update={"signal_scale": 0.0, "n_days": 200}))
    assert abs(oracle_rank_ic(flat)) < 0.03


def test_oracle_is_realised_on_average(medium) -> None:
    """The oracle is an unbiased forecast: sorting by it sorts the realised returns."""
    both = medium.oracle.assign(fwd=forward_return(medium.bars, horizon=1)).dropna()
    decile = both.groupby("date")["expected_return"].rank(pct=True)
    top = both.loc[decile > 0.8, "fwd"].mean()
    bottom = both.loc[decile <= 0.2, "fwd"].mean()
    assert top - bottom > 0.002


def test_theme_word_drift(medium) -> None:
    mean_oracle = medium.oracle.groupby("symbol")["expected_return"].mean()
    text = medium.instruments.set_index("symbol")["description"]
    good = [t for t, d in THEMES.items() if d > 0]
    bad = [t for t, d in THEMES.items() if d < 0]
    has_good = text.apply(lambda s: any(t in s for t in good) and not any(t in s for t in bad))
    has_bad = text.apply(lambda s: any(t in s for t in bad) and not any(t in s for t in good))
    assert mean_oracle[has_good].mean() > mean_oracle[has_bad].mean() + 0.001


def test_industry_effect(medium_panel) -> None:
    """Per industry: a drift, and a lagged response to its 20-day move whose sign differs."""
    panel = medium_panel.copy()
    oracle_x = panel["expected_return"] - panel.groupby("date")["expected_return"].transform("mean")
    ind_oracle = oracle_x.groupby([panel["industry"], panel["date"]]).mean()
    assert ind_oracle.var() / oracle_x.var() > 0.1  # industries differ in expected return
    ret = panel.groupby("symbol")["close"].pct_change()
    excess = ret - ret.groupby(panel["date"]).transform("mean")  # market removed
    ind = excess.groupby([panel["industry"], panel["date"]]).mean().rename("ret").to_frame()
    ind["oracle"] = ind_oracle
    # the industry's move over days t-19..t-5 (so the 5-day reversal does not interfere)
    ind["move"] = ind.groupby(level="industry")["ret"].transform(
        lambda r: r.shift(5).rolling(15).sum()
    )
    corr = ind.dropna().groupby(level="industry").apply(lambda d: d["move"].corr(d["oracle"]))
    assert corr.max() > 0.2  # momentum industries
    assert corr.min() < -0.2  # reversal industries


def test_reversal_only_after_volume_spike(medium_panel) -> None:
    panel = medium_panel
    spiky = panel[panel["vol_ratio"] > 1.4]
    calm = panel[panel["vol_ratio"] < 1.0]
    slope_spiky = np.polyfit(spiky["ret5"], spiky["expected_return"], 1)[0]
    slope_calm = np.polyfit(calm["ret5"], calm["expected_return"], 1)[0]
    assert slope_calm > 0  # mild continuation on calm days
    assert slope_spiky < 0  # reversal after a volume spike
    # on the 5-day return alone the two largely cancel: the effect needs the volume history
    overall = np.polyfit(panel["ret5"], panel["expected_return"], 1)[0]
    assert abs(overall) < abs(slope_spiky) / 3


def test_write_market_files(tmp_path) -> None:
    market = generate_market(SMALL)
    out = write_market(market, tmp_path / "m", SMALL)
    assert sorted(p.name for p in out.iterdir()) == [
        "bars.parquet",
        "instruments.csv",
        "oracle.parquet",
        "synthetic.json",
    ]
    pdt.assert_frame_equal(pd.read_parquet(out / "bars.parquet"), market.bars)
    pdt.assert_frame_equal(pd.read_parquet(out / "oracle.parquet"), market.oracle)
    inst = pd.read_csv(out / "instruments.csv", dtype=str, keep_default_na=False)
    pdt.assert_frame_equal(inst, market.instruments, check_dtype=False)
    assert (
        SyntheticSection.model_validate(json.loads((out / "synthetic.json").read_text())) == SMALL
    )


def test_write_market_failure_leaves_previous_files(tmp_path) -> None:
    market = generate_market(SMALL)
    out = write_market(market, tmp_path / "m", SMALL)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = synthetic.SyntheticMarket(
        bars=market.bars.iloc[:0],
        instruments=market.instruments,
        oracle=pd.DataFrame({"x": [object()]}),
    )
    with pytest.raises((TypeError, ValueError)):  # pyarrow cannot store a Python object
        write_market(broken, out, SMALL)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_extend_market_appends_days(tmp_path, caplog) -> None:
    out = write_market(generate_market(SMALL), tmp_path / "m", SMALL)
    old = pd.read_parquet(out / "bars.parquet")
    with caplog.at_level(logging.WARNING, logger="alphaloom.tasks.data.synthetic"):
        extended = extend_market(out, 7)
    assert not caplog.records  # history reproduced exactly, nothing to warn about
    new = pd.read_parquet(out / "bars.parquet")
    pdt.assert_frame_equal(new, extended.bars)
    assert new["date"].nunique() == SMALL.n_days + 7
    pdt.assert_frame_equal(new[new["date"] <= old["date"].max()].reset_index(drop=True), old)
    assert json.loads((out / "synthetic.json").read_text())["n_days"] == SMALL.n_days + 7


def test_extend_market_needs_a_written_market(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"synthetic\.json"):
        extend_market(tmp_path, 3)
