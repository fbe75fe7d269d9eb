"""Windows of an in-memory factor table, gathered by the shard loader's own code.

The served model must build exactly the windows training and evaluation built from the shards:
the last T rows of a symbol up to the end day, left padded and masked where the history is
shorter, emitted only with at least `min_valid_days` own rows. So the normalised request table is
laid out as the loader's panel (`alphaloom.model.panels.Panel`: T-1 zero rows, then the rows in
(symbol, date) order) and batches come from `alphaloom.model.panels.gather_batch`, the function
the loader itself gathers with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from alphaloom.model.batch import Batch
from alphaloom.model.panels import Panel, gather_batch
from alphaloom.model.shard_format import valid_lengths
from alphaloom.tasks.serving.bundle import SymbolInputs


@dataclass(frozen=True)
class SymbolTable:
    """The two ShardSetInfo fields `gather_batch` reads, for the request's symbols (row = id)."""

    text: np.ndarray
    has_text: np.ndarray


def request_panel(
    normed: pd.DataFrame, feature_names: Sequence[str], window: int, inputs: SymbolInputs
) -> tuple[Panel, list[str]]:
    """The loader's panel of a (symbol, date)-sorted normalised table, one window per row, and
    the request's symbol names (id -> name)."""
    codes, symbols = pd.factorize(normed["symbol"], sort=False)
    n_rows, n_features = len(normed), len(feature_names)
    x = np.zeros((window - 1 + n_rows, n_features), np.float32)
    x[window - 1 :] = normed[list(feature_names)].to_numpy(np.float32)
    codes = codes.astype(np.int64)
    panel = Panel(
        x=x,
        start=np.arange(n_rows, dtype=np.int64),  # window of row i: panel rows i .. i + T - 1
        valid=valid_lengths(codes, window),
        symbol=codes,
        date=normed["date"].to_numpy("datetime64[D]").astype(np.int64),
        label=np.full(n_rows, -1, np.int64),
        fwd_return=np.full(n_rows, np.nan, np.float32),
        industry=inputs.industry[codes],
        index=inputs.index[codes],
        shard=np.zeros(n_rows, np.int32),
        window=window,
    )
    return panel, [str(s) for s in symbols]


def scored_rows(panel: Panel, min_valid_days: int, end_days: np.ndarray | None) -> np.ndarray:
    """Rows whose window is emitted: >= min_valid_days own rows, ending on `end_days` if given
    (the loader's `Selection` with no split)."""
    keep = panel.valid >= min_valid_days
    if end_days is not None:
        keep &= np.isin(panel.date, end_days)
    return np.flatnonzero(keep)


def window_batches(
    panel: Panel, rows: np.ndarray, table: SymbolTable, batch_size: int
) -> Iterator[Batch]:
    """Batches (the batch contract of alphaloom.model.batch) of the windows ending at `rows`."""
    windows = panel.windows()
    for start in range(0, len(rows), batch_size):
        yield gather_batch(panel, windows, rows[start : start + batch_size], table)
