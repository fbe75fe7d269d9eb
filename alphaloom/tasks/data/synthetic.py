"""The embedded synthetic market: a reproducible stand-in for real daily bars with known truth.

Why: the pipeline must run end to end without anyone's data, and a benchmark must know the best
score any model could reach on it. So the generator plants a predictable part of the forward
return, returns it as the *oracle*, and everything else is unpredictable noise.

Generative model (symbol i, business day t, industry g = g(i), signal scale s = `signal_scale`)
---------------------------------------------------------------------------------------------
Static draws (stream ``(seed, 0)``; they depend on the symbol/industry/index counts, never on the
number of days): industry g(i) (balanced), market beta b_i ~ U(0.6, 1.4), industry loading
c_i ~ U(0.5, 1.3), idiosyncratic volatility v_i (lognormal, median 1.8 %/day), start price,
base volume, index membership (70 % of symbols are in one of `n_indices` indices, the rest in
none), one or two themes from `THEMES`, and an English description built from the industry name
and the themes. Per industry: a lagged-response coefficient lambda_g (cycling +1, -1, +0.5, -0.5
over industries, then shuffled) and a drift mu_g ~ N(0, 1).

Daily shocks come from their own stream ``(seed, 1, t)``, so day t's draws do not depend on how
many days are generated: generating N + k days reproduces the first N days exactly.

Shocks z are Student-t (5 d.o.f.) scaled to unit variance and clipped symmetrically at +-6 (fat
tails, still exactly mean zero). Each of the market (m), the industries (f_g) and every symbol's
idiosyncratic part (e_i) has a GARCH(1,1) variance
    h[t] = w + a * eps[t-1]^2 + b * h[t-1],  capped at 6.25x its long-run variance,
with long-run volatilities 1.0 % (market), 0.8 % (industry) and v_i. On a volume-spike day
(probability 4 %, see below) the idiosyncratic shock is doubled ("news").

Simple return from close[t-1] to close[t]:
    r[t, i] = A[t-2, i] + b_i m[t] + c_i f_g[t] + e_i[t]      (A[t-2, i] := b_i mu_m for t < 2)
where A[t, i] is the planted conditional mean, known at the close of day t:
    A[t, i] = b_i * mu_m + s * sigma_i * (K_SEQ * SEQ + K_IND * IND + K_THEME * THEME)
    sigma_i = long-run total volatility of symbol i
    SEQ     = -z5 * (spike - 0.085)           (t >= 19, else 0)
              z5    = clip((close[t]/close[t-5] - 1) / (sigma_i sqrt 5), -3, 3)
              spike = clip(log(mean volume of days t-4..t / mean volume of days t-19..t), 0, 1.5)
              -> a 5-day reversal after a volume spike and a mild continuation without one;
              the two cancel in a ranking by the 5-day return alone (naive reversal IC ~0),
              so only a model that reads 20 days of volume and interacts it with returns finds it
    IND     = lambda_g * clip(F20_g / (0.008 sqrt 20), -3, 3) + mu_g   (t >= 19, else mu_g)
              F20_g = the industry factor's summed return over days t-19..t
              -> an industry-dependent drift and lagged response to the industry's move
    THEME   = sum of the `THEMES` drifts of the symbol's themes (words in its description)
Because every shock after day t is symmetric with mean zero, A[t, i] is *exactly*
E[close[t+2]/close[t+1] - 1 | information at t]: the oracle. K_* are tuned so the oracle's mean
daily Rank IC against the realised forward return is about 0.15 at s = 1 (0 at s = 0).

Bars: open[t] = close[t-1] * exp(0.4 log(1 + r) + 0.25 v_i n), high/low extend max/min(open,
close) by half-normal multiples of v_i / 2, so low <= min(open, close) <= max(open, close) <= high.
log volume = base_i + AR(1) state + 0.35 |shock| / sigma_i + spike, where a spike (prob. 4 %/day)
adds U(0.7, 1.6); amount = volume * (high + low + close) / 3.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from alphaloom.tasks.common.config import SyntheticSection
from alphaloom.tasks.common.storage import atomic_file

logger = logging.getLogger(__name__)

# Theme phrase -> drift sign carried into the oracle. Neutral themes make the text informative
# only through the words that matter, not through "has a theme at all".
THEMES: dict[str, float] = {
    "artificial intelligence": 1.0,
    "renewable energy": 1.0,
    "cloud software": 0.5,
    "coal mining": -1.0,
    "print newspapers": -1.0,
    "shopping malls": -0.5,
    "logistics": 0.0,
    "consumer credit": 0.0,
    "medical devices": 0.0,
    "luxury goods": 0.0,
    "water infrastructure": 0.0,
    "video games": 0.0,
}

INDUSTRIES: tuple[str, ...] = (
    "banking",
    "semiconductors",
    "biotechnology",
    "retail",
    "utilities",
    "oil and gas",
    "telecommunications",
    "insurance",
    "automotive",
    "real estate",
    "aerospace",
    "media",
)

_NAME_HEADS = ("North", "Blue", "Silver", "Iron", "Bright", "Stone", "Red", "Oak", "Clear", "High")
_NAME_TAILS = ("wind", "peak", "field", "gate", "bridge", "river", "haven", "crest", "port")
_NAME_KINDS = ("Holdings", "Group", "Corporation", "Industries", "Partners", "Inc.")
_CITIES = ("Boston", "Austin", "Denver", "Chicago", "Seattle", "Atlanta", "Toronto", "Dublin")

# Signal weights (per unit of a symbol's daily volatility), tuned for oracle Rank IC ~0.15.
K_SEQ = 0.64
K_IND = 0.053
K_THEME = 0.075
MARKET_DRIFT = 0.0003

_T_DOF = 5.0
_CLIP_Z = 6.0
_VOL_MARKET = 0.010
_VOL_INDUSTRY = 0.008
_GARCH_A = 0.08
_GARCH_B = 0.90
_VAR_CAP = 6.25
_SPIKE_PROB = 0.04
_LOOKBACK = 20
# Continuation weight on calm days, chosen so a linear fit on the 5-day return alone finds ~0.
_CALM_MOMENTUM = 0.085


@dataclass
class SyntheticMarket:
    """Bars, instruments and the oracle expected forward return of one generated market."""

    bars: pd.DataFrame
    instruments: pd.DataFrame
    oracle: pd.DataFrame


@dataclass
class _Static:
    """Per-symbol and per-industry draws that never depend on the number of days."""

    industry: np.ndarray
    beta: np.ndarray
    loading: np.ndarray
    vol_idio: np.ndarray
    vol_total: np.ndarray
    price0: np.ndarray
    log_volume0: np.ndarray
    theme_score: np.ndarray
    lam: np.ndarray
    mu_ind: np.ndarray
    instruments: pd.DataFrame


def _industry_names(n: int) -> list[str]:
    """Readable industry names; beyond the built-in list they are numbered."""
    return [INDUSTRIES[k] if k < len(INDUSTRIES) else f"industry {k + 1}" for k in range(n)]


def _description(rng: np.random.Generator, industry: str, themes: list[str]) -> str:
    """One English description naming the industry and the themes (the text signal)."""
    name = f"{rng.choice(_NAME_HEADS)}{rng.choice(_NAME_TAILS)} {rng.choice(_NAME_KINDS)}"
    focus = themes[0] if len(themes) == 1 else f"{themes[0]} and {themes[1]}"
    template = int(rng.integers(3))
    article = "an" if industry[0] in "aeiou" else "a"
    if template == 0:
        first = f"{name} is {article} {industry} company focused on {focus}."
    elif template == 1:
        first = f"{name} operates in {industry}, with growing exposure to {focus}."
    else:
        first = f"{name}, {article} {industry} firm, invests heavily in {focus}."
    city = rng.choice(_CITIES)
    staff = int(rng.integers(2, 90)) * 500
    return f"{first} It is headquartered in {city} and employs about {staff} people."


def _static_draws(cfg: SyntheticSection) -> _Static:
    """Draw everything that is fixed per symbol or industry from the (seed, 0) stream."""
    rng = np.random.default_rng([cfg.seed, 0])
    n, g = cfg.n_symbols, cfg.n_industries
    industry = rng.permutation(np.arange(n) % g)
    beta = rng.uniform(0.6, 1.4, n)
    loading = rng.uniform(0.5, 1.3, n)
    vol_idio = np.clip(np.exp(rng.normal(np.log(0.018), 0.3, n)), 0.008, 0.04)
    vol_total = np.sqrt((beta * _VOL_MARKET) ** 2 + (loading * _VOL_INDUSTRY) ** 2 + vol_idio**2)
    price0 = np.exp(rng.normal(np.log(30.0), 0.8, n))
    log_volume0 = rng.normal(np.log(1e6), 0.8, n)
    lam = rng.permutation(np.resize(np.array([1.0, -1.0, 0.5, -0.5]), g))
    mu_ind = rng.normal(0.0, 1.0, g)

    theme_names = list(THEMES)
    names = _industry_names(g)
    in_index = rng.random(n) < 0.7
    index_pick = rng.integers(0, max(cfg.n_indices, 1), n)
    rows, theme_score = [], np.zeros(n)
    for i in range(n):
        k = 1 + int(rng.random() < 0.5)
        themes = [theme_names[j] for j in rng.choice(len(theme_names), k, replace=False)]
        theme_score[i] = sum(THEMES[t] for t in themes)
        index = f"IDX{index_pick[i] + 1}" if cfg.n_indices > 0 and in_index[i] else ""
        rows.append(
            {
                "symbol": f"S{i:04d}",
                "industry": names[industry[i]],
                "index": index,
                "description": _description(rng, names[industry[i]], themes),
            }
        )
    instruments = pd.DataFrame(rows, columns=["symbol", "industry", "index", "description"])
    return _Static(
        industry, beta, loading, vol_idio, vol_total, price0, log_volume0, theme_score, lam,
        mu_ind, instruments.astype(str),
    )  # fmt: skip


def _t_shocks(rng: np.random.Generator, size: int) -> np.ndarray:
    """Unit-variance Student-t shocks clipped symmetrically (fat tails, exact zero mean)."""
    z = rng.standard_t(_T_DOF, size) / np.sqrt(_T_DOF / (_T_DOF - 2.0))
    return np.clip(z, -_CLIP_Z, _CLIP_Z)


def _garch_next(var: np.ndarray, eps: np.ndarray, long_run: np.ndarray | float) -> np.ndarray:
    """One GARCH(1,1) variance step, capped so a run of shocks cannot explode prices."""
    lr = np.asarray(long_run) ** 2
    nxt = lr * (1.0 - _GARCH_A - _GARCH_B) + _GARCH_A * eps**2 + _GARCH_B * var
    return np.minimum(nxt, _VAR_CAP * lr)


def _simulate(cfg: SyntheticSection, st: _Static, n_days: int) -> dict[str, np.ndarray]:
    """Run the day loop (vectorised over symbols); returns [day, symbol] arrays."""
    n, g = cfg.n_symbols, cfg.n_industries
    shape = (n_days, n)
    close = np.empty(shape)
    open_ = np.empty(shape)
    high = np.empty(shape)
    low = np.empty(shape)
    volume = np.empty(shape)
    expected = np.empty(shape)
    ind_ret = np.zeros((n_days, g))

    var_m = np.array(_VOL_MARKET**2)
    var_f = np.full(g, _VOL_INDUSTRY**2)
    var_i = st.vol_idio**2
    vol_state = np.zeros(n)
    prev_close = st.price0
    drift = st.beta * MARKET_DRIFT
    theme_part = K_THEME * st.theme_score

    for t in range(n_days):
        rng = np.random.default_rng([cfg.seed, 1, t])
        z_m = _t_shocks(rng, 1)[0]
        z_f = _t_shocks(rng, g)
        z_i = _t_shocks(rng, n)
        spike = rng.random(n) < _SPIKE_PROB
        spike_size = rng.uniform(0.7, 1.6, n)
        vol_noise = rng.normal(0.0, 1.0, n)
        open_noise = rng.normal(0.0, 1.0, n)
        hl_noise = np.abs(rng.normal(0.0, 1.0, (2, n)))

        eps_m = np.sqrt(var_m) * z_m
        eps_f = np.sqrt(var_f) * z_f
        eps_i = np.sqrt(var_i) * z_i * np.where(spike, 2.0, 1.0)
        shock = st.beta * eps_m + st.loading * eps_f[st.industry] + eps_i
        mean = expected[t - 2] if t >= 2 else drift
        ret = mean + shock
        ind_ret[t] = eps_f

        close[t] = prev_close * (1.0 + ret)
        open_[t] = prev_close * np.exp(0.4 * np.log1p(ret) + 0.25 * st.vol_idio * open_noise)
        top = np.maximum(open_[t], close[t])
        bottom = np.minimum(open_[t], close[t])
        high[t] = top * np.exp(0.5 * st.vol_idio * hl_noise[0])
        low[t] = bottom * np.exp(-0.5 * st.vol_idio * hl_noise[1])
        vol_state = 0.7 * vol_state + 0.25 * vol_noise
        log_v = st.log_volume0 + vol_state + 0.35 * np.abs(shock) / st.vol_total
        volume[t] = np.maximum(np.round(np.exp(log_v + np.where(spike, spike_size, 0.0))), 100.0)

        expected[t] = drift + cfg.signal_scale * st.vol_total * (
            _sequence_signal(close, volume, st.vol_total, t)
            + _industry_signal(ind_ret, st, t)
            + theme_part
        )
        var_m = _garch_next(var_m, eps_m, _VOL_MARKET)
        var_f = _garch_next(var_f, eps_f, _VOL_INDUSTRY)
        var_i = _garch_next(var_i, eps_i, st.vol_idio)
        prev_close = close[t]
    amount = volume * (high + low + close) / 3.0
    return {
        "open": open_, "high": high, "low": low, "close": close, "volume": volume,
        "amount": amount, "expected": expected,
    }  # fmt: skip


def _sequence_signal(
    close: np.ndarray, volume: np.ndarray, vol_total: np.ndarray, t: int
) -> np.ndarray:
    """K_SEQ * SEQ at day t: 5-day reversal after a volume spike, mild continuation without."""
    if t < _LOOKBACK - 1:
        return np.zeros(close.shape[1])
    z5 = np.clip((close[t] / close[t - 5] - 1.0) / (vol_total * np.sqrt(5.0)), -3.0, 3.0)
    recent = volume[t - 4 : t + 1].mean(axis=0)
    month = volume[t - _LOOKBACK + 1 : t + 1].mean(axis=0)
    spike = np.clip(np.log(recent / month), 0.0, 1.5)
    return -K_SEQ * z5 * (spike - _CALM_MOMENTUM)


def _industry_signal(ind_ret: np.ndarray, st: _Static, t: int) -> np.ndarray:
    """K_IND * IND at day t: industry drift plus lagged response to the industry's 20-day move."""
    if t < _LOOKBACK - 1:
        return K_IND * st.mu_ind[st.industry]
    move = ind_ret[t - _LOOKBACK + 1 : t + 1].sum(axis=0) / (_VOL_INDUSTRY * np.sqrt(_LOOKBACK))
    per_industry = st.lam * np.clip(move, -3.0, 3.0) + st.mu_ind
    return K_IND * per_industry[st.industry]


def _long_frame(symbols: pd.Series, dates: pd.DatetimeIndex, cols: dict) -> pd.DataFrame:
    """[day, symbol] arrays -> a long frame sorted by (symbol, date) with a RangeIndex."""
    n_days, n = len(dates), len(symbols)
    frame = {
        "symbol": np.repeat(symbols.to_numpy(dtype=object), n_days),
        "date": np.tile(dates.to_numpy(dtype="datetime64[ns]"), n),
    }
    frame.update({name: arr.T.reshape(-1) for name, arr in cols.items()})
    out = pd.DataFrame(frame)
    out["symbol"] = out["symbol"].astype(str)
    return out


def generate_market(cfg: SyntheticSection, n_days: int | None = None) -> SyntheticMarket:
    """Generate the market described in the module docstring (deterministic in `cfg.seed`).

    `n_days` overrides `cfg.n_days` (used by `extend_market`); the first days never change.
    """
    n_days = cfg.n_days if n_days is None else n_days
    if n_days < 1:
        raise ValueError(f"synthetic market needs at least 1 day, got n_days={n_days}")
    st = _static_draws(cfg)
    arrays = _simulate(cfg, st, n_days)
    dates = pd.bdate_range(pd.Timestamp(cfg.start_date), periods=n_days)
    symbols = st.instruments["symbol"]
    bar_cols = ("open", "high", "low", "close", "volume", "amount")
    bars = _long_frame(symbols, dates, {c: arrays[c] for c in bar_cols})
    oracle = _long_frame(symbols, dates, {"expected_return": arrays["expected"]})
    return SyntheticMarket(bars=bars, instruments=st.instruments.copy(), oracle=oracle)


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    frame.to_parquet(path, index=False)


def write_market(market: SyntheticMarket, out_dir: str | Path, cfg: SyntheticSection) -> Path:
    """Write bars.parquet, instruments.csv, oracle.parquet and synthetic.json into `out_dir`.

    Every file is fully written to a temporary sibling first and the renames happen together at
    the end (synthetic.json last, so its presence marks a complete market); on any error nothing
    is replaced. Other files already in `out_dir` are left alone.
    """
    out = Path(out_dir)
    n_days = int(market.bars["date"].nunique())
    meta = cfg.model_copy(update={"n_days": n_days}).model_dump(mode="json")
    with contextlib.ExitStack() as stack:
        # ExitStack renames in reverse order of entry: enter synthetic.json first -> renamed last.
        json_tmp = stack.enter_context(atomic_file(out / "synthetic.json"))
        bars_tmp = stack.enter_context(atomic_file(out / "bars.parquet"))
        inst_tmp = stack.enter_context(atomic_file(out / "instruments.csv"))
        oracle_tmp = stack.enter_context(atomic_file(out / "oracle.parquet"))
        _write_parquet(market.bars, bars_tmp)
        market.instruments.to_csv(inst_tmp, index=False)
        _write_parquet(market.oracle, oracle_tmp)
        json_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_synthetic_config(out_dir: str | Path) -> SyntheticSection:
    """The SyntheticSection (with its n_days) that produced the market in `out_dir`."""
    path = Path(out_dir) / "synthetic.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {out_dir} was not written by write_market")
    return SyntheticSection.model_validate_json(path.read_text())


def extend_market(out_dir: str | Path, extra_days: int) -> SyntheticMarket:
    """Append `extra_days` business days to the market in `out_dir` and rewrite it atomically.

    The regenerated prefix is compared with the stored closes: a mismatch means the generator
    code changed, which would silently rewrite history, so it is logged as a warning.
    """
    if extra_days < 0:
        raise ValueError(f"extra_days must be >= 0, got {extra_days}")
    cfg = read_synthetic_config(out_dir)
    market = generate_market(cfg, n_days=cfg.n_days + extra_days)
    _warn_if_history_changed(Path(out_dir) / "bars.parquet", market.bars)
    write_market(market, out_dir, cfg)
    return market


def _warn_if_history_changed(old_path: Path, new_bars: pd.DataFrame) -> None:
    """Log a warning when the stored closes are not a prefix of the regenerated ones."""
    if not old_path.is_file():
        return
    old = pd.read_parquet(old_path, columns=["symbol", "date", "close"])
    merged = old.merge(new_bars[["symbol", "date", "close"]], on=["symbol", "date"], how="left")
    changed = int((merged["close_x"] != merged["close_y"]).sum())
    if changed:
        logger.warning(
            "%s: %d of %d stored closes differ from the regenerated market "
            "(generator code changed?); history is rewritten",
            old_path, changed, len(old),
        )  # fmt: skip
