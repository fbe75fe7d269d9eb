"""The features stage in bounded memory: raw factors, statistics and the table, chunk by chunk.

The feature table of a large market does not fit in memory (3000 symbols x 5000 days x 158
float32 factors is 9.5 GB, and the one-shot build holds it three times: raw, normalised, and the
frame handed to parquet). `write_feature_table` writes the same table (`build_feature_table`'s
frame, row for row and bit for bit) while holding at most one chunk of rows at a time:

1. raw factors of contiguous symbol ranges of at most `chunk_rows` rows (whole symbols; a
   symbol longer than that is a chunk of its own), computed here or cut from the fan-out's
   partition outputs, go to a local scratch file per chunk, one float32 run per factor;
2. each factor's train-split statistics are fitted on that column read back from every chunk
   (one column of the market in memory, in row order, so the median, MAD and the std fallback
   are those of the one-shot build);
3. each chunk is normalised, joined to its labels and split codes, and appended to the parquet
   file as one row group.

Labels and splits are cross-sectional, so they are computed once on the whole bars table (a few
bytes a row). The scratch directory is local (`tempfile`) and removed at the end.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_CHUNK_ROWS = 1_000_000  # ~630 MB of raw float32 factors, ~1.5 GB peak per chunk

RawSource = pd.DataFrame | str | Path  # a partition's raw factors, or its parquet file


def chunk_bounds(symbols: pd.Series, chunk_rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of (symbol, date)-sorted rows, cut at symbol boundaries, each
    of at most `chunk_rows` rows unless one symbol alone has more."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    n = len(symbols)
    if n == 0:
        return []
    codes = pd.factorize(symbols)[0]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    stops = np.r_[starts[1:], n]
    bounds: list[tuple[int, int]] = []
    begin = 0
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        if stop - begin > chunk_rows and start > begin:
            bounds.append((begin, start))
            begin = start
    bounds.append((begin, n))
    return bounds


class Scratch:
    """Raw factor chunks on local disk: chunk i is `[F, rows_i]` float32, one run per factor."""

    def __init__(self, root: Path, n_factors: int, bounds: list[tuple[int, int]]) -> None:
        self.root, self.n_factors, self.bounds = root, n_factors, bounds

    def path(self, chunk: int) -> Path:
        return self.root / f"raw-{chunk:05d}.f32"

    def write(self, chunk: int, block: Iterator[np.ndarray] | np.ndarray) -> None:
        """Write chunk `chunk` from its factor rows (arrays of the chunk's length, in order)."""
        rows = self.bounds[chunk][1] - self.bounds[chunk][0]
        written = 0
        with self.path(chunk).open("wb") as out:
            for values in block:
                column = np.ascontiguousarray(values, dtype=np.float32)
                if column.shape != (rows,):
                    raise ValueError(f"raw chunk {chunk}: a factor of {column.shape}, not {rows}")
                column.tofile(out)
                written += 1
        if written != self.n_factors:
            raise ValueError(f"raw chunk {chunk}: {written} factors, expected {self.n_factors}")

    def column(self, chunk: int, factor: int) -> np.ndarray:
        """One factor of one chunk (read, not mapped: nothing stays resident)."""
        rows = self.bounds[chunk][1] - self.bounds[chunk][0]
        return np.fromfile(self.path(chunk), np.float32, count=rows, offset=factor * rows * 4)

    def block(self, chunk: int) -> np.ndarray:
        """The chunk's `[F, rows]` raw factors."""
        rows = self.bounds[chunk][1] - self.bounds[chunk][0]
        return np.fromfile(self.path(chunk), np.float32).reshape(self.n_factors, rows)


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    """A local scratch directory for raw chunks, removed when closed."""
    return tempfile.TemporaryDirectory(prefix="alphaloom-features-")


def partition_rows(
    symbols: np.ndarray,
    dates: np.ndarray,
    part: pd.DataFrame,
    number: int,
    filled: np.ndarray,
    names: list[str],
    error: type[Exception],
) -> np.ndarray:
    """The rows of the sorted bars (`symbols`/`dates`) that partition `number` covers, after
    checking it matches them, repeats no row already `filled` and has every factor column."""
    rows = np.flatnonzero(np.isin(symbols, part["symbol"].unique()))
    same = len(rows) == len(part) and np.array_equal(
        dates[rows], part["date"].to_numpy("datetime64[ns]")
    )
    if not same or not np.array_equal(symbols[rows], part["symbol"].to_numpy()):
        raise error(
            f"raw factors of partition {number} do not match the market's bars of its "
            "symbols (stale or foreign partition output); delete raw_factors/ and rerun"
        )
    if filled[rows].any():
        raise error(f"partition {number} repeats symbols of another partition")
    missing = [name for name in names if name not in part.columns]
    if missing:
        raise error(f"raw factors of partition {number} lack columns {missing}")
    return rows


def write_chunks_from_parts(
    scratch: Scratch,
    symbols: np.ndarray,
    dates: np.ndarray,
    parts: Sequence[RawSource],
    names: list[str],
    error: type[Exception],
) -> None:
    """Cut the fan-out's partition outputs into the scratch chunks (rows of `symbols`/`dates`,
    the sorted bars), checking that every row comes from exactly one partition.

    Partition outputs are read one at a time; each partition's rows are spread to per-chunk
    piece files, then each chunk is assembled from its pieces.
    """
    n = len(symbols)
    filled = np.zeros(n, dtype=bool)
    starts = np.array([b[0] for b in scratch.bounds], dtype=np.int64)
    pieces: list[list[tuple[Path, np.ndarray]]] = [[] for _ in scratch.bounds]
    for number, source in enumerate(parts):
        part = pd.read_parquet(str(source)) if not isinstance(source, pd.DataFrame) else source
        rows = partition_rows(symbols, dates, part, number, filled, names, error)
        filled[rows] = True
        chunk_of = np.searchsorted(starts, rows, side="right") - 1
        for chunk in np.unique(chunk_of):
            picked = np.flatnonzero(chunk_of == chunk)
            piece = scratch.root / f"piece-{number:05d}-{chunk:05d}.f32"
            with piece.open("wb") as out:
                for name in names:
                    part[name].to_numpy(np.float32)[picked].tofile(out)
            pieces[chunk].append((piece, rows[picked] - starts[chunk]))
        del part
    if not filled.all():
        absent = sorted(set(symbols[~filled]))[:5]
        raise error(f"no partition holds the raw factors of symbols {absent}")
    for chunk, (begin, stop) in enumerate(scratch.bounds):
        block = np.empty((len(names), stop - begin), dtype=np.float32)
        for piece, at in pieces[chunk]:
            block[:, at] = np.fromfile(piece, np.float32).reshape(len(names), len(at))
            piece.unlink()
        scratch.write(chunk, iter(block))


def fit_stats_from_chunks(
    scratch: Scratch, names: list[str], train: np.ndarray, clip: float, fit_one: Any
) -> dict[str, Any]:
    """`fit_normalizer`'s statistics from the scratch chunks, one factor at a time (each
    factor's train values in row order, as the one-shot build sees them)."""
    if not train.any():
        raise ValueError("fit_normalizer: train_mask selects no rows")
    if not clip > 0:
        raise ValueError(f"features.clip must be > 0, got {clip}")
    masks = [train[begin:stop] for begin, stop in scratch.bounds]
    median: dict[str, float] = {}
    scale: dict[str, float] = {}
    for factor, name in enumerate(names):
        values = np.concatenate(
            [
                scratch.column(chunk, factor).astype(np.float64)[mask]
                for chunk, mask in enumerate(masks)
            ]
        )
        median[name], scale[name] = fit_one(values)
    return {"median": median, "scale": scale, "clip": float(clip)}


class TableWriter:
    """Appends chunk frames to one parquet file, one row group each (schema of the first)."""

    def __init__(self, path: Path) -> None:
        self.path, self.writer, self.rows = path, None, 0

    def append(self, frame: pd.DataFrame) -> None:
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self.writer is None:
            self.writer = pq.ParquetWriter(str(self.path), table.schema)
        self.writer.write_table(table.cast(self.writer.schema), row_group_size=len(frame) or 1)
        self.rows += len(frame)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
