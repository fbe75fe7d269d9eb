"""Scoring a shard split with a model: one predictions frame per split, in (date, symbol) order."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from alphaloom.model.batch import NUM_CLASSES, Batch, move_batch
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.evaluation.metrics import (
    EvaluationError,
)

ScoreFn = Callable[[Batch], tuple[np.ndarray, np.ndarray]]


def eval_dataset(
    shard_dir: str | Path,
    split: str | None,
    cfg: PipelineConfig,
    dates: Iterable[Any] | None = None,
) -> Any:
    """The unshuffled loader of a split (or of `dates`), windows in (date, symbol) order."""
    from alphaloom.model.dataset import ShardedWindowDataset

    return ShardedWindowDataset(
        shard_dir,
        split,
        batch_size=cfg.loader.batch_size,
        min_valid_days=cfg.loader.min_valid_days,
        shuffle=False,
        dates=dates,
    )


def torch_scorer(model: torch.nn.Module, device: torch.device | str = "cpu") -> ScoreFn:
    """Score batches with an in-memory network: (its `score`, class probabilities)."""
    device = torch.device(device)
    model = model.to(device).eval()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )

    @torch.no_grad()
    def score(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        with autocast:
            logits = model(move_batch(batch, device)).float()
        probs = torch.softmax(logits, dim=-1)
        return model.score(logits).cpu().numpy(), probs.cpu().numpy()

    return score


# Windows a scorer is called with at once on a CPU: consecutive loader batches (the same windows
# in the same order) concatenated. On a CPU the network scores each window on its own, to the
# same bits at any batch size (checked on every window of a 1500 x 3000 validation split), and a
# call of 8k windows costs ~2x less CPU per window than calls of 512 (the LSTM's per-step
# kernels on small batches; 32k windows: 11-12 s vs 16-29 s of CPU). The price is memory: a
# call's activations are ~0.7 GB at 8k windows (~1.4 GB at 16k, for ~15 % less CPU). On CUDA
# the kernels may depend on the batch size, so an in-memory network there is called with the
# loader's batches, as before.
SCORE_WINDOWS = 8_192


def _chunks(batches: Iterable[Batch], windows: int) -> Iterator[Batch]:
    """The batches in order, consecutive ones concatenated until a chunk holds >= `windows`."""
    pending: list[Batch] = []
    rows = 0
    for batch in batches:
        pending.append(batch)
        rows += len(batch["symbol"])
        if rows >= windows:
            yield _concat(pending)
            pending, rows = [], 0
    if pending:
        yield _concat(pending)


def _concat(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}


def predict_with(
    score_fn: ScoreFn,
    shard_dir: str | Path,
    split: str | None,
    cfg: PipelineConfig,
    dates: Iterable[Any] | None = None,
    windows: int = SCORE_WINDOWS,
) -> pd.DataFrame:
    """Score every window of `split` (or ending on `dates`) with `score_fn`, called with
    consecutive loader batches joined into chunks of at least `windows` windows (1: each
    loader batch on its own).

    Returns one row per window in (date, symbol) order: symbol (str), date (datetime64),
    score (the model's ranking score), p0..p3, label and fwd_return (-1 / NaN when unknown).
    """
    dataset = eval_dataset(shard_dir, split, cfg, dates)
    parts: list[dict[str, np.ndarray]] = []
    for batch in _chunks(dataset, windows):
        score, probs = score_fn(batch)
        parts.append(
            {
                "symbol": batch["symbol"].numpy(),
                "date": batch["date"].numpy(),
                "score": np.asarray(score, dtype=np.float64),
                "probs": np.asarray(probs, dtype=np.float64),
                "label": batch["label"].numpy(),
                "fwd_return": batch["fwd_return"].numpy(),
            }
        )
    if not parts:
        raise EvaluationError(f"split {split!r} of {shard_dir} yielded no window to score")
    return _frame_from_parts(parts, dataset.info.symbols)


def predict(
    model: torch.nn.Module,
    shard_dir: str | Path,
    split: str | None,
    cfg: PipelineConfig,
    device: torch.device | str = "cpu",
    dates: Iterable[Any] | None = None,
) -> pd.DataFrame:
    """`predict_with` for an in-memory network; a seed ensemble is scored member by member
    and combined per day (tasks/evaluation/ensemble.py)."""
    from alphaloom.model.ensemble import members_of

    members = members_of(model)
    if len(members) > 1:
        from alphaloom.tasks.evaluation.ensemble import combine_members

        days = None if dates is None else list(dates)
        return combine_members([predict(m, shard_dir, split, cfg, device, days) for m in members])
    windows = SCORE_WINDOWS if torch.device(device).type == "cpu" else 1
    return predict_with(torch_scorer(model, device), shard_dir, split, cfg, dates, windows)


def _frame_from_parts(parts: list[dict[str, np.ndarray]], symbols: np.ndarray) -> pd.DataFrame:
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    frame = pd.DataFrame(
        {
            "symbol": np.asarray(symbols, dtype=object)[cat["symbol"]].astype(str),
            "date": pd.to_datetime(cat["date"].astype("datetime64[D]")),
            "score": cat["score"],
        }
    )
    for k in range(NUM_CLASSES):
        frame[f"p{k}"] = cat["probs"][:, k]
    frame["label"] = cat["label"].astype(np.int64)
    frame["fwd_return"] = cat["fwd_return"].astype(np.float64)
    return frame
