"""Splits hiding in unadjusted prices: detected, reported, and adjusted when asked to.

Why: with only raw prices a 2:1 split is a -50 % day, which every return-based factor and the
label then take at face value. A split is an overnight price ratio close to a clean ratio
(2:1, 3:2, 1:10, ...) with trading volume moving the other way by about the same factor and
staying there. Ordinary news can still imitate one (a halved price on doubled volume), so
detection is reported as a warning and prices are only adjusted with `data.detect_splits: true`.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pandas as pd

from alphaloom.tasks.data.checks import PRICE_COLUMNS

# Clean ratios new shares : old shares. A reverse split (1:10) raises the price.
SPLITS = ((2, 1), (3, 2), (3, 1), (4, 1), (5, 1), (10, 1), (20, 1))
REVERSE_SPLITS = ((1, 2), (1, 3), (1, 4), (1, 5), (1, 8), (1, 10), (1, 20))
CLEAN_RATIOS = tuple(Fraction(a, b) for a, b in (*SPLITS, *REVERSE_SPLITS))
PRICE_TOLERANCE = 0.04  # |overnight ratio / clean ratio - 1| at most this
VOLUME_BEFORE, VOLUME_AFTER = 20, 10  # bars whose median volume is compared around the day

SPLIT_COLUMNS = ("symbol", "date", "ratio", "price_ratio", "volume_ratio")


def _nearest_clean(ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The clean ratio nearest to each observed one (in log space) and the relative miss."""
    clean = np.array([float(r) for r in CLEAN_RATIOS])
    best = np.argmin(np.abs(np.log(ratio)[:, None] - np.log(clean)[None, :]), axis=1)
    return clean[best], np.abs(ratio / clean[best] - 1.0)


def _volume_ratios(volume: np.ndarray, codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Median volume of the day and the next bars over that of the bars before, per row of
    `rows` (positions in symbol-sorted arrays), within the row's own symbol."""
    out = np.full(len(rows), np.nan)
    for k, i in enumerate(rows):
        lo, hi = max(0, i - VOLUME_BEFORE), min(len(volume), i + VOLUME_AFTER)
        before = volume[lo:i][codes[lo:i] == codes[i]]
        after = volume[i:hi][codes[i:hi] == codes[i]]
        if len(before) >= 3 and len(after) >= 3 and np.median(before) > 0:
            out[k] = np.median(after) / np.median(before)
    return out


def detect_splits(bars: pd.DataFrame, symbols: set[str] | None = None) -> pd.DataFrame:
    """Overnight moves of (symbol, date)-sorted canonical bars that look like splits.

    `ratio` is new shares per old share (2.0 for a 2:1 split, 0.1 for 1:10), `price_ratio` the
    previous close over the day's open, `volume_ratio` the median volume of the next bars over
    that of the bars before. Only `symbols` (default: all) are examined.
    """
    frame = bars if symbols is None else bars[bars["symbol"].isin(symbols)]
    if frame.empty:
        return pd.DataFrame(columns=list(SPLIT_COLUMNS))
    sym = frame["symbol"]
    prev_close = frame["close"].groupby(sym).shift(1)
    price_ratio = (prev_close / frame["open"]).to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        candidate = np.isfinite(price_ratio) & (np.abs(np.log(price_ratio)) > np.log(1.4))
    if not candidate.any():
        return pd.DataFrame(columns=list(SPLIT_COLUMNS))
    rows = np.flatnonzero(candidate)
    clean, miss = _nearest_clean(price_ratio[rows])
    codes = pd.factorize(sym)[0]
    volume_ratio = _volume_ratios(frame["volume"].to_numpy(np.float64), codes, rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        strength = np.log(volume_ratio) / np.log(clean)  # 1.0: volume moved by the ratio
    hit = (miss <= PRICE_TOLERANCE) & (strength >= 0.5) & (strength <= 2.0)
    picked = frame.iloc[rows[hit]]
    return pd.DataFrame(
        {
            "symbol": picked["symbol"].to_numpy(),
            "date": picked["date"].to_numpy(),
            "ratio": clean[hit],
            "price_ratio": price_ratio[rows[hit]],
            "volume_ratio": volume_ratio[hit],
        }
    )


def ratio_label(ratio: float) -> str:
    """'2:1', '3:2', '1:10' for a ratio of new shares per old share."""
    frac = Fraction(ratio).limit_denominator(20)
    return f"{frac.numerator}:{frac.denominator}"


def adjust_for_splits(bars: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """Back-adjust (symbol, date)-sorted bars: prices before each split are divided by its ratio
    and volumes multiplied by it, so the history is on today's share basis."""
    if splits.empty:
        return bars
    out = bars.copy()
    factor = np.ones(len(out))
    for split in splits.itertuples(index=False):
        earlier = (out["symbol"].to_numpy() == split.symbol) & (out["date"] < split.date).to_numpy()
        factor[earlier] /= split.ratio
    for col in PRICE_COLUMNS:
        out[col] = out[col].to_numpy() * factor
    out["volume"] = out["volume"].to_numpy() / factor  # amount (currency) is unchanged
    return out
