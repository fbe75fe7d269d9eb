"""The pooled, shuffled, resumable window loader (model/dataset.py) on small hand-built shards."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from alphaloom.model.batch import BATCH_KEYS
from alphaloom.model.dataset import ShardedWindowDataset, round_robin_resume
from alphaloom.model.device_loader import WindowLoader
from alphaloom.model.shard_format import days_to_dates
from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.config import ShardsSection
from alphaloom.tasks.dataset.shards import build_shards
from tests.shards_testdata import (
    SPLIT_NAMES,
    Table,
    calendar_slots,
    expected_windows,
    make_table,
)

WINDOW = 20
MIN_VALID = 5
BATCH = 32


def _build(table: Table, root: Path, n_shards: int) -> ShardSetInfo:
    cfg = ShardsSection(window=WINDOW, n_shards=n_shards)
    path = build_shards(
        table.frame,
        table.feature_names,
        table.stats,
        table.split_dates,
        table.instruments,
        table.text,
        cfg,
        root,
        "src",
    )
    return ShardSetInfo.open(path)


@pytest.fixture(scope="module")
def table() -> Table:
    return make_table(n_symbols=24, n_days=160)


@pytest.fixture(scope="module")
def info(table: Table, tmp_path_factory: pytest.TempPathFactory) -> ShardSetInfo:
    return _build(table, tmp_path_factory.mktemp("loader"), n_shards=8)


def _dataset(info: ShardSetInfo, split: str | None = "train", **kwargs) -> ShardedWindowDataset:
    options = {"batch_size": BATCH, "pool_shards": 2, "min_valid_days": MIN_VALID, "seed": 11}
    options.update(kwargs)
    return ShardedWindowDataset(info, split, **options)


def _keys(batches: list[dict[str, torch.Tensor]]) -> list[tuple[int, int]]:
    return [
        (s, d)
        for b in batches
        for s, d in zip(b["symbol"].tolist(), b["date"].tolist(), strict=True)
    ]


def _expected_keys(table: Table, info: ShardSetInfo, split: str | None) -> Counter:
    expected = expected_windows(table.frame, WINDOW, split, MIN_VALID)
    ids = info.symbols.searchsorted(expected["symbol"].to_numpy())
    days = expected["date"].to_numpy().astype("datetime64[D]").astype(np.int64)
    return Counter(zip(ids.tolist(), days.tolist(), strict=True))


def _rank_batches(info: ShardSetInfo, rank: int, world: int, workers: int, **kwargs) -> list:
    dataset = _dataset(info, rank=rank, world_size=world, **kwargs)
    loader = WindowLoader(dataset, num_workers=workers)
    planned = len(loader)
    batches = list(loader)
    assert len(batches) == planned
    return batches


@pytest.mark.parametrize(("world", "workers"), list(itertools.product([1, 2, 3], [0, 1, 2])))
def test_every_window_is_emitted_exactly_once_across_ranks_and_workers(
    table: Table, info: ShardSetInfo, world: int, workers: int
):
    emitted = Counter()
    for rank in range(world):
        emitted.update(_keys(_rank_batches(info, rank, world, workers, equalize=False)))
    assert emitted == _expected_keys(table, info, "train")


@pytest.mark.parametrize(("world", "workers"), [(2, 0), (2, 2), (3, 1), (3, 2)])
def test_equalized_ranks_yield_equal_batch_counts_and_cover_every_window(
    table: Table, info: ShardSetInfo, world: int, workers: int
):
    per_rank = [_rank_batches(info, rank, world, workers) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1
    emitted = Counter(key for batches in per_rank for key in _keys(batches))
    expected = _expected_keys(table, info, "train")
    assert set(emitted) == set(expected)
    repeats = sum(emitted.values()) - sum(expected.values())
    assert 0 <= repeats < world * max(workers, 1) * len(per_rank[0]) * BATCH


def _stream(dataset_or_loader) -> list[tuple[int, int]]:
    return _keys(list(dataset_or_loader))


def test_same_seed_and_epoch_give_the_identical_stream(info: ShardSetInfo):
    first, second = _dataset(info), _dataset(info)
    batches_a, batches_b = list(first), list(second)
    assert _keys(batches_a) == _keys(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in BATCH_KEYS if key != "fwd_return")
    assert first.state_dict() == {"epoch": 1, "batches": 0}  # a full epoch moves to the next
    assert _keys(list(first)) != _keys(batches_a)  # epoch 1 is shuffled differently
    assert _stream(_dataset(info, seed=12)) != _keys(batches_a)
    assert _stream(_dataset(info, prefetch=False)) == _keys(batches_a)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_the_exact_stream(info: ShardSetInfo, workers: int):
    def make() -> WindowLoader:
        dataset = _dataset(info, world_size=2, rank=1)
        dataset.set_epoch(3)
        return WindowLoader(dataset, num_workers=workers)

    full = _stream(make())
    interrupted = make()
    taken = []
    for batch in interrupted:
        taken.append(batch)
        if len(taken) == 5:
            break
    state = interrupted.state_dict()
    assert state == {"epoch": 3, "batches": 5}
    resumed = make()
    resumed.load_state_dict(state)
    assert _keys(taken) + _stream(resumed) == full


def test_resume_skips_pools_without_loading_or_gathering(info: ShardSetInfo):
    full = _dataset(info)
    total = len(list(full))
    pools = full.stats.pools_loaded
    resumed = _dataset(info)
    resumed.load_state_dict({"epoch": 0, "batches": total - 2})
    assert len(list(resumed)) == 2
    assert resumed.stats.batches_gathered == 2
    assert resumed.stats.pools_loaded == 1 < pools


def _histories(table: Table) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per symbol: its dates (datetime64[D]), calendar slots and factor rows, from the table."""
    slots = calendar_slots(table.frame)
    return {
        symbol: (
            part["date"].to_numpy().astype("datetime64[D]"),
            slots[part.index],
            part[table.feature_names].to_numpy(),
        )
        for symbol, part in table.frame.groupby("symbol")
    }


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_windows_are_trading_days_of_their_symbol_and_never_look_forward(
    table: Table, info: ShardSetInfo, split: str
):
    """A window is the WINDOW trading days ending at its day: the symbol's bars sit at their
    days' places, and its gap days are masked and zero, never closed up by older bars."""
    batches = list(_dataset(info, split, shuffle=True))
    histories = _histories(table)
    symbol_names = np.concatenate([info.symbol_names(b["symbol"]) for b in batches])
    ends = np.concatenate([days_to_dates(b["date"]) for b in batches])
    x = torch.cat([b["x"] for b in batches]).numpy()
    mask = torch.cat([b["mask"] for b in batches]).numpy()
    gapped = 0
    for i in range(len(x)):
        dates, slots, rows = histories[symbol_names[i]]
        stop = np.searchsorted(dates, ends[i], side="right")
        assert dates[stop - 1] == ends[i]
        first_slot = slots[stop - 1] - WINDOW + 1
        inside = slots[:stop] >= first_slot
        expected_mask = np.zeros(WINDOW, bool)
        expected_mask[slots[:stop][inside] - first_slot] = True
        np.testing.assert_array_equal(mask[i], expected_mask)
        assert mask[i].sum() >= MIN_VALID and mask[i, -1]
        np.testing.assert_array_equal(x[i][mask[i]], rows[:stop][inside])  # own bars, in order
        assert not x[i][~mask[i]].any()
        gapped += bool((~mask[i][np.argmax(mask[i]) :]).any())  # a masked day after the first
    assert gapped > 0  # the table has symbols with gaps: some windows hold interior gap days
    labels = torch.cat([b["label"] for b in batches])
    assert (labels >= 0).all()


def test_a_window_belongs_to_the_split_of_its_end_day_and_reaches_back(
    table: Table, info: ShardSetInfo
):
    batches = list(_dataset(info, "valid", shuffle=True))
    days = table.frame["date"].to_numpy().astype("datetime64[D]").astype(np.int64)
    split_of = dict(zip(days.tolist(), table.frame["split"].tolist(), strict=True))
    dates = torch.cat([b["date"] for b in batches]).tolist()
    assert {split_of[d] for d in dates} == {SPLIT_NAMES["valid"]}
    first_valid = min(dates)
    full_history = torch.cat([b["mask"].all(dim=1) for b in batches])
    early = torch.tensor(dates) < first_valid + WINDOW
    assert (full_history & early).any()  # history reaches back into the purge gap and train


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_mode_yields_each_window_once_in_date_symbol_order(
    table: Table, info: ShardSetInfo, workers: int
):
    dataset = _dataset(info, "valid", batch_size=50)
    assert not dataset.shuffle
    keys = _keys(list(WindowLoader(dataset, num_workers=workers)))
    assert Counter(keys) == _expected_keys(table, info, "valid")
    assert keys == sorted(keys, key=lambda k: (k[1], k[0]))


def test_scoring_mode_yields_windows_at_given_dates_regardless_of_label(
    table: Table, info: ShardSetInfo
):
    last = table.frame["date"].max()
    batches = list(_dataset(info, None, dates=[last.date()]))
    keys = _keys(batches)
    at_last = table.frame[table.frame["date"] == last]
    assert sorted(info.symbol_names([k[0] for k in keys])) == sorted(at_last["symbol"])
    assert (torch.cat([b["label"] for b in batches]) == -1).all()  # unknown labels kept
    assert len(_dataset(info, None, dates=[last.date()])) == len(batches)


def test_shuffle_mixes_shards_and_dates_like_a_uniform_permutation(tmp_path: Path):
    pool = 4
    table = make_table(n_symbols=48, n_days=200, late_every=0, gaps=False, seed=5)
    info = _build(table, tmp_path, n_shards=12)
    batch = 64
    batches = list(_dataset(info, batch_size=batch, pool_shards=pool))
    shard_of = np.empty(info.n_symbols, np.int64)
    for number, shard in enumerate(info.shards):
        shard_of[list(shard.symbols)] = number
    stream = shard_of[torch.cat([b["symbol"] for b in batches]).numpy()]
    same_shard = np.mean(stream[1:] == stream[:-1])
    assert same_shard <= 1.5 / pool

    full = [b for b in batches if len(b["date"]) == batch]
    distinct = np.mean([len(torch.unique(b["date"])) for b in full])
    dates = torch.cat([b["date"] for b in batches]).numpy()
    uniform = np.random.default_rng(0).permutation(dates)
    n_full = len(uniform) // batch
    reference = np.mean(
        [len(np.unique(chunk)) for chunk in np.split(uniform[: n_full * batch], n_full)]
    )
    assert distinct >= 0.9 * reference


def test_batches_follow_the_batch_contract(info: ShardSetInfo):
    loader = WindowLoader(_dataset(info, "valid"), device="cpu")
    batch = next(iter(loader))
    assert tuple(batch) == BATCH_KEYS
    n = len(batch["x"])
    dtypes = {"x": torch.float32, "mask": torch.bool, "text": torch.float32}
    assert batch["x"].shape == (n, WINDOW, info.n_features)
    assert batch["mask"].shape == (n, WINDOW)
    assert batch["text"].shape == (n, info.text_dim)
    for key in BATCH_KEYS:
        expected = dtypes.get(
            key, torch.float32 if key in ("has_text", "fwd_return") else torch.int64
        )
        assert batch[key].dtype == expected, key
    ends = days_to_dates(batch["date"]).astype("datetime64[ns]")
    stamps = pd.DatetimeIndex(ends)
    assert batch["dow"].tolist() == stamps.day_of_week.tolist()
    assert batch["month"].tolist() == (stamps.month - 1).tolist()
    np.testing.assert_array_equal(batch["text"].numpy(), info.text[batch["symbol"].numpy()])
    np.testing.assert_array_equal(
        batch["industry"].numpy(), info.symbol_industry[batch["symbol"].numpy()]
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_loader_moves_pinned_batches_to_cuda(info: ShardSetInfo):
    cpu = next(iter(WindowLoader(_dataset(info), device="cpu")))
    gpu = next(iter(WindowLoader(_dataset(info), device="cuda")))
    assert all(value.is_cuda for value in gpu.values())
    assert all(torch.equal(cpu[key], gpu[key].cpu()) for key in BATCH_KEYS if key != "fwd_return")


def _round_robin(queues: list[list[int]]) -> list[int]:
    """DataLoader's interleaving: cycle over workers in id order, exhausted ones drop out."""
    queues = [list(q) for q in queues]
    order = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    return order


@pytest.mark.parametrize("counts", [[5, 2, 4], [3, 3], [0, 4, 1], [6]])
def test_round_robin_resume_continues_the_same_interleaving(counts: list[int]):
    queues = [[(q, i) for i in range(c)] for q, c in enumerate(counts)]
    full = _round_robin(queues)
    for total in range(sum(counts) + 1):
        taken, roles = round_robin_resume(total, counts)
        resumed = _round_robin([queues[role][taken[role] :] for role in roles])
        assert full[:total] + resumed == full


def test_invalid_arguments_are_rejected(info: ShardSetInfo):
    with pytest.raises(ValueError, match="min_valid_days"):
        _dataset(info, min_valid_days=WINDOW + 1)
    with pytest.raises(ValueError, match="shuffle=False"):
        _dataset(info, None, dates=["2021-03-01"], shuffle=True)
    with pytest.raises(ValueError, match="split must be one of"):
        _dataset(info, "training")
    with pytest.raises(ValueError, match="world_size"):
        _dataset(info, rank=2, world_size=2)
    with pytest.raises(ValueError, match="lacks keys"):
        _dataset(info).load_state_dict({"epoch": 1})


# ----------------------------------------------------------------------------------------------
# group_by_date: batches of whole days (for the per-day ranking loss)


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 0), (3, 2)])
def test_grouped_batches_cover_every_window_once_across_ranks(
    table: Table, info: ShardSetInfo, world: int, workers: int
):
    emitted = Counter()
    for rank in range(world):
        batches = _rank_batches(info, rank, world, workers, equalize=False, group_by_date=True)
        emitted.update(_keys(batches))
    assert emitted == _expected_keys(table, info, "train")


def test_grouped_batches_hold_whole_days_of_their_pool(info: ShardSetInfo):
    """Within a pool, a day's windows are contiguous: a day spans at most two batches (the
    cut between them), and a batch holds few days; a flat shuffle mixes every day."""
    grouped = list(_dataset(info, pool_shards=2, group_by_date=True))
    flat = list(_dataset(info, pool_shards=2))
    assert len(grouped) == len(flat)  # same batch plan: counts, equalising, resume unchanged
    days_per_batch = [len(set(b["date"].tolist())) for b in grouped]
    windows_per_day = BATCH / np.mean(days_per_batch)
    assert windows_per_day > 4  # 2 shards of 3 symbols each: up to 6 windows a day
    assert max(len(set(b["date"].tolist())) for b in flat) > max(days_per_batch)
    # a (pool, day) run is never interrupted: consecutive rows of the stream share the day
    # until it is exhausted
    stream = [d for b in grouped for d in b["date"].tolist()]
    runs = [day for day, _ in itertools.groupby(stream)]
    pools = len(_dataset(info, pool_shards=2)._pools(0))
    assert len(runs) <= len(set(stream)) * pools


def test_grouped_stream_is_seeded_and_resumes_exactly(info: ShardSetInfo):
    def make() -> ShardedWindowDataset:
        dataset = _dataset(info, group_by_date=True)
        dataset.set_epoch(2)
        return dataset

    full = _stream(make())
    assert full == _stream(make())
    assert full != _stream(_dataset(info, group_by_date=True, seed=12))
    interrupted, taken = make(), []
    for batch in interrupted:
        taken.append(batch)
        if len(taken) == 3:
            break
    resumed = make()
    resumed.load_state_dict(interrupted.state_dict())
    assert _keys(taken) + _stream(resumed) == full


def test_group_by_date_needs_the_shuffled_mode(info: ShardSetInfo):
    with pytest.raises(ValueError, match="group_by_date"):
        _dataset(info, "valid", group_by_date=True)
