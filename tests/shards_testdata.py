"""Small hand-built feature tables for the shard and loader tests (no other stage needed).

The tables follow the feature-table contract of tasks/data/features.py: sorted by (symbol, date),
float32 factors, int8 label (-1 unknown) and split (0/1/2, -1 purge), float32 fwd_return.
Some symbols start late and some miss days, so windows need left padding and masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

SPLIT_NAMES = {"train": 0, "valid": 1, "test": 2}


@dataclass
class Table:
    """A feature table plus the other inputs of build_shards."""

    frame: pd.DataFrame
    feature_names: list[str]
    stats: dict[str, Any]
    split_dates: dict[str, list[str]]
    instruments: pd.DataFrame
    text: SimpleNamespace


def make_table(
    n_symbols: int = 24,
    n_days: int = 160,
    n_features: int = 8,
    seed: int = 0,
    late_every: int = 4,
    gaps: bool = True,
) -> Table:
    """A deterministic synthetic feature table with late starters, gaps and purge days."""
    rng = np.random.default_rng(seed)
    calendar = pd.bdate_range("2021-01-04", periods=n_days)
    train_end, valid_start = int(n_days * 0.6), int(n_days * 0.6) + 3
    valid_end, test_start = int(n_days * 0.8), int(n_days * 0.8) + 3
    split_of_day = np.full(n_days, -1, np.int8)
    split_of_day[:train_end] = 0
    split_of_day[valid_start:valid_end] = 1
    split_of_day[test_start:] = 2
    names = [f"f{j}" for j in range(n_features)]
    parts = []
    for i in range(n_symbols):
        first = int(rng.integers(5, n_days // 2)) if late_every and i % late_every == 1 else 0
        days = np.arange(first, n_days)
        if gaps and i % 5 == 2:
            days = np.delete(days, rng.choice(len(days) - 2, size=6, replace=False))
        part = pd.DataFrame({"symbol": f"SYM{i:03d}", "date": calendar[days]})
        for name in names:
            part[name] = rng.standard_normal(len(days)).astype(np.float32)
        label = rng.integers(0, 4, len(days)).astype(np.int8)
        label[rng.random(len(days)) < 0.05] = -1
        label[-2:] = -1
        part["label"] = label
        part["fwd_return"] = np.where(label >= 0, rng.normal(0, 0.02, len(days)), np.nan).astype(
            np.float32
        )
        part["split"] = split_of_day[days]
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True)
    symbols = [f"SYM{i:03d}" for i in range(n_symbols)]
    instruments = pd.DataFrame(
        {
            "symbol": symbols,
            "industry": [["Energy", "Tech", "", "Banks"][i % 4] for i in range(n_symbols)],
            "index": [["", "CSI300", "CSI500"][i % 3] for i in range(n_symbols)],
            "description": [f"company {i}" if i % 6 else "" for i in range(n_symbols)],
        }
    )
    has_text = np.array([i % 6 != 0 for i in range(n_symbols)])
    vectors = rng.standard_normal((n_symbols, 5)).astype(np.float32) * has_text[:, None]
    text = SimpleNamespace(symbols=symbols, vectors=vectors, has_text=has_text)
    split_dates = {
        "train": [str(calendar[0].date()), str(calendar[train_end - 1].date())],
        "valid": [str(calendar[valid_start].date()), str(calendar[valid_end - 1].date())],
        "test": [str(calendar[test_start].date()), str(calendar[-1].date())],
    }
    stats = {"median": {n: 0.0 for n in names}, "scale": {n: 1.0 for n in names}, "clip": 3.0}
    return Table(frame, names, stats, split_dates, instruments, text)


def calendar_slots(frame: pd.DataFrame) -> np.ndarray:
    """Each row's position on the table's trading calendar (the union of its dates)."""
    calendar = np.unique(frame["date"].to_numpy())
    return np.searchsorted(calendar, frame["date"].to_numpy())


def expected_windows(
    frame: pd.DataFrame, window: int, split: str | None, min_valid: int
) -> pd.DataFrame:
    """The windows a loader must emit, computed independently with pandas.

    A window is the `window` trading days ending at a bar's day; `valid` counts the symbol's
    own bars among those days (gap days and days before its first bar are not bars). Returns
    one row per window: symbol, date, valid.
    """
    slot = calendar_slots(frame)
    valid = np.zeros(len(frame), np.int64)
    for _, rows in frame.groupby("symbol", sort=False).indices.items():
        own = slot[rows]
        valid[rows] = np.searchsorted(own, own, side="right") - np.searchsorted(
            own, own - window + 1, side="left"
        )
    keep = valid >= min_valid
    if split is not None:
        keep &= (frame["split"].to_numpy() == SPLIT_NAMES[split]) & (frame["label"].to_numpy() >= 0)
    out = frame.loc[keep, ["symbol", "date"]].reset_index(drop=True)
    out["valid"] = valid[keep]
    return out
