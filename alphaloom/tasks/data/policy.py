"""What happens to bad input: the `data.on_invalid` policy, short histories, split handling.

Why a policy and not a dead end: a nightly retrain on a vendor's file with three bad rows in
600k should still produce a model that night, and say loudly that it dropped three rows; a feed
that is broken (more than `data.max_invalid_fraction` of its rows) should stop it. Problems of
the instruments file always stop the run: there is no row to drop that would fix them.
"""

from __future__ import annotations

import pandas as pd

from alphaloom.tasks.common.config import DataSection
from alphaloom.tasks.data.checks import DataValidationError
from alphaloom.tasks.data.corporate_actions import adjust_for_splits, detect_splits, ratio_label
from alphaloom.tasks.data.validation import Problem, ValidationReport, examples


def enforce_policy(report: ValidationReport, data: DataSection, instruments_file: str) -> None:
    """Raise DataValidationError (listing every problem, with the report attached) when the
    policy says the run must stop; return quietly when the invalid rows may be dropped."""
    bar_errors = [p for p in report.errors if p.file != instruments_file]
    fatal = [p for p in report.errors if p.file == instruments_file]
    if data.on_invalid == "error" and bar_errors:
        reason = "data.on_invalid is 'error'; set it to 'drop' to quarantine invalid rows"
    elif report.invalid_fraction > data.max_invalid_fraction:
        reason = (
            f"{report.invalid_fraction:.4%} of the rows are invalid, more than "
            f"data.max_invalid_fraction={data.max_invalid_fraction}"
        )
    elif fatal:
        reason = "the instruments file has errors"
    else:
        return
    raise DataValidationError(f"invalid input data ({reason}):\n{report.render()}", report)


def drop_short_histories(
    bars: pd.DataFrame, min_history: int, report: ValidationReport
) -> pd.DataFrame:
    """Drop symbols with fewer than `min_history` bars (they cannot fill one window + label);
    the report gets a note naming them."""
    counts = bars.groupby("symbol", sort=False)["date"].transform("size")
    keep = counts >= min_history
    if keep.all():
        return bars
    n_all = bars["symbol"].nunique()
    dropped = sorted(set(bars.loc[~keep, "symbol"]))
    if not keep.any():
        raise DataValidationError(
            f"bars: none of the {n_all} symbols has the {min_history} rows needed "
            "(window + horizon)",
            report,
        )
    report.add(
        [
            Problem(
                "note",
                "bars",
                "symbol",
                f"dropped {len(dropped)} of {n_all} symbols with fewer than {min_history} rows "
                "(window + horizon)",
                int((~keep).sum()),
                examples(dropped),
            )
        ]
    )
    return bars.loc[keep].reset_index(drop=True)


def handle_splits(
    bars: pd.DataFrame, unadjusted: set[str], data: DataSection, report: ValidationReport
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Detect split-like moves in the symbols without adjustment columns; report each one and
    back-adjust them when `data.detect_splits` is on. Returns (bars, detected splits)."""
    splits = detect_splits(bars, unadjusted)
    action = (
        "adjusted (data.detect_splits)"
        if data.detect_splits
        else ("NOT adjusted: set data.detect_splits: true, or give adj_close / adj_factor")
    )
    for split in splits.itertuples(index=False):
        report.add(
            [
                Problem(
                    "warning",
                    "bars",
                    "close",
                    f"{split.symbol} on {split.date:%Y-%m-%d}: overnight move looks like a "
                    f"{ratio_label(split.ratio)} split; {action}",
                    1,
                    f"previous close / open {split.price_ratio:.3f}, "
                    f"volume x{split.volume_ratio:.2f}",
                )
            ]
        )
    if data.detect_splits:
        bars = adjust_for_splits(bars, splits)
    return bars, splits
