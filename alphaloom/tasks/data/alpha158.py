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

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from alphaloom.tasks.data.factor_names import parse_name
from alphaloom.tasks.data.rolling import (
    EPS,
    FLAT_STD,
    PANEL_CELLS,
    Panels,
    finite,
    symbol_layout,
    window_correlation,
    window_extreme,
    window_moments,
    window_quantiles,
    window_rank,
    window_sums,
)

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
        vol = finite(np.log(volume / p.previous("volume") + 1.0))
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
        return finite(amount / volume)


def _needed(names: Sequence[str]) -> Needed:
    need: Needed = {}
    for name in names:
        family, window = parse_name(name)
        if window is not None:
            need.setdefault(family, []).append(window)
    return {family: sorted(set(ws)) for family, ws in need.items()}


def _symbol_chunk(n_pos: int) -> int:
    """Symbols per panel, so that the dozen [T, S] arrays a kernel touches stay in cache."""
    return max(1, PANEL_CELLS // max(1, n_pos))


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
