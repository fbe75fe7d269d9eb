"""Class values fitted on the training split: each class's mean per-day rank of the return."""

from __future__ import annotations

import numpy as np
import pytest

from alphaloom.tasks.training.class_values import centred_day_ranks, class_values_from


def test_centred_day_ranks_are_per_day_percentiles():
    days = np.array([2, 1, 2, 1, 1])
    returns = np.array([0.5, 0.1, -0.5, 0.3, 0.2])
    ranks = centred_day_ranks(days, returns)
    np.testing.assert_allclose(ranks, [0.25, -1 / 3, -0.25, 1 / 3, 0.0])


def test_quantile_classes_get_their_slices_mean_rank():
    """With classes cut at the 0.3/0.6/0.9 quantiles of each day, class k's value is the middle
    of its slice of the cross-section: -0.35, -0.05, 0.25, 0.45 (not evenly spaced)."""
    rng = np.random.default_rng(0)
    days = np.repeat(np.arange(50), 200)
    returns = rng.standard_normal(len(days))
    ranks = centred_day_ranks(days, returns) + 0.5
    labels = np.digitize(ranks, [0.3, 0.6, 0.9])
    labels[:7] = -1  # unknown labels are ignored
    values = class_values_from(labels, days, returns)
    np.testing.assert_allclose(values, [-0.35, -0.05, 0.25, 0.45], atol=0.01)


def test_labels_that_do_not_order_returns_are_an_error():
    rng = np.random.default_rng(1)
    days = np.repeat(np.arange(20), 40)
    returns = rng.standard_normal(len(days))
    ranks = centred_day_ranks(days, returns) + 0.5
    reversed_labels = 3 - np.digitize(ranks, [0.3, 0.6, 0.9])  # "best" = the worst returns
    with pytest.raises(ValueError, match="do not increase"):
        class_values_from(reversed_labels, days, returns)
    with pytest.raises(ValueError, match="needs training rows"):
        class_values_from(np.zeros(10, dtype=np.int64), np.zeros(10), np.arange(10.0))
