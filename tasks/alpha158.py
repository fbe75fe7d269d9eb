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

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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
    """The OHLCV(+VWAP) panels of one set of bars, plus derived series built on demand."""

    layout: Layout
    raw: dict[str, np.ndarray]  # field -> padded panel
    cache: dict[str, np.ndarray] = field(default_factory=dict)

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

    def count(self, window: int) -> np.ndarray:
        """Bars inside a window ending at each position (partial at the start of a history)."""
        return np.minimum(window, np.arange(1, self.n_pos + 1, dtype=np.float64))[:, None]

    def derived(self, key: str, build: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def previous(self, name: str) -> np.ndarray:
        """The padded panel shifted down one bar, so derived series keep the padded shape."""
        panel = self.raw[name]
        out = np.full_like(panel, np.nan)
        out[1:] = panel[:-1]
        return out

    @property
    def close_change(self) -> np.ndarray:
        return self.derived("dc", lambda: self.raw["close"] - self.previous("close"))

    @property
    def volume_change(self) -> np.ndarray:
        return self.derived("dv", lambda: self.raw["volume"] - self.previous("volume"))


# ----------------------------------------------------------------------------------------------
# Windowed statistics, accumulated over lags and snapshotted at each window length


def _snapshots(windows: Sequence[int]) -> tuple[int, set[int]]:
    """Number of lags to visit and the lags (w - 1) at which a window is complete."""
    return max(windows, default=0), {w - 1 for w in windows}


def window_sums(p: Panels, panel: np.ndarray, windows: Sequence[int]) -> dict[int, tuple]:
    """(count, sum) of the non-missing values in each window, NaN-skipping like pandas."""
    valid = (~np.isnan(panel)).astype(np.float64)
    zero = np.nan_to_num(panel, nan=0.0)
    n = np.zeros((p.n_pos, panel.shape[1]))
    s = np.zeros_like(n)
    out = {}
    n_lags, done = _snapshots(windows)
    for k in range(n_lags):
        n += p.lag(valid, k)
        s += p.lag(zero, k)
        if k in done:
            out[k + 1] = (n.copy(), s.copy())
    return out


def window_moments(
    p: Panels, panel: np.ndarray, windows: Sequence[int], trend: bool = False
) -> dict[int, dict[str, np.ndarray]]:
    """Count, centred sums and (with `trend`) lag-regression sums of each window.

    Values are centred on the current bar (d = x[t-k] - x[t]), so variances and regressions are
    free of cancellation and exactly zero on flat windows. `trend` adds sums over the lag k.
    """
    valid = (~np.isnan(panel)).astype(np.float64)
    zero = np.nan_to_num(panel, nan=0.0)
    ref = p.now(zero)
    shape = ref.shape
    keys = ["n", "s1", "s2"] + (["su", "su2", "sud"] if trend else [])
    acc = {key: np.zeros(shape) for key in keys}
    d = np.empty(shape)
    out = {}
    n_lags, done = _snapshots(windows)
    for k in range(n_lags):
        v = p.lag(valid, k)
        np.multiply(ref, v, out=d)
        np.subtract(p.lag(zero, k), d, out=d)
        acc["n"] += v
        acc["s1"] += d
        if trend and k:
            acc["su"] += k * v
            acc["su2"] += (k * k) * v
            acc["sud"] += k * d
        d *= d
        acc["s2"] += d
        if k in done:
            snap = {key: a.copy() for key, a in acc.items()}
            snap["mean"] = _div(snap["s1"], snap["n"]) + ref  # undo the centring
            snap["std"] = _std(snap["n"], snap["s1"], snap["s2"])
            out[k + 1] = snap
    return out


def window_comoments(
    p: Panels, left: np.ndarray, right: np.ndarray, windows: Sequence[int]
) -> dict[int, np.ndarray]:
    """Pearson correlation of two series over each window (pairs where both are present).

    NaN where either side's window std is within 2e-5 of zero, as Qlib's `Corr` sets it.
    """
    both = ~(np.isnan(left) | np.isnan(right))
    valid = both.astype(np.float64)
    x0 = np.where(both, left, 0.0)
    y0 = np.where(both, right, 0.0)
    rx, ry = p.now(x0), p.now(y0)
    shape = rx.shape
    n, sx, sy, sxx, syy, sxy = (np.zeros(shape) for _ in range(6))
    dx, dy = np.empty(shape), np.empty(shape)
    out = {}
    n_lags, done = _snapshots(windows)
    for k in range(n_lags):
        v = p.lag(valid, k)
        np.subtract(p.lag(x0, k), rx * v, out=dx)
        np.subtract(p.lag(y0, k), ry * v, out=dy)
        n += v
        sx += dx
        sy += dy
        sxx += dx * dx
        syy += dy * dy
        sxy += dx * dy
        if k in done:
            with np.errstate(invalid="ignore", divide="ignore"):
                cov = n * sxy - sx * sy
                vx = n * sxx - sx * sx
                vy = n * syy - sy * sy
                corr = cov / np.sqrt(vx * vy)
            flat = (_std(n, sx, sxx) <= FLAT_STD) | (_std(n, sy, syy) <= FLAT_STD)
            corr[flat | (n < 2)] = np.nan
            out[k + 1] = corr
    return out


def window_extreme(p: Panels, panel: np.ndarray, windows: Sequence[int], kind: str) -> dict:
    """Max (or min) of each window and Qlib's IdxMax (1-based from the window's oldest bar)."""
    sign = 1.0 if kind == "max" else -1.0
    signed = np.where(np.isnan(panel), -np.inf, sign * panel)
    best = p.now(signed).copy()
    best_lag = np.zeros(best.shape)
    out = {}
    n_lags, done = _snapshots(windows)
    for k in range(n_lags):
        if k:
            cand = p.lag(signed, k)
            older = cand >= best  # ties go to the older bar, like np.argmax's first occurrence
            best_lag[older] = k
            np.maximum(best, cand, out=best)
        if k in done:
            n = p.count(k + 1)
            out[k + 1] = (sign * best, n - best_lag)
    return out


def window_rank(p: Panels, panel: np.ndarray, windows: Sequence[int]) -> dict[int, np.ndarray]:
    """Percentile of the current value within each window (average rank of ties, in [0, 1])."""
    cur = p.now(panel)
    less = np.zeros(cur.shape)
    equal = np.zeros(cur.shape)
    out = {}
    n_lags, done = _snapshots(windows)
    for k in range(n_lags):
        lagged = p.lag(panel, k)
        less += lagged < cur
        equal += lagged == cur
        if k in done:
            out[k + 1] = (less + (equal + 1.0) / 2.0) / p.count(k + 1)
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
        n = p.count(window)[start : start + rows][:, :, None]
        for q, out in zip(qs, outs, strict=True):
            idx = q * (n - 1.0)
            lo = np.floor(idx).astype(np.intp)
            hi = np.ceil(idx).astype(np.intp)
            v_lo = np.take_along_axis(block, lo.repeat(n_sym, axis=1), axis=-1)[..., 0]
            v_hi = np.take_along_axis(block, hi.repeat(n_sym, axis=1), axis=-1)[..., 0]
            out[start : start + rows] = v_lo + (v_hi - v_lo) * (idx - lo)[..., 0]
    return outs


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


def _kernel_close_moments(p: Panels, need: Needed) -> Results:
    close = p.raw["close"]
    now = p.now(close)
    windows = sorted({w for f in ("MA", "STD", "BETA", "RSQR", "RESI") for w in need.get(f, [])})
    trend = any(f in need for f in ("BETA", "RSQR", "RESI"))
    for w, m in window_moments(p, close, windows, trend=trend).items():
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
            rsq[~(m["std"] > FLAT_STD)] = np.nan
            yield f"RSQR{w}", rsq
        if w in need.get("RESI", []):
            yield f"RESI{w}", resid / now


def _kernel_extremes(p: Panels, need: Needed) -> Results:
    now = p.now(p.raw["close"])
    fams_hi = ("MAX", "RSV", "IMAX", "IMXD")
    fams_lo = ("MIN", "RSV", "IMIN", "IMXD")
    hi_w = sorted({w for f in fams_hi for w in need.get(f, [])})
    lo_w = sorted({w for f in fams_lo for w in need.get(f, [])})
    highs = window_extreme(p, p.raw["high"], hi_w, "max") if hi_w else {}
    lows = window_extreme(p, p.raw["low"], lo_w, "min") if lo_w else {}
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
    for w in sorted(set(need.get("QTLU", [])) | set(need.get("QTLD", []))):
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
        for w, corr in window_comoments(p, close, np.log(volume + 1.0), need["CORR"]).items():
            yield f"CORR{w}", corr
    if "CORD" in need:
        with np.errstate(invalid="ignore", divide="ignore"):
            ret = close / p.previous("close")
            vol = _finite(np.log(volume / p.previous("volume") + 1.0))
        for w, corr in window_comoments(p, ret, vol, need["CORD"]).items():
            yield f"CORD{w}", corr


def _kernel_counts(p: Panels, need: Needed) -> Results:
    close = p.raw["close"]
    prev = p.previous("close")
    present = ~np.isnan(close)
    up = np.where(present, (close > prev).astype(np.float64), np.nan)  # NaN comparisons: False
    down = np.where(present, (close < prev).astype(np.float64), np.nan)
    windows = sorted({w for f in ("CNTP", "CNTN", "CNTD") for w in need.get(f, [])})
    ups, downs = window_sums(p, up, windows), window_sums(p, down, windows)
    for w in windows:
        n, s_up = ups[w]
        frac_up, frac_down = _div(s_up, n), _div(downs[w][1], n)
        if w in need.get("CNTP", []):
            yield f"CNTP{w}", frac_up
        if w in need.get("CNTN", []):
            yield f"CNTN{w}", frac_down
        if w in need.get("CNTD", []):
            yield f"CNTD{w}", frac_up - frac_down


def _gain_loss(p: Panels, need: Needed, change: np.ndarray, prefix: str) -> Results:
    """SUMP/SUMN/SUMD-style ratios of summed gains and losses to the summed absolute change."""
    fams = [f"{prefix}P", f"{prefix}N", f"{prefix}D"]
    windows = sorted({w for f in fams for w in need.get(f, [])})
    gains = window_sums(p, np.maximum(change, 0.0), windows)
    losses = window_sums(p, np.maximum(-change, 0.0), windows)
    total = window_sums(p, np.abs(change), windows)
    for w in windows:
        n, gain = gains[w]
        loss, absolute = losses[w][1], total[w][1] + EPS
        missing = n == 0  # a window with no change at all (the first bar): pandas gives NaN
        for family, value in zip(fams, (gain, loss, gain - loss), strict=True):
            if w in need.get(family, []):
                ratio = value / absolute
                ratio[missing] = np.nan
                yield f"{family}{w}", ratio


def _kernel_sums(p: Panels, need: Needed) -> Results:
    if any(f in need for f in ("SUMP", "SUMN", "SUMD")):
        yield from _gain_loss(p, need, p.close_change, "SUM")
    if any(f in need for f in ("VSUMP", "VSUMN", "VSUMD")):
        yield from _gain_loss(p, need, p.volume_change, "VSUM")


def _kernel_volume(p: Panels, need: Needed) -> Results:
    volume = p.raw["volume"]
    denom = p.now(volume) + EPS
    windows = sorted({w for f in ("VMA", "VSTD") for w in need.get(f, [])})
    for w, m in window_moments(p, volume, windows).items():
        if w in need.get("VMA", []):
            yield f"VMA{w}", m["mean"] / denom
        if w in need.get("VSTD", []):
            yield f"VSTD{w}", m["std"] / denom
    if "WVMA" in need:
        weighted = np.abs(p.raw["close"] / p.previous("close") - 1.0) * volume
        for w, m in window_moments(p, weighted, need["WVMA"]).items():
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


def validate_bars(bars: pd.DataFrame) -> None:
    """Raise ValueError naming the first column that breaks the canonical bars contract."""
    if not isinstance(bars, pd.DataFrame):
        raise TypeError(f"bars must be a pandas DataFrame, got {type(bars).__name__}")
    missing = [c for c in ("symbol", "date", *PRICE_COLUMNS, "volume") if c not in bars.columns]
    if missing:
        raise ValueError(f"bars: missing column(s) {missing}; got {list(bars.columns)}")
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

    out = np.full((len(names), len(bars)), np.nan, dtype=np.float32)
    column = {name: i for i, name in enumerate(names)}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, values in _row_factors(fields, names):
            out[column[name], layout.order] = values
        panels = Panels(layout, {c: layout.panel(fields[c]) for c in ("close", "high", "low")})
        panels.raw["volume"] = layout.panel(fields["volume"])
        for families, kernel in _KERNELS:
            sub = {f: ws for f, ws in need.items() if f in families}
            if sub:
                for name, grid in kernel(panels, sub):
                    out[column[name], layout.order] = layout.gather(grid)
    out[~np.isfinite(out)] = np.nan

    frame = pd.DataFrame(out.T, columns=names, index=bars.index, copy=False)
    frame.insert(0, "date", bars["date"].astype("datetime64[ns]"))
    frame.insert(0, "symbol", bars["symbol"])
    return frame
