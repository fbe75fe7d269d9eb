"""Ordered (evaluation) loading in date blocks: the same batches, row for row, as one panel.

Evaluation, scoring and registration read a split's windows in (date, symbol) order. On a large
market the panel of every window of a split does not fit in a bounded budget, so the loader loads
it in blocks of days (model/dataset.py `ordered_blocks`); these tests make the blocks tiny and
check that batches, predictions and metrics do not change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from alphaloom.model.dataset import ShardedWindowDataset, ordered_blocks
from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.config import EvaluateSection, ShardsSection
from alphaloom.tasks.dataset.shards import build_shards
from alphaloom.tasks.evaluation.evaluate import evaluate_predictions
from alphaloom.tasks.evaluation.predictions import _frame_from_parts
from tests.shards_testdata import make_table

WINDOW = 10


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    table = make_table(n_symbols=30, n_days=220, seed=3)
    return Path(
        build_shards(
            table.frame,
            table.feature_names,
            table.stats,
            table.split_dates,
            table.instruments,
            table.text,
            ShardsSection(window=WINDOW, n_shards=3),
            tmp_path_factory.mktemp("shards"),
            "src",
        )
    )


def _batches(shard_dir: Path, split, rows: int | None, **kw) -> tuple[list[dict], object]:
    dataset = ShardedWindowDataset(
        shard_dir, split, batch_size=37, min_valid_days=3, shuffle=False, max_panel_rows=rows, **kw
    )
    return list(iter(dataset)), dataset


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("rows", [60, 1000])
def test_blocks_give_the_batches_of_one_panel(shard_dir, split, rows) -> None:
    whole, _ = _batches(shard_dir, split, None)
    blocked, dataset = _batches(shard_dir, split, rows)
    assert len(ordered_blocks(dataset)) > 1  # the test really cuts the split
    assert len(blocked) == len(whole) > 0
    for a, b in zip(whole, blocked, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_blocks_with_dates_and_consumers(shard_dir) -> None:
    info = ShardSetInfo.open(shard_dir)
    days = pd.date_range("2021-06-01", "2021-10-15", freq="D")
    for world in (1, 2, 3):
        for rank in range(world):
            kw = {"dates": days, "rank": rank, "world_size": world, "equalize": False}
            whole, _ = _batches(shard_dir, None, None, **kw)
            blocked, dataset = _batches(shard_dir, None, 50, **kw)
            assert len(ordered_blocks(dataset)) > 1
            assert len(blocked) == len(whole)
            for a, b in zip(whole, blocked, strict=True):
                assert torch.equal(a["x"], b["x"]) and torch.equal(a["date"], b["date"])
    assert info.window == WINDOW


def test_evaluation_in_blocks_gives_the_metrics_of_one_panel(shard_dir) -> None:
    """Metrics of predictions scored block by block equal those of one panel, exactly."""
    info = ShardSetInfo.open(shard_dir)
    weights = torch.linspace(-1, 1, info.n_features)

    def predictions(rows: int | None) -> pd.DataFrame:
        parts = []
        for batch in _batches(shard_dir, "test", rows)[0]:
            score = (batch["x"][:, -1, :] * weights).sum(-1)
            probs = torch.softmax(torch.stack([score * k for k in range(4)], -1), -1)
            parts.append(
                {
                    "symbol": batch["symbol"].numpy(),
                    "date": batch["date"].numpy(),
                    "score": score.double().numpy(),
                    "probs": probs.double().numpy(),
                    "label": batch["label"].numpy(),
                    "fwd_return": batch["fwd_return"].numpy(),
                }
            )
        return _frame_from_parts(parts, info.symbols)

    whole, blocked = predictions(None), predictions(40)
    pd.testing.assert_frame_equal(whole, blocked, check_exact=True)
    a, _ = evaluate_predictions(whole, EvaluateSection(), with_figures=False)
    b, _ = evaluate_predictions(blocked, EvaluateSection(), with_figures=False)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key] or (np.isnan(a[key]) and np.isnan(b[key])), key
