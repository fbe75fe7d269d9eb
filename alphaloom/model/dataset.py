"""ShardedWindowDataset: shuffled, memory-bounded window loading from a shard set.

The seed of this product could not hold its training set in memory, so it split the set into
files, shuffled it, and loaded it segment by segment. This module makes that exact:

* A shard set (written by tasks/dataset/shards.py) is a directory of parquet shards, each holding
  whole symbol histories sorted by (symbol, date), plus side tables and a `manifest.json` written
  last. The on-disk layout of a shard is defined in model/shard_format.py, so writer and reader
  cannot drift apart; model/ imports no tasks/ code.
* Every epoch, the shard order is permuted with rng(seed, epoch) and cut into pools of k shards.
  A pool is loaded as one zero-padded [rows, F] float32 panel plus the list of its window end
  rows; its windows are permuted and batches are gathered by index arithmetic (a strided view
  of the panel: window i is rows start[i] .. start[i] + T - 1), never materialised.
* Memory is bounded by two pools (the one being gathered and the one being prefetched by a
  background thread), not by the data set.
* Consumer g of G (DDP rank x DataLoader worker) takes pools p with p mod G = g, so every window
  is emitted exactly once per epoch. With `equalize`, consumers that would run short repeat some
  of their own windows so that every consumer yields the same number of batches (computed from
  the manifest's window counts, without communication), and DDP cannot hang.
* State is (epoch, batches yielded): resuming skips whole pools by their manifest counts and
  starts mid-pool at a batch offset, without gathering the skipped batches.
* `group_by_date`: a pool's windows are ordered day by day instead of one flat permutation (the
  pool's days in a seeded random order, the windows of a day in a random order), then cut into
  batches as usual. A batch thus holds whole days of the pool's symbols, except that a day can
  straddle the cut between two batches; a per-day ranking loss scores each day group it sees.
  Everything else is unchanged (pool order, batch counts from the manifest, padding, resume),
  so every window still comes exactly once per epoch and DDP ranks stay disjoint. A day holds
  only the pool's symbols (k of n shards, drawn afresh every epoch): a random part of the
  cross-section, which is what the ranking loss needs, not all of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from alphaloom.model.batch import Batch
from alphaloom.model.panels import Panel, gather_batch, load_panel, panel_rows
from alphaloom.model.shard_format import (
    SPLIT_CODES,
    Selection,
    ShardSetError,
    dates_to_days,
    rebuild_hint,
    valid_lengths,
)
from alphaloom.model.shard_set import ShardSetInfo, window_key


@dataclass
class LoaderStats:
    """Work done by this process's iterations (lets tests see that resuming skips cheaply)."""

    pools_loaded: int = 0
    batches_gathered: int = 0


@dataclass(frozen=True)
class _Segment:
    """One pool's part of a consumer's stream: its own windows, then maybe padding batches."""

    pool: int
    shards: tuple[int, ...]
    n_windows: int
    own_batches: int
    pad_batches: int

    @property
    def n_batches(self) -> int:
        return self.own_batches + self.pad_batches


def round_robin_resume(total: int, counts: Sequence[int]) -> tuple[list[int], list[int]]:
    """Where a round robin over queues of `counts` items stands after `total` items.

    DataLoader interleaves its workers' batches round robin (exhausted workers drop out) and
    always starts a new iteration at worker 0. Returns (taken, roles): `taken[q]` items of queue
    q were consumed, and fresh workers 0, 1, ... must play queues `roles[0], roles[1], ...` (the
    queues with items left, rotated to the one whose turn is next) to continue the same order.
    """
    left = np.asarray(counts, dtype=np.int64).copy()
    taken = np.zeros_like(left)
    remaining, turn = int(total), 0
    while remaining > 0:
        active = np.flatnonzero(left > 0)
        if len(active) == 0:
            break
        if remaining < len(active):
            chosen = active[:remaining]
            taken[chosen] += 1
            left[chosen] -= 1
            turn = int(active[remaining])
            break
        rounds = min(remaining // len(active), int(left[active].min()))
        taken[active] += rounds
        left[active] -= rounds
        remaining -= rounds * len(active)
    waiting = [int(q) for q in np.flatnonzero(left > 0)]
    roles = [q for q in waiting if q >= turn] + [q for q in waiting if q < turn]
    return taken.tolist(), roles


DEFAULT_ORDERED_PANEL_ROWS = 1_500_000  # ordered mode's panel rows a block: ~1 GB at F = 158


class ShardedWindowDataset(IterableDataset):
    """Batches of T-day windows from a shard set: shuffled in pools, or in (date, symbol) order.

    Modes:
    * `shuffle=True` (default for split "train"): pooled shuffling as described in the module
      docstring; memory is two pools (current + prefetched), independent of the data size.
      Their two buffers stay with the dataset between epochs, so later epochs reuse them.
    * `shuffle=False` (default otherwise): every window of the split, in (date, symbol) order.
      All shards are read one by one and only the rows the split's windows need (its own rows
      plus up to T-1 days of history per symbol) are kept, so memory is proportional to the
      split, not the data set; eval splits are a fraction of the data. Consumers take batches
      b with b mod G = g, so a DataLoader's worker round robin restores the exact order.
    * `split=None`: no split or label filter (scoring); `dates=` keeps windows ending on those
      dates only (e.g. the last date for nightly scoring). `dates` implies `shuffle=False`.

    A window belongs to the split of its end day and may reach back across split boundaries
    and the purge gap for history, never forward. Windows with fewer than `min_valid_days`
    own-symbol days are not emitted; shorter histories are left-padded and masked.
    """

    def __init__(
        self,
        shards: str | Path | ShardSetInfo,
        split: str | int | None = "train",
        *,
        batch_size: int = 512,
        pool_shards: int = 4,
        min_valid_days: int = 20,
        seed: int = 0,
        shuffle: bool | None = None,
        equalize: bool = True,
        prefetch: bool = True,
        dates: Iterable[Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        group_by_date: bool = False,
        max_panel_rows: int | None = DEFAULT_ORDERED_PANEL_ROWS,
    ) -> None:
        super().__init__()
        self.info = shards if isinstance(shards, ShardSetInfo) else ShardSetInfo.open(shards)
        self.key = window_key(split)
        self.shuffle = (self.key == "train" and dates is None) if shuffle is None else shuffle
        if dates is not None and self.shuffle:
            raise ValueError("dates= selects windows for ordered scoring; it needs shuffle=False")
        if batch_size < 1 or pool_shards < 1:
            raise ValueError(
                f"batch_size ({batch_size}) and pool_shards ({pool_shards}) must be >= 1"
            )
        if not 1 <= min_valid_days <= self.info.window:
            raise ValueError(
                f"min_valid_days must be within 1..window ({self.info.window}), "
                f"got {min_valid_days}"
            )
        self.selection = Selection(
            split=SPLIT_CODES.get(self.key),
            min_valid=min_valid_days,
            dates=None if dates is None else np.unique(dates_to_days(dates)),
        )
        if group_by_date and not self.shuffle:
            raise ValueError("group_by_date orders shuffled pools; ordered mode is by date anyway")
        self.group_by_date = group_by_date
        self.max_panel_rows = max_panel_rows  # ordered mode: panel rows per date block
        self.batch_size = batch_size
        self.pool_shards = pool_shards
        self.seed = seed
        self.equalize = equalize
        self.prefetch = prefetch
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.num_workers = num_workers
        self.epoch = 0
        self._yielded = 0
        self.stats = LoaderStats()
        self._spare_buffers: list[np.ndarray] = []

    def __getstate__(self) -> dict[str, Any]:
        """Pickled into DataLoader workers without this process's panel buffers."""
        state = self.__dict__.copy()
        state["_spare_buffers"] = []
        return state

    # -- state ---------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (call it only when starting a fresh epoch)."""
        self.epoch = int(epoch)
        self._yielded = 0

    def state_dict(self) -> dict[str, int]:
        """(epoch, batches this rank has yielded in it): enough to resume exactly."""
        return {"epoch": self.epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next iteration continues `state['epoch']` after `state['batches']`."""
        missing = [key for key in ("epoch", "batches") if key not in state]
        if missing:
            raise ValueError(f"loader state lacks keys {missing}: got {sorted(state)}")
        self.epoch = int(state["epoch"])
        self._yielded = int(state["batches"])

    def _advance(self) -> None:
        """One batch was handed to the training loop (called by WindowLoader for workers)."""
        self._yielded += 1

    def _finish_epoch(self) -> None:
        """The epoch ran to its end: the next iteration starts the next epoch."""
        self.epoch += 1
        self._yielded = 0

    # -- planning --------------------------------------------------------------------------

    def _pools(self, epoch: int) -> list[tuple[int, ...]]:
        """Shard ids per pool: shard order permuted with rng(seed, epoch), cut into k-groups."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.info.shards))
        k = self.pool_shards
        return [tuple(int(s) for s in order[i : i + k]) for i in range(0, len(order), k)]

    def _segments(self, epoch: int, consumer: int, n_consumers: int) -> list[_Segment]:
        """The pools (and padding) of one consumer for an epoch, from manifest counts alone."""
        pools = self._pools(epoch)
        counts = [
            self.info.window_count(self.key, self.selection.min_valid, pool) for pool in pools
        ]
        batches = [math.ceil(n / self.batch_size) for n in counts]
        own = [p for p in range(consumer, len(pools), n_consumers) if counts[p] > 0]
        segments = [_Segment(p, pools[p], counts[p], batches[p], 0) for p in own]
        if not self.equalize:
            return segments
        per_consumer = [sum(batches[c::n_consumers]) for c in range(n_consumers)]
        missing = max(per_consumer, default=0) - per_consumer[consumer]
        if missing == 0:
            return segments
        if segments:
            last = segments[-1]
            segments[-1] = _Segment(
                last.pool, last.shards, last.n_windows, last.own_batches, missing
            )
            return segments
        # No pool of its own: borrow one (pools with windows, picked by consumer number).
        donors = [p for p in range(len(pools)) if counts[p] > 0]
        donor = donors[consumer % len(donors)]
        return [_Segment(donor, pools[donor], counts[donor], 0, missing)]

    def _consumer_batches(self, epoch: int, consumer: int, n_consumers: int) -> int:
        if self.shuffle:
            return sum(seg.n_batches for seg in self._segments(epoch, consumer, n_consumers))
        total = math.ceil(self._ordered_window_count() / self.batch_size)
        return len(range(consumer, total, n_consumers))

    def _ordered_window_count(self) -> int:
        if self.selection.dates is None:
            return self.info.window_count(self.key, self.selection.min_valid)
        return sum(
            int(
                self.selection.mask(
                    arrays, valid_lengths(arrays.symbol, self.info.window, arrays.bar)
                ).sum()
            )
            for arrays in (self.info.read_shard(s) for s in range(len(self.info.shards)))
        )

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (all its workers together)."""
        workers = max(self.num_workers, 1)
        return sum(
            self._consumer_batches(self.epoch, self.rank * workers + w, self.world_size * workers)
            for w in range(workers)
        )

    # -- iteration -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        w, n_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for batch in self._worker_stream(w, n_workers):
            if worker is None:
                self._yielded += 1
            yield batch
        if worker is None:
            self._finish_epoch()

    def _worker_stream(self, worker: int, n_workers: int) -> Iterator[Batch]:
        """This worker's batches from the resume point on (see round_robin_resume)."""
        n_consumers, epoch = self.world_size * n_workers, self.epoch
        counts = [
            self._consumer_batches(epoch, self.rank * n_workers + i, n_consumers)
            for i in range(n_workers)
        ]
        taken, roles = round_robin_resume(self._yielded, counts)
        if worker >= len(roles):
            return iter(())
        role = roles[worker]
        consumer, skip = self.rank * n_workers + role, taken[role]
        if self.shuffle:
            return self._iter_shuffled(epoch, consumer, n_consumers, skip)
        return self._iter_ordered(consumer, n_consumers, skip)

    def _iter_shuffled(
        self, epoch: int, consumer: int, n_consumers: int, skip: int
    ) -> Iterator[Batch]:
        todo: list[tuple[_Segment, int]] = []
        for segment in self._segments(epoch, consumer, n_consumers):
            if skip >= segment.n_batches:
                skip -= segment.n_batches
                continue
            todo.append((segment, skip))
            skip = 0
        if not todo:
            return
        # Two panel buffers at most (the pool being gathered, the one being prefetched), kept
        # across pools and epochs so later pools neither re-fault fresh pages nor grow the heap.
        rows = max(panel_rows(self.info, seg.shards) for seg, _ in todo)
        spare, lent = self._spare_buffers, []

        def take() -> np.ndarray:
            while spare:
                buffer = spare.pop()
                if len(buffer) >= rows:
                    lent.append(buffer)
                    return buffer
            lent.append(np.empty((rows, self.info.n_features), np.float32))
            return lent[-1]

        def give_back(panel: Panel) -> None:
            buffer = panel.x if panel.x.base is None else panel.x.base
            lent[:] = [b for b in lent if b is not buffer]
            spare.append(buffer)

        executor = (
            ThreadPoolExecutor(1, thread_name_prefix="pool-prefetch") if self.prefetch else None
        )
        try:
            pending = self._submit(executor, todo[0][0], take())
            for i, (segment, first) in enumerate(todo):
                panel = pending.result()
                if executor is not None and i + 1 < len(todo):
                    pending = self._submit(executor, todo[i + 1][0], take())
                yield from self._segment_batches(panel, segment, epoch, consumer, first)
                give_back(panel)
                del panel
                if executor is None and i + 1 < len(todo):
                    pending = self._submit(executor, todo[i + 1][0], take())
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
            spare.extend(lent)  # stopped early: the current and prefetched buffers are free now

    def _submit(
        self, executor: ThreadPoolExecutor | None, segment: _Segment, buffer: np.ndarray
    ) -> Future[Panel]:
        """Load a pool in the background thread (or now, when prefetching is off)."""
        if executor is not None:
            return executor.submit(self._load_pool, segment, buffer)
        done: Future[Panel] = Future()
        done.set_result(self._load_pool(segment, buffer))
        return done

    def _load_pool(self, segment: _Segment, buffer: np.ndarray) -> Panel:
        panel = load_panel(self.info, segment.shards, self.selection, buffer)
        if len(panel) != segment.n_windows:
            raise ShardSetError(
                f"shards {[self.info.shards[s].file for s in segment.shards]} hold {len(panel)} "
                f"windows but the manifest counts {segment.n_windows}; "
                f"{rebuild_hint(self.info.directory)}"
            )
        self.stats.pools_loaded += 1
        return panel

    def _segment_batches(
        self, panel: Panel, segment: _Segment, epoch: int, consumer: int, first: int
    ) -> Iterator[Batch]:
        """A pool's batches from batch `first` on: its permuted windows, then padding."""
        size = self.batch_size
        order = self._pool_order(panel, epoch, segment.pool)
        if segment.pad_batches:
            pad_rng = np.random.default_rng([self.seed, epoch, segment.pool, 1 + consumer])
            padding = np.resize(pad_rng.permutation(len(panel)), segment.pad_batches * size)
        windows = panel.windows()
        for b in range(first, segment.n_batches):
            if b < segment.own_batches:
                rows = order[b * size : (b + 1) * size]
            else:
                p = b - segment.own_batches
                rows = padding[p * size : (p + 1) * size]
            self.stats.batches_gathered += 1
            yield gather_batch(panel, windows, rows, self.info)

    def _pool_order(self, panel: Panel, epoch: int, pool: int) -> np.ndarray:
        """The pool's windows in batch order: one seeded permutation, or day by day."""
        rng = np.random.default_rng([self.seed, epoch, pool])
        order = rng.permutation(len(panel))
        if not self.group_by_date:
            return order
        days, day_of = np.unique(panel.date, return_inverse=True)
        day_rank = rng.permutation(len(days))
        # stable sort of the random permutation by the day's random rank: days in random
        # order, each day's windows in random order
        return order[np.argsort(day_rank[day_of[order]], kind="stable")]

    def _iter_ordered(self, consumer: int, n_consumers: int, skip: int) -> Iterator[Batch]:
        """Every selected window in (date, symbol) order; this consumer's batches only.

        The windows are loaded in date blocks (`ordered_blocks`), each a panel of at most about
        `max_panel_rows` rows, one block in memory at a time; a batch that straddles two blocks
        is gathered from both. The batches are those of one panel of every window, row for row.
        """
        size, blocks, every = self.batch_size, ordered_blocks(self), range(len(self.info.shards))
        if len(blocks) == 1:  # one panel of every window (its length is the count)
            panels: Iterator[Panel] = iter([load_panel(self.info, every, blocks[0])])
            total = -1
        else:
            panels = (load_panel(self.info, every, selection) for selection in blocks)
            total = self._ordered_window_count()
        batch, pieces, at = None, [], 0
        wanted: Iterator[int] = iter(())
        for number, panel in enumerate(panels):
            self.stats.pools_loaded += 1
            if number == 0:
                total = len(panel) if total == -1 else total
                wanted = iter(range(consumer, math.ceil(total / size), n_consumers)[skip:])
                batch = next(wanted, None)
            if batch is None:
                return
            order, windows, end = np.lexsort((panel.symbol, panel.date)), panel.windows(), at
            end += len(panel)
            while batch is not None:
                first, stop = batch * size, min((batch + 1) * size, total)
                if max(first, at) < min(stop, end):
                    rows = order[max(first, at) - at : min(stop, end) - at]
                    pieces.append(gather_batch(panel, windows, rows, self.info))
                if stop > end:
                    break  # the batch continues in the next block
                self.stats.batches_gathered += 1
                yield pieces[0] if len(pieces) == 1 else _concat_batches(pieces)
                batch, pieces = next(wanted, None), []
            at = end
            del panel, windows, order


def ordered_blocks(dataset: ShardedWindowDataset) -> list[Selection]:
    """The date blocks ordered iteration loads one at a time: the dataset's own selection when
    its panel fits in `max_panel_rows` (estimated as symbols x (days + window - 1), calendar
    days: an overestimate), else the same selection cut into consecutive runs of days."""
    info, selection, limit = dataset.info, dataset.selection, dataset.max_panel_rows
    if limit is None:
        return [selection]
    if selection.dates is not None:
        days = np.asarray(selection.dates, dtype=np.int64)
    else:
        bounds = (info.manifest.get("splits") or {}).get(dataset.key)
        if not bounds:
            return [selection]
        first, last = (np.datetime64(str(d)[:10], "D").astype(np.int64) for d in bounds)
        days = np.arange(first, last + 1, dtype=np.int64)
    per_block = max(1, limit // max(info.n_symbols, 1) - (info.window - 1))
    if len(days) <= per_block:
        return [selection]
    return [
        Selection(selection.split, selection.min_valid, days[i : i + per_block])
        for i in range(0, len(days), per_block)
    ]


def _concat_batches(pieces: list[Batch]) -> Batch:
    """One batch of the rows of several, in order."""
    return {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0]}


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit rank/world size, else torch.distributed's when initialised, else (0, 1)."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world_size {world_size}")
    return rank, world_size
