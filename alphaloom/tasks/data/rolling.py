"""Rolling-window statistics on [T, S] symbol panels, vectorised.

Sums, moments, correlation, extremes, ranks and quantiles over each symbol's trailing window.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

EPS = 1e-12  # Qlib's guard in denominators such as ($high-$low+1e-12)


FLAT_STD = 2e-5  # Qlib's np.isclose(std, 0, atol=2e-5) mask for Corr and Rsquare


PANEL_CELLS = 1 << 16  # cells of one [T, S] panel (512 KiB): symbols are processed in chunks


_SORT_CHUNK = 1 << 22  # window elements sorted at a time by the quantile kernel (32 MiB)


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


def finite(values: np.ndarray) -> np.ndarray:
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
