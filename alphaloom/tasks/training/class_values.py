"""What each class is worth when ranking: its mean per-day rank of the forward return in training.

The classes are unequal slices of each day's cross-section (30/30/30/10 % with the default
edges), so scoring a stock by its expected class index sum_k k * p_k treats the step from class 2
to the top decile like the step from class 0 to class 1, and rewards probability in both tails
(volatile stocks). Fitted values put each class where its returns actually rank: with the default
edges about -0.35, -0.05, 0.25, 0.45 as centred percentiles.
"""

from __future__ import annotations

import numpy as np

from alphaloom.model.batch import NUM_CLASSES
from alphaloom.model.shard_format import SPLIT_CODES
from alphaloom.model.shard_set import ShardSetInfo


def centred_day_ranks(days: np.ndarray, returns: np.ndarray) -> np.ndarray:
    """Each return's percentile rank among its day's returns, centred: (rank + 1/2)/n - 1/2."""
    order = np.lexsort((returns, days))
    sorted_days = days[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_days)) + 1]
    counts = np.diff(np.r_[starts, len(order)])
    position = np.arange(len(order)) - np.repeat(starts, counts)
    ranks = np.empty(len(order), dtype=np.float64)
    ranks[order] = (position + 0.5) / np.repeat(counts, counts) - 0.5
    return ranks


def class_values_from(labels: np.ndarray, days: np.ndarray, returns: np.ndarray) -> np.ndarray:
    """Mean centred day rank of the forward return per class (labelled rows only).

    Raises ValueError when a class is absent or the values do not increase with the class
    (then the labels do not order returns and no monotone score can be fitted).
    """
    known = (labels >= 0) & np.isfinite(returns)
    labels, days, returns = labels[known], days[known], returns[known]
    ranks = centred_day_ranks(days, returns)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if (counts == 0).any():
        raise ValueError(f"every class needs training rows to fit its value; counts {counts}")
    values = np.bincount(labels, weights=ranks, minlength=NUM_CLASSES) / counts
    if not (np.diff(values) > 0).all():
        raise ValueError(f"class values do not increase with the class: {values.round(4)}")
    return values


def fit_class_values(info: ShardSetInfo) -> np.ndarray:
    """`class_values_from` over the training split of a shard set (reads its label columns)."""
    parts = [info.read_shard(s) for s in range(len(info.shards))]
    train = [p.split == SPLIT_CODES["train"] for p in parts]
    labels = np.concatenate([p.label[m] for p, m in zip(parts, train, strict=True)])
    days = np.concatenate([p.date[m] for p, m in zip(parts, train, strict=True)])
    returns = np.concatenate([p.fwd_return[m] for p, m in zip(parts, train, strict=True)])
    return class_values_from(labels.astype(np.int64), days.astype(np.int64), returns)
