"""Qlib's Alpha158 factors, computed for every symbol at once on a [days x symbols] panel.

The expressions follow Qlib's `Alpha158DL.get_feature_config` and the semantics of its operators
(rolling windows with `min_periods=1`, so short histories give partial-window values; `Std` with
ddof=1; `Corr`/`Rsquare` set to NaN where a rolling std is within 2e-5 of zero; `IdxMax` counted
from the window's oldest bar; ties resolved to the oldest bar). Departures, all deliberate:

* `Rank` is the percentile in [0, 1] (scipy's `percentileofscore(...)/100`); one Qlib version
  divides by the window length instead, which makes the scale depend on the window.
* An infinite intermediate (a ratio over a zero volume) is treated as missing and skipped by the
  window, like a NaN, instead of poisoning it; every NaN/inf output becomes NaN.

Layout: symbol s's i-th bar sits at row `pad + i`, column s, of a NaN-initialised panel, so a
window of the last w rows never reaches another symbol's data (rows above a history are NaN
padding) and each symbol's values depend on its own bars only. Windowed sums are accumulated
over lags 0..w-1 and centred on the current value, which is exact for flat windows (no cumsum
cancellation) and vectorised across all symbols.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

KBAR_NAMES = ["KMID", "KLEN", "KMID2", "KUP", "KUP2", "KLOW", "KLOW2", "KSFT", "KSFT2"]
PRICE_NAMES = ["OPEN0", "HIGH0", "LOW0", "VWAP0"]
ROLLING_FAMILIES = [
    "ROC", "MA", "STD", "BETA", "RSQR", "RESI", "MAX", "MIN", "QTLU", "QTLD", "RANK", "RSV",
    "IMAX", "IMIN", "IMXD", "CORR", "CORD", "CNTP", "CNTN", "CNTD", "SUMP", "SUMN", "SUMD",
    "VMA", "VSTD", "WVMA", "VSUMP", "VSUMN", "VSUMD",
]  # fmt: skip
DEFAULT_WINDOWS = (5, 10, 20, 30, 60)
GROUPS = {"KBAR": KBAR_NAMES, "PRICE": PRICE_NAMES}
EPS = 1e-12  # Qlib's guard in denominators such as ($high-$low+1e-12)
FLAT_STD = 2e-5  # Qlib's np.isclose(std, 0, atol=2e-5) mask for Corr and Rsquare
_NAME = re.compile(r"([A-Z]+)(\d+)")
_PANEL_CELLS = 1 << 16  # cells of one [T, S] panel (512 KiB): symbols are processed in chunks
_SORT_CHUNK = 1 << 22  # window elements sorted at a time by the quantile kernel (32 MiB)


def _check_windows(windows: Sequence[int]) -> list[int]:
    if len(windows) == 0:
        raise ValueError("features.windows must list at least one window")
    for w in windows:
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
            raise ValueError(f"features.windows: every window must be an integer >= 1, got {w!r}")
    return sorted({int(w) for w in windows})


def factor_names(windows: Sequence[int] = DEFAULT_WINDOWS) -> list[str]:
    """All Alpha158 names for these rolling windows, in Qlib's order."""
    windows = _check_windows(windows)
    rolling = [f"{family}{w}" for family in ROLLING_FAMILIES for w in windows]
    return [*KBAR_NAMES, *PRICE_NAMES, *rolling]


ALPHA158_NAMES: list[str] = factor_names(DEFAULT_WINDOWS)


def parse_name(name: str) -> tuple[str, int | None]:
    """(family, window) of a factor name; raises ValueError naming an unknown one."""
    if name in KBAR_NAMES or name in PRICE_NAMES:
        return name, None
    match = _NAME.fullmatch(name)
    if match and match.group(1) in ROLLING_FAMILIES and int(match.group(2)) >= 1:
        return match.group(1), int(match.group(2))
    raise ValueError(
        f"unknown Alpha158 factor {name!r}: expected one of {KBAR_NAMES + PRICE_NAMES} or a "
        f"rolling family {ROLLING_FAMILIES} followed by a window >= 1, e.g. 'ROC5'"
    )


def _canonical_order(name: str) -> tuple[int, int, int]:
    family, window = parse_name(name)
    if window is None:
        fixed = KBAR_NAMES + PRICE_NAMES
        return 0, fixed.index(family), 0
    return 1, ROLLING_FAMILIES.index(family), window


def select_factors(factors: Literal["all"] | list[str], windows: Sequence[int]) -> list[str]:
    """Resolve a factor selection into names in Qlib's order.

    `factors` is "all" or a list whose entries are factor names ("ROC5", "KMID"), rolling family
    names expanded over `windows` ("ROC", "MA"), or the groups "KBAR" and "PRICE". Matching is
    case-insensitive; an unknown entry is a ValueError naming it.
    """
    windows = _check_windows(windows)
    if isinstance(factors, str):
        if factors != "all":
            raise ValueError(f"features.factors must be 'all' or a list of names, got {factors!r}")
        return factor_names(windows)
    chosen: set[str] = set()
    for entry in factors:
        key = str(entry).strip().upper()
        if key in GROUPS:
            chosen.update(GROUPS[key])
        elif key in ROLLING_FAMILIES:
            chosen.update(f"{key}{w}" for w in windows)
        else:
            try:
                parse_name(key)
            except ValueError as err:
                raise ValueError(f"features.factors: {err}") from None
            chosen.add(key)
    if not chosen:
        raise ValueError("features.factors selects no factor")
    return sorted(chosen, key=_canonical_order)


# ----------------------------------------------------------------------------------------------
# Layout: canonical bars -> panels


@dataclass(frozen=True)
class Layout:
    """Where each bar sits in a [pad + T, S] panel; `order` maps panel-sorted rows to input rows."""

    order: np.ndarray  # input row index of each (symbol, date)-sorted row
    pos: np.ndarray  # position of each sorted row within its symbol's history
    col: np.ndarray  # symbol column of each sorted row
    n_pos: int  # T: the longest history
    n_sym: int  # S
    pad: int  # NaN rows above position 0, >= the longest lag any factor needs

    @cached_property
    def flat(self) -> np.ndarray:
        """Flat index of each sorted row in a [T, S] grid (for np.take)."""
        return self.pos * self.n_sym + self.col

    def panel(self, sorted_values: np.ndarray) -> np.ndarray:
        """A per-row series (in sorted order) laid out as a NaN-padded float64 panel."""
        out = np.full((self.pad + self.n_pos, self.n_sym), np.nan)
        out[self.pad + self.pos, self.col] = sorted_values
        return out

    def gather(self, grid: np.ndarray) -> np.ndarray:
        """The per-row values (sorted order) of a [T, S] result grid."""
        return np.take(grid, self.flat)

    def chunks(self, n_symbols: int) -> Iterator[tuple[slice, Layout]]:
        """Sub-layouts of at most `n_symbols` whole symbols, with their slice of sorted rows."""
        bounds = np.searchsorted(self.col, np.arange(0, self.n_sym + n_symbols, n_symbols))
        for first, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            if hi > lo:
                rows = slice(int(lo), int(hi))
                pos, col = self.pos[rows], self.col[rows] - first * n_symbols
                n_sym = min(n_symbols, self.n_sym - first * n_symbols)
                yield rows, Layout(self.order[rows], pos, col, int(pos.max()) + 1, n_sym, self.pad)


def symbol_layout(symbols: pd.Series, dates: pd.Series, pad: int) -> Layout:
    """Sort rows by (symbol, date) and give each its panel cell; duplicate keys are an error."""
    codes, uniques = pd.factorize(symbols, sort=False)
    if (codes < 0).any():
        raise ValueError("bars: column 'symbol' has missing values")
    day = dates.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    order = np.lexsort((day, codes))
    col = codes[order]
    day_sorted = day[order]
    n = len(order)
    same_symbol = np.r_[False, col[1:] == col[:-1]] if n else np.zeros(0, bool)
    dup = same_symbol & np.r_[False, day_sorted[1:] == day_sorted[:-1]] if n else same_symbol
    if dup.any():
        i = order[np.flatnonzero(dup)[0]]
        raise ValueError(
            f"bars: duplicate (symbol, date) key ({symbols.iloc[i]!r}, {dates.iloc[i]})"
        )
    starts = np.flatnonzero(~same_symbol)
    lengths = np.diff(np.r_[starts, n])
    pos = np.arange(n) - np.repeat(starts, lengths)
    n_pos = int(lengths.max()) if n else 0
    return Layout(order, pos, col, n_pos, len(uniques), pad)


def _finite(values: np.ndarray) -> np.ndarray:
    """Infinite intermediates (a ratio over zero) become missing values."""
    return np.where(np.isfinite(values), values, np.nan)


@dataclass
class Panels:
    """The close/high/low/volume panels of one set of bars."""

    layout: Layout
    raw: dict[str, np.ndarray]  # field -> padded panel

    @property
    def pad(self) -> int:
        return self.layout.pad

    @property
    def n_pos(self) -> int:
        return self.layout.n_pos

    def now(self, panel: np.ndarray) -> np.ndarray:
        """The current-row [T, S] view of a padded panel."""
        return panel[self.pad :]

    def lag(self, panel: np.ndarray, k: int) -> np.ndarray:
        """Row t holds the value k bars before t of the same symbol (NaN before its first bar)."""
        return panel[self.pad - k : panel.shape[0] - k]

    def previous(self, name: str) -> np.ndarray:
        """A field's padded panel shifted down one bar (derived series keep the padded shape)."""
        panel = self.raw[name]
        out = np.full_like(panel, np.nan)
        out[1:] = panel[:-1]
        return out

    def count(self, window: int, first: int = 0) -> np.ndarray:
        """[T, 1] number of values in a window ending at each position, for a series that has a
        value at every position >= `first` (partial windows at the start of a history)."""
        have = np.arange(1 - first, self.n_pos + 1 - first, dtype=np.float64)
        return np.clip(have, 0.0, window)[:, None]

    def dense_from(self, panel: np.ndarray) -> int | None:
        """0 or 1 if `panel` has a value at every position >= that in every history, else None.

        Such a series needs no masks: the lag-k values of rows t >= first + k are a row slice.
        Base fields are dense from 0, one-bar changes from 1; a ratio over a zero volume is not.
        """
        cur = self.now(panel)
        present = int(np.count_nonzero(~np.isnan(cur)))
        rows = len(self.layout.pos)
        if present == rows:
            return 0
        if present == rows - self.layout.n_sym and np.isnan(cur[0]).all():
            return 1
        return None


# ----------------------------------------------------------------------------------------------
# Windowed statistics, accumulated over lags 0..w-1 and snapshotted at each window length.
# For a dense series the lag-k term of rows t >= first + k is cur[t - k], a row slice, so a lag
# costs a few whole-array operations and no masking.


def _snapshots(windows: Sequence[int]) -> tuple[int, set[int]]:
    """Number of lags to visit and the lags (w - 1) at which a window is complete."""
    return max(windows, default=0), {w - 1 for w in windows}


def _require_dense(p: Panels, panel: np.ndarray) -> int:
    first = p.dense_from(panel)
    if first is None:
        raise ValueError("internal: this window statistic needs a series without gaps")
    return first


def window_sums(
    p: Panels, panel: np.ndarray, windows: Sequence[int]
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (window, count, sum) of each window of a dense series, shortest window first.

    The arrays are reused as the windows grow: use them before advancing the iterator.
    """
    first = _require_dense(p, panel)
    cur = p.now(panel)
    total = np.where(np.isnan(cur), 0.0, cur)
    n_pos = p.n_pos
    n_lags, done = _snapshots(windows)
    for k in range(n_lags):
        if k and first + k < n_pos:
            total[first + k :] += cur[first : n_pos - k]
        if k in done:
            yield k + 1, p.count(k + 1, first), total


def window_moments(
    p: Panels, panel: np.ndarray, windows: Sequence[int], trend: bool = False
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield count, mean, std and (with `trend`) lag-regression sums of each window of a dense
    series, shortest window first; the sums are reused as windows grow, so use them at once.

    Values are centred on the current bar (d = x[t-k] - x[t]), so variances and regressions are
    free of cancellation and exactly zero on flat windows; `su`, `su2`, `sud` are the sums of the
    lag k, k^2 and k*d for a regression on time.
    """
    first = _require_dense(p, panel)
    cur = p.now(panel)
    n_pos = p.n_pos
    s1, s2 = np.zeros(cur.shape), np.zeros(cur.shape)
    sud = np.zeros(cur.shape) if trend else None
    d, tmp = np.empty(cur.shape), np.empty(cur.shape)
    n_lags, done = _snapshots(windows)
    for k in range(n_lags):
        lo = first + k
        if k and lo < n_pos:
            dk = d[lo:]
            np.subtract(cur[first : n_pos - k], cur[lo:], out=dk)
            s1[lo:] += dk
            if sud is not None:
                np.multiply(dk, float(k), out=tmp[lo:])
                sud[lo:] += tmp[lo:]
            np.multiply(dk, dk, out=dk)
            s2[lo:] += dk
        if k in done:
            n = p.count(k + 1, first)
            snap = {"n": n, "s1": s1, "s2": s2}
            snap["mean"] = cur + _div(snap["s1"], n)  # undo the centring
            snap["std"] = _std(n, snap["s1"], snap["s2"])
            if sud is not None:
                snap["su"] = n * (n - 1.0) / 2.0
                snap["su2"] = (n - 1.0) * n * (2.0 * n - 1.0) / 6.0
                snap["sud"] = sud
            yield k + 1, snap


def _corr_from_sums(n, sx, sy, sxx, syy, sxy) -> np.ndarray:
    """Pearson correlation from centred sums; NaN where either side is flat (Qlib's mask)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (n * sxy - sx * sy) / np.sqrt((n * sxx - sx * sx) * (n * syy - sy * sy))
    flat = (_std(n, sx, sxx) <= FLAT_STD) | (_std(n, sy, syy) <= FLAT_STD)
    return np.where(flat | (n < 2), np.nan, corr)


def window_correlation(
    p: Panels, left: np.ndarray, right: np.ndarray, windows: Sequence[int]
) -> dict[int, np.ndarray]:
    """Pearson correlation of two series over each window, on the pairs where both exist.

    NaN where either side's window std is within 2e-5 of zero, as Qlib's `Corr` sets it.
    """
    both = np.where(np.isnan(right), np.nan, left)
    first_l, first_r = p.dense_from(both), p.dense_from(np.where(np.isnan(left), np.nan, right))
    if first_l is None or first_r is None:
        return _masked_correlation(p, left, right, windows)
    first = max(first_l, first_r)
    x, y = p.now(left), p.now(right)
    n_pos = p.n_pos
    sx, sy, sxx, syy, sxy = (np.zeros(x.shape) for _ in range(5))
    dx, dy, tmp = np.empty(x.shape), np.empty(x.shape), np.empty(x.shape)
    out = {}
    n_lags, done = _snapshots(windows)
    for k in range(n_lags):
        lo = first + k
        if k and lo < n_pos:
            ax, ay, at = dx[lo:], dy[lo:], tmp[lo:]
            np.subtract(x[first : n_pos - k], x[lo:], out=ax)
            np.subtract(y[first : n_pos - k], y[lo:], out=ay)
            sx[lo:] += ax
            sy[lo:] += ay
            np.multiply(ax, ay, out=at)
            sxy[lo:] += at
            np.multiply(ax, ax, out=ax)
            sxx[lo:] += ax
            np.multiply(ay, ay, out=ay)
            syy[lo:] += ay
        if k in done:
            out[k + 1] = _corr_from_sums(p.count(k + 1, first), sx, sy, sxx, syy, sxy)
    return out


def _masked_correlation(
    p: Panels, left: np.ndarray, right: np.ndarray, windows: Sequence[int]
) -> dict[int, np.ndarray]:
    """`window_correlation` for series with gaps (a ratio over a zero volume): masked lags."""
    both = ~(np.isnan(left) | np.isnan(right))
    valid = both.astype(np.float64)
    x0, y0 = np.where(both, left, 0.0), np.where(both, right, 0.0)
    rx, ry = p.now(x0), p.now(y0)
    n, sx, sy, sxx, syy, sxy = (np.zeros(rx.shape) for _ in range(6))
    out = {}
    n_lags, done = _snapshots(windows)
    for k in range(n_lags):
        v = p.lag(valid, k)
        dx = p.lag(x0, k) - rx * v
        dy = p.lag(y0, k) - ry * v
        n += v
        sx += dx
        sy += dy
        sxx += dx * dx
        syy += dy * dy
        sxy += dx * dy
        if k in done:
            out[k + 1] = _corr_from_sums(n, sx, sy, sxx, syy, sxy)
    return out


def window_extreme(p: Panels, panel: np.ndarray, windows: Sequence[int], kind: str) -> dict:
    """Max (or min) of each window of a base field and Qlib's IdxMax (1-based from the oldest)."""
    _require_dense(p, panel)
    sign = 1.0 if kind == "max" else -1.0
    cur = sign * p.now(panel)
    n_pos = p.n_pos
    best = cur.copy()
    best_lag = np.zeros(cur.shape)
    out = {}
    n_lags, done = _snapshots(windows)
    for k in range(n_lags):
        if k and k < n_pos:
            cand, top, lag = cur[: n_pos - k], best[k:], best_lag[k:]
            np.putmask(lag, cand >= top, float(k))  # ties go to the older bar, like np.argmax
            np.maximum(top, cand, out=top)
        if k in done:
            out[k + 1] = (sign * best, p.count(k + 1) - best_lag)
    return out


def window_rank(p: Panels, panel: np.ndarray, windows: Sequence[int]) -> dict[int, np.ndarray]:
    """Percentile of the current value within each window (average rank of ties, in [0, 1])."""
    _require_dense(p, panel)
    cur = p.now(panel)
    n_pos = p.n_pos
    below = np.zeros(cur.shape)
    ties = np.ones(cur.shape)  # the current value itself
    out = {}
    n_lags, done = _snapshots(windows)
    for k in range(n_lags):
        if k and k < n_pos:
            older, now = cur[: n_pos - k], cur[k:]
            below[k:] += older < now
            ties[k:] += older == now
        if k in done:
            out[k + 1] = (below + (ties + 1.0) / 2.0) / p.count(k + 1)
    return out


def window_quantiles(
    p: Panels, panel: np.ndarray, window: int, qs: Sequence[float]
) -> list[np.ndarray]:
    """Linear-interpolated quantiles of each window (pandas' rolling quantile, min_periods=1)."""
    pad, n_pos, n_sym = p.pad, p.n_pos, panel.shape[1]
    windows = sliding_window_view(panel, window, axis=0)[pad - window + 1 :][:n_pos]
    outs = [np.empty((n_pos, n_sym)) for _ in qs]
    rows = max(1, _SORT_CHUNK // max(1, n_sym * window))
    for start in range(0, n_pos, rows):
        block = np.sort(windows[start : start + rows], axis=-1)  # NaN padding sorts last
        n = p.count(window)[start : start + rows, 0]
        for q, out in zip(qs, outs, strict=True):
            out[start : start + rows] = _interpolate(block, q * (n - 1.0))
    return outs


def _interpolate(block: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """block[r, s, idx[r]] with linear interpolation between neighbouring order statistics."""
    out = np.empty(block.shape[:2])
    full = idx == idx.max()  # complete windows share one index: plain slicing
    for rows in (full, ~full):
        if not rows.any():
            continue
        sub, at = block[rows], idx[rows]
        lo, hi = np.floor(at).astype(np.intp), np.ceil(at).astype(np.intp)
        if rows is full:
            v_lo, v_hi = sub[:, :, lo[0]], sub[:, :, hi[0]]
        else:
            pick = np.broadcast_to(lo[:, None, None], (*sub.shape[:2], 1))
            v_lo = np.take_along_axis(sub, pick, axis=-1)[..., 0]
            pick = np.broadcast_to(hi[:, None, None], (*sub.shape[:2], 1))
            v_hi = np.take_along_axis(sub, pick, axis=-1)[..., 0]
        out[rows] = v_lo + (v_hi - v_lo) * (at - lo)[:, None]
    return out


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def _std(n: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """Sample std (ddof=1) from centred sums; NaN below two observations."""
    with np.errstate(invalid="ignore", divide="ignore"):
        var = (s2 - s1 * s1 / n) / (n - 1.0)
    var = np.where(n >= 2, np.maximum(var, 0.0), np.nan)
    return np.sqrt(var)


# ----------------------------------------------------------------------------------------------
# Kernels: each computes the requested names of a few families that share intermediate sums

Needed = dict[str, list[int]]  # family -> windows requested
Results = Iterator[tuple[str, np.ndarray]]


def _windows_of(need: Needed, families: Sequence[str]) -> list[int]:
    return sorted({w for f in families for w in need.get(f, [])})


def _kernel_close_moments(p: Panels, need: Needed) -> Results:
    close = p.raw["close"]
    now = p.now(close)
    trend = any(f in need for f in ("BETA", "RSQR", "RESI"))
    windows = _windows_of(need, ("MA", "STD", "BETA", "RSQR", "RESI"))
    for w, m in window_moments(p, close, windows, trend=trend):
        if w in need.get("MA", []):
            yield f"MA{w}", m["mean"] / now
        if w in need.get("STD", []):
            yield f"STD{w}", m["std"] / now
        if not trend:
            continue
        n = m["n"]
        with np.errstate(invalid="ignore", divide="ignore"):
            sxx = n * m["su2"] - m["su"] ** 2
            sxy = n * m["sud"] - m["su"] * m["s1"]
            syy = n * m["s2"] - m["s1"] ** 2
            slope_lag = np.where(sxx > 0, sxy / sxx, np.nan)  # slope against the lag k
            rsq = sxy * sxy / (sxx * syy)
            resid = (slope_lag * m["su"] - m["s1"]) / n  # current bar minus the fitted line
        if w in need.get("BETA", []):
            yield f"BETA{w}", -slope_lag / now  # time runs opposite to the lag
        if w in need.get("RSQR", []):
            yield f"RSQR{w}", np.where(m["std"] > FLAT_STD, rsq, np.nan)
        if w in need.get("RESI", []):
            yield f"RESI{w}", resid / now


def _kernel_extremes(p: Panels, need: Needed) -> Results:
    now = p.now(p.raw["close"])
    hi_w = _windows_of(need, ("MAX", "RSV", "IMAX", "IMXD"))
    lo_w = _windows_of(need, ("MIN", "RSV", "IMIN", "IMXD"))
    highs = window_extreme(p, p.raw["high"], hi_w, "max")
    lows = window_extreme(p, p.raw["low"], lo_w, "min")
    for w in sorted(set(hi_w) | set(lo_w)):
        if w in need.get("MAX", []):
            yield f"MAX{w}", highs[w][0] / now
        if w in need.get("MIN", []):
            yield f"MIN{w}", lows[w][0] / now
        if w in need.get("RSV", []):
            yield f"RSV{w}", (now - lows[w][0]) / (highs[w][0] - lows[w][0] + EPS)
        if w in need.get("IMAX", []):
            yield f"IMAX{w}", highs[w][1] / w
        if w in need.get("IMIN", []):
            yield f"IMIN{w}", lows[w][1] / w
        if w in need.get("IMXD", []):
            yield f"IMXD{w}", (highs[w][1] - lows[w][1]) / w


def _kernel_roc(p: Panels, need: Needed) -> Results:
    close = p.raw["close"]
    for w in need["ROC"]:
        yield f"ROC{w}", p.lag(close, w) / p.now(close)


def _kernel_quantiles(p: Panels, need: Needed) -> Results:
    close = p.raw["close"]
    now = p.now(close)
    for w in _windows_of(need, ("QTLU", "QTLD")):
        upper, lower = window_quantiles(p, close, w, (0.8, 0.2))
        if w in need.get("QTLU", []):
            yield f"QTLU{w}", upper / now
        if w in need.get("QTLD", []):
            yield f"QTLD{w}", lower / now


def _kernel_rank(p: Panels, need: Needed) -> Results:
    for w, rank in window_rank(p, p.raw["close"], need["RANK"]).items():
        yield f"RANK{w}", rank


def _kernel_corr(p: Panels, need: Needed) -> Results:
    close, volume = p.raw["close"], p.raw["volume"]
    if "CORR" in need:
        for w, corr in window_correlation(p, close, np.log(volume + 1.0), need["CORR"]).items():
            yield f"CORR{w}", corr
    if "CORD" in need:
        ret = close / p.previous("close")
        vol = _finite(np.log(volume / p.previous("volume") + 1.0))
        for w, corr in window_correlation(p, ret, vol, need["CORD"]).items():
            yield f"CORD{w}", corr


def _kernel_counts(p: Panels, need: Needed) -> Results:
    """Qlib's Mean($close>Ref($close,1), d): the first bar compares with NaN, which is False."""
    close = p.raw["close"]
    prev = p.previous("close")
    present = ~np.isnan(close)
    up = np.where(present, (close > prev).astype(np.float64), np.nan)
    down = np.where(present, (close < prev).astype(np.float64), np.nan)
    windows = _windows_of(need, ("CNTP", "CNTN", "CNTD"))
    ups, downs = window_sums(p, up, windows), window_sums(p, down, windows)
    for (w, n, s_up), (_, _, s_down) in zip(ups, downs, strict=True):
        frac_up, frac_down = s_up / n, s_down / n
        if w in need.get("CNTP", []):
            yield f"CNTP{w}", frac_up
        if w in need.get("CNTN", []):
            yield f"CNTN{w}", frac_down
        if w in need.get("CNTD", []):
            yield f"CNTD{w}", frac_up - frac_down


def _gain_loss(p: Panels, need: Needed, change: np.ndarray, prefix: str) -> Results:
    """SUMP/SUMN/SUMD-style ratios of summed gains and losses to the summed absolute change."""
    fams = [f"{prefix}P", f"{prefix}N", f"{prefix}D"]
    windows = _windows_of(need, fams)
    gains = window_sums(p, np.maximum(change, 0.0), windows)
    losses = window_sums(p, np.maximum(-change, 0.0), windows)
    for (w, n, gain), (_, _, loss) in zip(gains, losses, strict=True):
        absolute = np.where(n > 0, gain + loss + EPS, np.nan)  # no change yet: pandas gives NaN
        for family, value in zip(fams, (gain, loss, gain - loss), strict=True):
            if w in need.get(family, []):
                yield f"{family}{w}", value / absolute


def _kernel_sums(p: Panels, need: Needed) -> Results:
    if any(f in need for f in ("SUMP", "SUMN", "SUMD")):
        change = p.raw["close"] - p.previous("close")
        yield from _gain_loss(p, need, change, "SUM")
    if any(f in need for f in ("VSUMP", "VSUMN", "VSUMD")):
        change = p.raw["volume"] - p.previous("volume")
        yield from _gain_loss(p, need, change, "VSUM")


def _kernel_volume(p: Panels, need: Needed) -> Results:
    volume = p.raw["volume"]
    denom = p.now(volume) + EPS
    for w, m in window_moments(p, volume, _windows_of(need, ("VMA", "VSTD"))):
        if w in need.get("VMA", []):
            yield f"VMA{w}", m["mean"] / denom
        if w in need.get("VSTD", []):
            yield f"VSTD{w}", m["std"] / denom
    if "WVMA" in need:
        weighted = np.abs(p.raw["close"] / p.previous("close") - 1.0) * volume
        for w, m in window_moments(p, weighted, need["WVMA"]):
            yield f"WVMA{w}", m["std"] / (m["mean"] + EPS)


_KERNELS: list[tuple[frozenset[str], Callable[[Panels, Needed], Results]]] = [
    (frozenset({"ROC"}), _kernel_roc),
    (frozenset({"MA", "STD", "BETA", "RSQR", "RESI"}), _kernel_close_moments),
    (frozenset({"MAX", "MIN", "RSV", "IMAX", "IMIN", "IMXD"}), _kernel_extremes),
    (frozenset({"QTLU", "QTLD"}), _kernel_quantiles),
    (frozenset({"RANK"}), _kernel_rank),
    (frozenset({"CORR", "CORD"}), _kernel_corr),
    (frozenset({"CNTP", "CNTN", "CNTD"}), _kernel_counts),
    (frozenset({"SUMP", "SUMN", "SUMD", "VSUMP", "VSUMN", "VSUMD"}), _kernel_sums),
    (frozenset({"VMA", "VSTD", "WVMA"}), _kernel_volume),
]


# ----------------------------------------------------------------------------------------------
# Row-wise factors (no window)


def _row_factors(fields: dict[str, np.ndarray], names: Sequence[str]) -> Results:
    o, h, low, c = fields["open"], fields["high"], fields["low"], fields["close"]
    rng = h - low + EPS
    top, bottom = np.maximum(o, c), np.minimum(o, c)
    formulas: dict[str, Callable[[], np.ndarray]] = {
        "KMID": lambda: (c - o) / o,
        "KLEN": lambda: (h - low) / o,
        "KMID2": lambda: (c - o) / rng,
        "KUP": lambda: (h - top) / o,
        "KUP2": lambda: (h - top) / rng,
        "KLOW": lambda: (bottom - low) / o,
        "KLOW2": lambda: (bottom - low) / rng,
        "KSFT": lambda: (2 * c - h - low) / o,
        "KSFT2": lambda: (2 * c - h - low) / rng,
        "OPEN0": lambda: o / c,
        "HIGH0": lambda: h / c,
        "LOW0": lambda: low / c,
        "VWAP0": lambda: fields["vwap"] / c,
    }
    for name in names:
        if name in formulas:
            yield name, formulas[name]()


# ----------------------------------------------------------------------------------------------
# Entry point

PRICE_COLUMNS = ("open", "high", "low", "close")
PANEL_FIELDS = ("close", "high", "low", "volume")


def validate_bars(bars: pd.DataFrame) -> None:
    """Raise ValueError naming the first column that breaks the canonical bars contract."""
    if not isinstance(bars, pd.DataFrame):
        raise TypeError(f"bars must be a pandas DataFrame, got {type(bars).__name__}")
    missing = [c for c in ("symbol", "date", *PRICE_COLUMNS, "volume") if c not in bars.columns]
    if missing:
        raise ValueError(f"bars: missing column(s) {missing}; got {list(bars.columns)}")
    if bars.empty:
        raise ValueError("bars: no rows")
    if not pd.api.types.is_datetime64_any_dtype(bars["date"]):
        raise ValueError(f"bars: column 'date' must be datetime64, got {bars['date'].dtype}")
    if bars["date"].isna().any():
        raise ValueError("bars: column 'date' has missing values")
    for name in (*PRICE_COLUMNS, "volume", *(["amount"] if "amount" in bars else [])):
        if not pd.api.types.is_numeric_dtype(bars[name]):
            raise ValueError(f"bars: column {name!r} must be numeric, got {bars[name].dtype}")
        values = bars[name].to_numpy(dtype=np.float64)
        if name != "amount" and not np.isfinite(values).all():
            raise ValueError(f"bars: column {name!r} has missing or infinite values")
        if name in PRICE_COLUMNS and (values <= 0).any():
            raise ValueError(f"bars: column {name!r} must be positive")
        if name == "volume" and (values < 0).any():
            raise ValueError("bars: column 'volume' must be >= 0")


def _vwap(bars: pd.DataFrame) -> np.ndarray:
    """amount/volume when amount is given (NaN where volume is 0), else the typical price."""
    high, low, close = (bars[c].to_numpy(np.float64) for c in ("high", "low", "close"))
    if "amount" not in bars.columns:
        return (high + low + close) / 3.0
    amount, volume = bars["amount"].to_numpy(np.float64), bars["volume"].to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _finite(amount / volume)


def _needed(names: Sequence[str]) -> Needed:
    need: Needed = {}
    for name in names:
        family, window = parse_name(name)
        if window is not None:
            need.setdefault(family, []).append(window)
    return {family: sorted(set(ws)) for family, ws in need.items()}


def _symbol_chunk(n_pos: int) -> int:
    """Symbols per panel, so that the dozen [T, S] arrays a kernel touches stay in cache."""
    return max(1, _PANEL_CELLS // max(1, n_pos))


def compute_alpha158(bars: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Raw Alpha158 factors of canonical bars: `symbol, date` + one float32 column per name.

    Rows come back in the order of `bars` (which need not be sorted). A pure function of the
    bars given: a symbol's values depend on its own rows only, and a value at date t on rows up to
    t only. Values Qlib leaves NaN or infinite (short history, a zero denominator) are NaN.
    """
    validate_bars(bars)
    names = list(dict.fromkeys(names))
    need = _needed(names)
    pad = max([1] + [w for ws in need.values() for w in ws])
    layout = symbol_layout(bars["symbol"], bars["date"], pad)
    fields = {c: bars[c].to_numpy(np.float64)[layout.order] for c in (*PRICE_COLUMNS, "volume")}
    fields["vwap"] = _vwap(bars)[layout.order]

    out = np.empty((len(names), len(bars)), dtype=np.float32)  # (symbol, date) order
    column = {name: i for i, name in enumerate(names)}
    written: set[str] = set()

    def put(name: str, rows: slice, values: np.ndarray) -> None:
        cell = out[column[name], rows]
        cell[...] = values
        cell[~np.isfinite(cell)] = np.nan  # float32 overflow included
        written.add(name)

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for name, values in _row_factors(fields, names):
            put(name, slice(None), values)
        for rows, part in layout.chunks(_symbol_chunk(layout.n_pos)):
            panels = Panels(part, {c: part.panel(fields[c][rows]) for c in PANEL_FIELDS})
            for families, kernel in _KERNELS:
                sub = {f: ws for f, ws in need.items() if f in families}
                if sub:
                    for name, grid in kernel(panels, sub):
                        put(name, rows, part.gather(grid))
    if written != set(names):
        raise AssertionError(f"internal: no kernel produced {sorted(set(names) - written)}")
    if not np.array_equal(layout.order, np.arange(len(bars))):
        out = out[:, np.argsort(layout.order)]  # back to the order of `bars`

    frame = pd.DataFrame(out.T, columns=names, index=bars.index, copy=False)
    frame.insert(0, "date", bars["date"].astype("datetime64[ns]"))
    frame.insert(0, "symbol", bars["symbol"])
    return frame
