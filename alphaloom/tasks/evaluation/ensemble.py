"""A seed ensemble's predictions: each member scores the whole split, then ranks are averaged.

The ensemble's score of a (symbol, date) is the mean over members of that symbol's percentile
rank among the day's scores (`rank(pct=True)` per date, the convention of smoothing.py), and its
class probabilities are the members' mean. Ranks, not raw scores: members' scores have no common
scale, and everything downstream (Rank IC, the books) uses only the order. The rank is taken
over the day's whole cross-section, never within a batch, so every member scores the whole split
before anything is combined (as `predict` of a SeedEnsemble, registry.predict_registered and
ranking.score_frame do). One member is returned as it is (not ranked), so an ensemble of one
is exactly the single model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from alphaloom.tasks.evaluation.metrics import PROB_COLUMNS, EvaluationError, require_columns

ROW_KEYS = ("symbol", "date")


def day_ranks(frame: pd.DataFrame) -> np.ndarray:
    """Each score's percentile rank among its day's scores, in (0, 1] (NaN stays NaN)."""
    return frame.groupby("date", sort=False)["score"].rank(pct=True).to_numpy(np.float64)


def combine_members(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The first frame with `score` = mean of the members' day ranks and p0..p3 = their mean.

    Frames must hold the same rows in the same order (members scored on the same windows);
    the keys present among (symbol, date) are checked. One frame is returned unchanged.
    """
    if not frames:
        raise EvaluationError("an ensemble needs at least one member's predictions")
    first = frames[0]
    if len(frames) == 1:
        return first
    keys = [key for key in ROW_KEYS if key in first]
    for i, frame in enumerate(frames):
        require_columns(frame, ["date", "score", *keys], f"member {i} predictions")
        same = len(frame) == len(first) and all(
            np.array_equal(frame[key].to_numpy(), first[key].to_numpy()) for key in keys
        )
        if not same:
            raise EvaluationError(f"member {i} scored other rows than member 0")
    score = np.mean([day_ranks(frame) for frame in frames], axis=0)
    out = first.assign(score=score)
    probs = [column for column in PROB_COLUMNS if column in first]
    if probs:
        out[probs] = np.mean([frame[probs].to_numpy(np.float64) for frame in frames], axis=0)
    return out
