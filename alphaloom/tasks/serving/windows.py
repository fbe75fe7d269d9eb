"""Windows of an in-memory factor table, gathered by the shard loader's own code.

The served model must build exactly the windows training and evaluation built from the shards:
the last T rows of a symbol up to the end day, left padded and masked where the history is
shorter, emitted only with at least `min_valid_days` own rows. So the normalised request table is
laid out as the loader's panel (`alphaloom.model.panels.Panel`: T-1 zero rows, then the rows in
(symbol, date) order) and batches come from `alphaloom.model.panels.gather_batch`, the function
the loader itself gathers with.

Windows are calendar-true, as the shards' are (tasks/dataset/row_layout.py): T trading days,
a day the symbol has no bar masked. The request's trading calendar is the union of its dates,
so a day on which no requested symbol traded is not a day of the windows; send the whole
cross-section (as the nightly scorer does) for halts to show as the gaps training saw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from alphaloom.model.batch import Batch
from alphaloom.model.panels import Panel, gather_batch
from alphaloom.model.shard_format import valid_lengths, window_spans
from alphaloom.tasks.dataset.row_layout import calendar_rows
from alphaloom.tasks.serving.bundle import SymbolInputs


@dataclass(frozen=True)
class SymbolTable:
    """What `gather_batch` reads of a ShardSetInfo, for the request's symbols (text row = id)."""

    text: np.ndarray
    has_text: np.ndarray

    def text_of(self, text_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Description vectors [B, D] and has-text flags [B] of the rows' symbol ids."""
        rows = np.asarray(text_rows, dtype=np.int64)
        return self.text[rows], self.has_text[rows].astype(bool)


def request_panel(
    normed: pd.DataFrame, feature_names: Sequence[str], window: int, inputs: SymbolInputs
) -> tuple[Panel, list[str]]:
    """The loader's panel of a (symbol, date)-sorted normalised table, one window per row, and
    the request's symbol names (id -> name)."""
    codes, symbols = pd.factorize(normed["symbol"], sort=False)
    days = normed["date"].to_numpy("datetime64[D]").astype(np.int64)
    rows = calendar_rows(codes.astype(np.int64), days, None)
    own = rows.source >= 0
    ends = np.flatnonzero(own)  # a window ends on a bar, as the loader's Selection asks
    if not np.array_equal(rows.source[ends], np.arange(len(normed))):
        raise ValueError("request_panel needs a table sorted by (symbol, date)")
    x = np.zeros((window - 1 + len(rows), len(feature_names)), np.float32)
    x[window - 1 :][own] = normed[list(feature_names)].to_numpy(np.float32)
    ids = rows.codes[ends]
    panel = Panel(
        x=x,
        bar=np.r_[np.zeros(window - 1, bool), own],
        start=ends.astype(np.int64),  # window of calendar row r: panel rows r .. r + T - 1
        span=window_spans(rows.codes, window)[ends],
        valid=valid_lengths(rows.codes, window, rows.bar)[ends],
        symbol=ids,
        date=rows.days[ends],
        label=np.full(len(ends), -1, np.int64),
        fwd_return=np.full(len(ends), np.nan, np.float32),
        industry=inputs.industry[ids],
        index=inputs.index[ids],
        text_row=ids,
        shard=np.zeros(len(ends), np.int32),
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
