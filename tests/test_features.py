"""Alpha158 factors, labels, splits and normalisation against independent per-symbol references.

The references below are written with plain pandas rolling windows (min_periods=1, as Qlib's
operators use), np.polyfit and scipy, one symbol at a time, so they share no code with the
vectorised panel implementation in tasks/data/alpha158.py.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import percentileofscore

from alphaloom.tasks.common.config import FeaturesSection, LabelSection, SplitSection, load_config
from alphaloom.tasks.data.features import (
    ALPHA158_NAMES,
    FeatureTable,
    apply_normalizer,
    build_feature_table,
    compute_alpha158,
    fit_normalizer,
    load_feature_table,
    save_feature_table,
    select_factors,
)
from alphaloom.tasks.data.labels import compute_labels
from alphaloom.tasks.data.splits import assign_splits

WINDOWS = [5, 10, 20, 30, 60]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ----------------------------------------------------------------------------------------------
# Tiny random-walk bars


def random_bars(
    n_symbols: int = 4,
    n_days: int = 90,
    seed: int = 0,
    ragged: bool = True,
    amount: bool = False,
) -> pd.DataFrame:
    """Random-walk OHLCV; with `ragged`, histories start and end on different days.

    Symbol S0 trades on a coarse price tick with repeated volumes, so ties, flat windows and
    constant-volume windows occur (they exercise tie rules and the flat-std masks).
    """
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2021-01-04", periods=n_days)
    frames = []
    for s in range(n_symbols):
        start, stop = (3 * s, n_days - 2 * s) if ragged else (0, n_days)
        n = stop - start
        close = 20.0 * np.exp(np.cumsum(rng.normal(0.0, 0.02, n)))
        volume = rng.lognormal(8.0, 0.6, n)
        if s == 0:
            close = np.maximum(np.round(close * 2.0) / 2.0, 0.5)
            volume = np.round(volume / 3000.0) * 3000.0 + 1000.0
        open_ = close * np.exp(rng.normal(0.0, 0.01, n))
        high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0.0, 0.01, n)))
        low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0.0, 0.01, n)))
        if s == 0:  # everything on the tick: tied highs and lows too
            open_ = np.maximum(np.round(open_ * 2.0) / 2.0, 0.5)
            high = np.ceil(np.maximum(high, open_) * 2.0) / 2.0
            low = np.maximum(np.floor(np.minimum(low, open_) * 2.0) / 2.0, 0.25)
        frame = pd.DataFrame(
            {
                "symbol": f"S{s}",
                "date": dates[start:stop],
                "open": open_,
                "high": high,
                "low": low,
                "close": close,
                "volume": volume,
            }
        )
        if amount:
            frame["amount"] = volume * (high + low) / 2.0
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------------------------
# Per-symbol references (Qlib expressions evaluated with pandas on one symbol)


def _flat(std: pd.Series) -> pd.Series:
    return std.abs() <= 2e-5


def _regression(close: pd.Series, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slope, R^2 and last residual of close on time over each trailing window, via np.polyfit."""
    y_all = close.to_numpy()
    slope, rsq, resi = (np.full(len(y_all), np.nan) for _ in range(3))
    for t in range(len(y_all)):
        y = y_all[max(0, t - w + 1) : t + 1]
        if len(y) < 2:
            continue
        x = np.arange(len(y), dtype=float)
        b, a = np.polyfit(x, y, 1)
        slope[t] = b
        resi[t] = y[-1] - (a + b * x[-1])
        if np.std(y, ddof=1) > 2e-5:
            rsq[t] = np.corrcoef(x, y)[0, 1] ** 2
    return slope, rsq, resi


def _corr(left: pd.Series, right: pd.Series, w: int) -> pd.Series:
    corr = left.rolling(w, min_periods=1).corr(right)
    flat = _flat(left.rolling(w, min_periods=1).std()) | _flat(
        right.rolling(w, min_periods=1).std()
    )
    return corr.mask(flat)


def _gain_ratio(change: pd.Series, w: int) -> dict[str, pd.Series]:
    gain = change.clip(lower=0).rolling(w, min_periods=1).sum()
    loss = (-change).clip(lower=0).rolling(w, min_periods=1).sum()
    total = change.abs().rolling(w, min_periods=1).sum() + 1e-12
    return {"P": gain / total, "N": loss / total, "D": (gain - loss) / total}


def reference_symbol(g: pd.DataFrame, w: int) -> dict[str, pd.Series]:
    """Every rolling family at window w for one symbol's bars."""
    o, h, lo, c, v = (g[k] for k in ("open", "high", "low", "close", "volume"))
    roll = {k: s.rolling(w, min_periods=1) for k, s in (("c", c), ("h", h), ("lo", lo), ("v", v))}
    prev_c, prev_v = c.shift(1), v.shift(1)
    slope, rsq, resi = _regression(c, w)
    idxmax = roll["h"].apply(lambda x: x.argmax() + 1, raw=True)
    idxmin = roll["lo"].apply(lambda x: x.argmin() + 1, raw=True)
    rank = roll["c"].apply(lambda x: percentileofscore(x, x[-1]) / 100.0, raw=True)
    up = (c > prev_c).astype(float).rolling(w, min_periods=1).mean()
    down = (c < prev_c).astype(float).rolling(w, min_periods=1).mean()
    sums, vsums = _gain_ratio(c - prev_c, w), _gain_ratio(v - prev_v, w)
    wv = ((c / prev_c - 1).abs() * v).rolling(w, min_periods=1)
    maxh, minl = roll["h"].max(), roll["lo"].min()
    ref = {
        "ROC": c.shift(w) / c,
        "MA": roll["c"].mean() / c,
        "STD": roll["c"].std() / c,
        "BETA": slope / c,
        "RSQR": pd.Series(rsq, index=c.index),
        "RESI": resi / c,
        "MAX": maxh / c,
        "MIN": minl / c,
        "QTLU": roll["c"].quantile(0.8) / c,
        "QTLD": roll["c"].quantile(0.2) / c,
        "RANK": rank,
        "RSV": (c - minl) / (maxh - minl + 1e-12),
        "IMAX": idxmax / w,
        "IMIN": idxmin / w,
        "IMXD": (idxmax - idxmin) / w,
        "CORR": _corr(c, np.log(v + 1), w),
        "CORD": _corr(c / prev_c, np.log(v / prev_v + 1), w),
        "CNTP": up,
        "CNTN": down,
        "CNTD": up - down,
        **{f"SUM{k}": s for k, s in sums.items()},
        "VMA": roll["v"].mean() / (v + 1e-12),
        "VSTD": roll["v"].std() / (v + 1e-12),
        "WVMA": wv.std() / (wv.mean() + 1e-12),
        **{f"VSUM{k}": s for k, s in vsums.items()},
    }
    del o
    return ref


def reference_rows(bars: pd.DataFrame) -> dict[str, pd.Series]:
    """Candle and price-ratio factors, row by row."""
    o, h, lo, c = (bars[k] for k in ("open", "high", "low", "close"))
    rng = h - lo + 1e-12
    top, bottom = np.maximum(o, c), np.minimum(o, c)
    vwap = bars["amount"] / bars["volume"] if "amount" in bars else (h + lo + c) / 3
    return {
        "KMID": (c - o) / o,
        "KLEN": (h - lo) / o,
        "KMID2": (c - o) / rng,
        "KUP": (h - top) / o,
        "KUP2": (h - top) / rng,
        "KLOW": (bottom - lo) / o,
        "KLOW2": (bottom - lo) / rng,
        "KSFT": (2 * c - h - lo) / o,
        "KSFT2": (2 * c - h - lo) / rng,
        "OPEN0": o / c,
        "HIGH0": h / c,
        "LOW0": lo / c,
        "VWAP0": vwap / c,
    }


def assert_close(ours: np.ndarray, ref: np.ndarray, name: str) -> None:
    """float32 tolerance; NaN where the reference is NaN."""
    np.testing.assert_allclose(ours, ref.astype(np.float32), rtol=3e-5, atol=3e-6, err_msg=name)


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return random_bars()


@pytest.fixture(scope="module")
def factors(bars: pd.DataFrame) -> pd.DataFrame:
    return compute_alpha158(bars, ALPHA158_NAMES)


@pytest.fixture(scope="module")
def references(bars: pd.DataFrame) -> dict[str, np.ndarray]:
    out: dict[str, list[pd.Series]] = {}
    for _, g in bars.groupby("symbol", sort=False):
        g = g.reset_index(drop=True)
        for w in WINDOWS:
            for family, series in reference_symbol(g, w).items():
                out.setdefault(f"{family}{w}", []).append(series)
    return {name: pd.concat(parts).to_numpy(np.float64) for name, parts in out.items()}


# ----------------------------------------------------------------------------------------------
# Names and selection


def test_names_are_qlib_alpha158() -> None:
    assert len(ALPHA158_NAMES) == 158 == len(set(ALPHA158_NAMES))
    assert ALPHA158_NAMES[:13] == [
        *("KMID", "KLEN", "KMID2", "KUP", "KUP2", "KLOW", "KLOW2", "KSFT", "KSFT2"),
        *("OPEN0", "HIGH0", "LOW0", "VWAP0"),
    ]
    assert ALPHA158_NAMES[13:18] == ["ROC5", "ROC10", "ROC20", "ROC30", "ROC60"]
    assert ALPHA158_NAMES[-1] == "VSUMD60"
    assert select_factors("all", WINDOWS) == ALPHA158_NAMES


def test_select_factors_by_family_name_and_group() -> None:
    got = select_factors(["ma", "KMID", "CORD30", "price"], [5, 20])
    assert got == ["KMID", "OPEN0", "HIGH0", "LOW0", "VWAP0", "MA5", "MA20", "CORD30"]
    assert "MAX5" not in select_factors(["MA"], [5])  # a family is not a string prefix


@pytest.mark.parametrize("bad", ["ROCX", "FOO5", "MA0", "KMID3"])
def test_select_factors_names_unknown_entry(bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        select_factors(["MA", bad], WINDOWS)


def test_smoke_config_selection_resolves() -> None:
    cfg = load_config(None, ["features.factors=[KMID, ROC, CORR]", "features.windows=[5, 10]"])
    assert select_factors(cfg.features.factors, cfg.features.windows) == [
        "KMID",
        "ROC5",
        "ROC10",
        "CORR5",
        "CORR10",
    ]


# ----------------------------------------------------------------------------------------------
# Factor values


def test_row_factors_match_formulas(bars: pd.DataFrame, factors: pd.DataFrame) -> None:
    for name, ref in reference_rows(bars).items():
        assert_close(factors[name].to_numpy(), ref.to_numpy(), name)


def test_vwap_uses_amount_when_present() -> None:
    with_amount = random_bars(n_symbols=2, n_days=15, amount=True)
    got = compute_alpha158(with_amount, ["VWAP0"])["VWAP0"].to_numpy()
    expected = reference_rows(with_amount)["VWAP0"].to_numpy()
    assert_close(got, expected, "VWAP0")
    typical = compute_alpha158(with_amount.drop(columns="amount"), ["VWAP0"])["VWAP0"]
    assert not np.allclose(got, typical.to_numpy())


FAMILIES = sorted({n.rstrip("0123456789") for n in ALPHA158_NAMES[13:]})


@pytest.mark.parametrize("family", FAMILIES)
def test_rolling_family_matches_per_symbol_reference(
    family: str, factors: pd.DataFrame, references: dict[str, np.ndarray]
) -> None:
    for w in WINDOWS:
        name = f"{family}{w}"
        assert_close(factors[name].to_numpy(), references[name], name)


def test_reference_data_exercises_edge_cases(
    bars: pd.DataFrame, references: dict[str, np.ndarray]
) -> None:
    """The tick-priced symbol really produces masked RSQR/CORR values and tied ranks/highs."""
    assert np.isnan(references["RSQR5"][60:]).any()  # a flat close window somewhere
    assert np.isnan(references["CORR5"][60:]).any()
    assert (np.round(references["RANK10"] * 20) % 2 == 1).any()  # a half rank: ties
    high = bars.loc[bars["symbol"] == "S0", "high"].to_numpy()
    windows = np.lib.stride_tricks.sliding_window_view(high, 5)
    assert ((windows == windows.max(axis=1, keepdims=True)).sum(axis=1) > 1).any()


def test_near_flat_windows_are_masked_like_qlib() -> None:
    """A window whose close std is tiny but not zero: Qlib's 2e-5 mask gives NaN RSQR/CORR."""
    bars = random_bars(n_symbols=1, n_days=12, ragged=False)
    bars["close"] = 10.0 + 1e-6 * np.arange(12)  # a perfect, tiny trend: R^2 would be 1
    bars["open"] = bars["low"] = bars["close"]
    bars["high"] = bars["close"] + 0.01
    got = compute_alpha158(bars, ["RSQR5", "CORR5", "BETA5"])
    ref = reference_symbol(bars, 5)
    for name in ("RSQR5", "CORR5", "BETA5"):
        assert_close(got[name].to_numpy(), ref[name[:-1]].to_numpy(), name)
    assert got[["RSQR5", "CORR5"]].isna().all().all()
    assert (got["BETA5"].iloc[1:] > 0).all()  # the slope itself is not masked


def test_output_keeps_row_order_and_symbols_independent(bars: pd.DataFrame) -> None:
    names = ["KMID", "MA10", "QTLU20", "RANK5", "IMAX10", "CORD10", "SUMP5", "WVMA30"]
    shuffled = bars.sample(frac=1.0, random_state=1)
    full = compute_alpha158(bars, names)
    got = compute_alpha158(shuffled, names)
    assert got.index.equals(shuffled.index)
    pd.testing.assert_frame_equal(got.sort_index(), full)
    alone = compute_alpha158(bars[bars["symbol"] == "S2"], names)
    pd.testing.assert_frame_equal(alone, full[full["symbol"] == "S2"])


def test_no_look_ahead(bars: pd.DataFrame, factors: pd.DataFrame) -> None:
    dates = np.sort(bars["date"].unique())
    for cut in (dates[7], dates[40], dates[-5]):
        keep = bars["date"] <= cut
        truncated = compute_alpha158(bars[keep], ALPHA158_NAMES)
        pd.testing.assert_frame_equal(truncated, factors[keep.to_numpy()])


def test_insufficient_history_is_nan_and_outputs_are_float32(factors: pd.DataFrame) -> None:
    first = factors.groupby("symbol").head(1)
    assert first["ROC5"].isna().all() and first["STD5"].isna().all()
    assert (first["MA60"] == 1.0).all()  # a partial window, as Qlib's min_periods=1 gives
    assert (factors.dtypes[ALPHA158_NAMES] == np.float32).all()
    assert not np.isinf(factors[ALPHA158_NAMES].to_numpy()).any()


def test_zero_volume_gives_nan_not_inf() -> None:
    bars = random_bars(n_symbols=2, n_days=30, ragged=False)
    bars.loc[[5, 6, 12], "volume"] = 0.0
    out = compute_alpha158(bars, select_factors(["CORD", "VMA", "VSUMP", "WVMA"], [5]))
    values = out.iloc[:, 2:].to_numpy()
    assert not np.isinf(values).any()
    assert np.isfinite(values[20:30]).all()  # the other symbol is untouched


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.drop(columns="volume"), "volume"),
        (lambda b: b.assign(close=b["close"].where(b.index != 3, -1.0)), "close"),
        (lambda b: b.assign(high=b["high"].where(b.index != 3, np.nan)), "high"),
        (lambda b: pd.concat([b, b.iloc[[4]]], ignore_index=True), "duplicate"),
        (lambda b: b.assign(date=b["date"].astype(str)), "date"),
        (lambda b: b.iloc[:0], "no rows"),
    ],
)
def test_bad_bars_are_named(mutate: Callable, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_alpha158(mutate(random_bars(n_symbols=2, n_days=10)), ["KMID"])


# ----------------------------------------------------------------------------------------------
# Labels


def test_forward_return_matches_shifted_close() -> None:
    bars = random_bars(n_symbols=3, n_days=20)
    for horizon in (1, 3):
        got = compute_labels(bars, LabelSection(horizon=horizon))
        close = bars.groupby("symbol")["close"]
        expected = close.shift(-1 - horizon) / close.shift(-1) - 1
        assert_close(got["fwd_return"].to_numpy(), expected.to_numpy(), f"h={horizon}")
        tail = got.groupby("symbol").tail(horizon + 1)
        assert (tail["label"] == -1).all() and tail["fwd_return"].isna().all()
        assert (got.drop(tail.index)["label"] >= 0).all()


def test_quantile_classes_follow_edges_per_day() -> None:
    bars = random_bars(n_symbols=50, n_days=12, ragged=False, seed=3)
    got = compute_labels(bars, LabelSection())
    known = got[got["label"] >= 0]
    counts = known.groupby("date")["label"].value_counts().unstack().fillna(0)
    assert (counts[[0, 1, 2, 3]].to_numpy() == [15, 15, 15, 5]).all()  # 0.3 / 0.3 / 0.3 / 0.1
    by_class = known.groupby(["date", "label"])["fwd_return"].agg(["min", "max"]).unstack()
    for k in range(3):
        assert (by_class[("max", k)] < by_class[("min", k + 1)]).all()  # ordered classes


def test_threshold_classes() -> None:
    bars = random_bars(n_symbols=5, n_days=40)
    got = compute_labels(bars, LabelSection(mode="threshold", thresholds=(-0.01, 0.0, 0.02)))
    known = got[got["label"] >= 0]
    r = known["fwd_return"].astype(np.float64)
    expected = np.select([r <= -0.01, r <= 0.0, r <= 0.02], [0, 1, 2], 3)
    np.testing.assert_array_equal(known["label"].to_numpy(), expected)
    assert known["label"].dtype == np.int8


# ----------------------------------------------------------------------------------------------
# Splits


def _calendar(n: int = 100) -> pd.Series:
    return pd.Series(np.repeat(pd.bdate_range("2022-01-03", periods=n).to_numpy(), 3))


def test_splits_have_purge_gap_and_no_overlap() -> None:
    dates = _calendar()
    for horizon in (1, 5):
        codes, bounds = assign_splits(dates, SplitSection(), horizon)
        by_day = pd.Series(codes, index=dates).groupby(level=0).agg(["min", "max"])
        assert (by_day["min"] == by_day["max"]).all()  # a day belongs to one split
        day_code = by_day["min"].to_numpy()
        assert (np.diff(day_code[day_code >= 0]) >= 0).all()  # train < valid < test in time
        runs = [(k, len(list(g))) for k, g in itertools.groupby(day_code)]
        assert [k for k, _ in runs] == [0, -1, 1, -1, 2]
        assert runs[1][1] == runs[3][1] == horizon + 1  # default purge = horizon + 1
        train_last = np.flatnonzero(day_code == 0)[-1]
        valid_first = np.flatnonzero(day_code == 1)[0]
        assert train_last + 1 + horizon < valid_first  # the last train label ends before valid
        assert bounds["train"][0] == "2022-01-03" and set(bounds) == {"train", "valid", "test"}


def test_explicit_end_dates_win_over_fractions() -> None:
    dates = _calendar()
    splits = SplitSection(train_end="2022-02-15", valid_end="2022-03-31", purge_days=3)
    codes, bounds = assign_splits(dates, splits, horizon=2)
    assert bounds["train"][1] == "2022-02-15"
    assert bounds["valid"] == ["2022-02-21", "2022-03-31"]  # 3 trading days purged
    assert (codes[dates > pd.Timestamp("2022-03-31")] != 1).all()


def test_test_end_leaves_later_days_in_no_split() -> None:
    """An earlier test period on data that goes on: days after test_end are unused."""
    dates = _calendar()
    splits = SplitSection(train_end="2022-02-15", valid_end="2022-03-31", test_end="2022-04-29")
    codes, bounds = assign_splits(dates, splits, horizon=1)
    assert bounds["test"] == ["2022-04-05", "2022-04-29"]
    later = (dates > pd.Timestamp("2022-04-29")).to_numpy()
    assert later.any() and (codes[later] == -1).all()
    with pytest.raises(ValueError, match="test_end"):
        SplitSection(valid_end="2022-03-31", test_end="2022-03-01")


def test_purge_shorter_than_horizon_is_an_error() -> None:
    with pytest.raises(ValueError, match="purge_days"):
        assign_splits(_calendar(), SplitSection(purge_days=1), horizon=3)
    with pytest.raises(ValueError, match=r"features\.splits\.purge_days"):
        FeaturesSection(label=LabelSection(horizon=3), splits=SplitSection(purge_days=2))


def test_splits_that_leave_a_split_empty_are_named() -> None:
    with pytest.raises(ValueError, match="no test dates"):
        assign_splits(_calendar(20), SplitSection(train_fraction=0.6, valid_fraction=0.3), 1)
    with pytest.raises(ValueError, match="train_fraction"):
        SplitSection(train_fraction=0.8, valid_fraction=0.3)


# ----------------------------------------------------------------------------------------------
# Normalisation


def _raw_table(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "a": rng.standard_t(3, n).astype(np.float32),
            "b": (rng.normal(size=n) * 10 + 5).astype(np.float32),
            "flat": np.where(np.arange(n) % 7 == 0, 2.0, 1.0).astype(np.float32),  # MAD = 0
        }
    )


def test_normalizer_stats_come_from_train_rows_only() -> None:
    raw = _raw_table()
    train = np.arange(len(raw)) < 120
    stats = fit_normalizer(raw, ["a", "b"], train, clip=3.0)
    b = raw["b"].to_numpy(np.float64)[:120]
    assert stats["median"]["b"] == pytest.approx(np.median(b))
    mad = np.median(np.abs(b - np.median(b)))
    assert stats["scale"]["b"] == pytest.approx(1.4826 * mad)
    changed = raw.copy()
    changed.loc[150:, ["a", "b"]] = 1e6  # a test-period shock
    assert fit_normalizer(changed, ["a", "b"], train, clip=3.0) == stats
    changed.loc[10, "b"] = 1e6  # a train-period change does move the stats
    assert fit_normalizer(changed, ["a", "b"], train, clip=3.0) != stats


def test_normalizer_output_is_clipped_finite_float32() -> None:
    raw = _raw_table()
    raw.loc[3, "a"] = np.nan
    stats = fit_normalizer(raw, ["a", "b", "flat"], np.ones(len(raw), bool), clip=2.5)
    out = apply_normalizer(raw, ["a", "b", "flat"], stats)
    values = out[["a", "b", "flat"]].to_numpy()
    assert values.dtype == np.float32 and np.isfinite(values).all()
    assert values.min() >= -2.5 and values.max() <= 2.5
    assert out.loc[3, "a"] == 0.0  # NaN -> 0 (the median)
    assert stats["scale"]["flat"] > 0 and np.unique(values[:, 2]).size == 2  # zero MAD survives


def test_normalizer_names_missing_feature() -> None:
    raw = _raw_table()
    stats = fit_normalizer(raw, ["a"], np.ones(len(raw), bool))
    with pytest.raises(ValueError, match="'b'"):
        apply_normalizer(raw, ["a", "b"], stats)


# ----------------------------------------------------------------------------------------------
# The feature table


@pytest.fixture(scope="module")
def table() -> FeatureTable:
    cfg = FeaturesSection(factors=["KMID", "MA", "STD", "RANK", "CORR"], windows=[5, 10])
    return build_feature_table(random_bars(n_symbols=6, n_days=120).sample(frac=1.0), cfg)


def test_build_feature_table_contract(table: FeatureTable) -> None:
    frame = table.frame
    expected = ["symbol", "date", *table.feature_names, "label", "fwd_return", "split"]
    assert list(frame.columns) == expected
    assert frame.equals(frame.sort_values(["symbol", "date"], ignore_index=True))
    assert (frame.dtypes[table.feature_names] == np.float32).all()
    assert not frame[table.feature_names].isna().any().any()
    assert (frame["label"].dtype, frame["split"].dtype) == (np.int8, np.int8)
    assert set(np.unique(frame["split"])) == {-1, 0, 1, 2}
    train_dates = frame.loc[frame["split"] == 0, "date"]
    assert table.split_dates["train"][1] == train_dates.max().date().isoformat()


def test_feature_table_round_trips(tmp_path, table: FeatureTable) -> None:
    out = save_feature_table(table, tmp_path / "features")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["_COMPLETE.json", "features.json", "features.parquet"]  # checksums last
    back = load_feature_table(out)
    pd.testing.assert_frame_equal(back.frame, table.frame)
    assert back.feature_names == table.feature_names
    assert back.stats == json.loads(json.dumps(table.stats))
    assert back.split_dates == table.split_dates


def test_load_names_missing_file_and_column(tmp_path, table: FeatureTable) -> None:
    with pytest.raises(FileNotFoundError, match=r"features\.json"):
        load_feature_table(tmp_path / "nowhere")
    out = save_feature_table(table, tmp_path / "t")
    table.frame.drop(columns="MA5").to_parquet(out / "features.parquet", index=False)
    with pytest.raises(ValueError, match="MA5"):
        load_feature_table(out)


def test_failed_save_leaves_nothing(tmp_path, table: FeatureTable) -> None:
    broken = FeatureTable(table.frame, table.feature_names, {"clip": object()}, table.split_dates)
    with pytest.raises(TypeError):
        save_feature_table(broken, tmp_path / "features")
    assert list(tmp_path.iterdir()) == []


def test_features_stage_builds_once_from_the_ingested_market(tmp_path) -> None:
    from alphaloom.tasks.data.features import features_task, run_features_stage
    from alphaloom.tasks.data.ingest import run_ingest_stage

    cfg = load_config(
        CONFIGS / "smoke.yaml", [f"work_dir={tmp_path}", "data.synthetic.n_symbols=12"]
    )
    market = run_ingest_stage(cfg)
    ref = run_features_stage(market, cfg)
    table = load_feature_table(ref.path)
    assert table.feature_names == select_factors(cfg.features.factors, cfg.features.windows)
    assert table.frame["symbol"].nunique() == 12
    stamp = (ref.dir / "features.parquet").stat().st_mtime_ns
    again = features_task.reuse_or_build(market, cfg)  # verified and reused, not rebuilt
    assert again == ref and (ref.dir / "features.parquet").stat().st_mtime_ns == stamp
    changed = run_features_stage(market, cfg.model_copy(update={"features": FeaturesSection()}))
    assert changed.key != ref.key
