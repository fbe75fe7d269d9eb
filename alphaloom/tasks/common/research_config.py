"""evaluate and backtest: how a model's scores are judged, traded and walked forward.

Apart from tasks/common/config.py (which composes them) because the strategy's defaults and the
walk-forward's planning rules are research settings that change together, chosen by the
walk-forward numbers in docs/benchmark.md.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import Field, model_validator

from alphaloom.tasks.common.config_section import Section

# The strategy's defaults, in one place, chosen by the walk-forward on sp500-dev
# (benchmarks/walk_forward.py, docs/benchmark.md "Walk-forward"): of 16 (topk, n_drop) books x 5
# half-lives, the best mean net IR over 3 seeds on periods 1-3; on the held-out periods 4-6 it
# kept its lead over Qlib's (50, 5) without smoothing (net IR -0.16 vs -0.56), though still
# below zero: at 10 bp a side no setting made the signal pay on those days.
DEFAULT_TOPK = 10
DEFAULT_N_DROP = 1
DEFAULT_SMOOTHING_HALF_LIFE = 5.0


class EvaluateSection(Section):
    """Metrics and the books they trade: the decile long-short (`long_short_quantile`) and
    Qlib's TopkDropout (hold `topk`, replace at most `n_drop` a day), both at `cost_bps` per side.

    With `smoothing_half_life` > 0 both books trade the causal EMA of the daily score ranks
    (tasks/evaluation/smoothing.py), while the IC family stays the model's raw score.
    """

    long_short_quantile: float = Field(0.1, gt=0.0, le=0.5)
    cost_bps: float = Field(10.0, ge=0.0, description="cost in bp per side of traded weight")
    annualization_days: int = Field(252, ge=1)
    topk: int = Field(DEFAULT_TOPK, ge=1, description="TopkDropout: names held per leg")
    n_drop: int = Field(
        DEFAULT_N_DROP, ge=0, description="TopkDropout: most names replaced a day (<= topk)"
    )
    smoothing_half_life: float = Field(
        DEFAULT_SMOOTHING_HALF_LIFE,
        ge=0.0,
        allow_inf_nan=False,
        description="half-life in market days of the score EMA the books trade; 0 = off",
    )

    @model_validator(mode="after")
    def _drop_within_book(self) -> EvaluateSection:
        if self.n_drop > self.topk:
            raise ValueError(
                f"evaluate.n_drop ({self.n_drop}) must be <= evaluate.topk ({self.topk})"
            )
        return self


class BacktestSection(Section):
    """Walk-forward backtest (`alphaloom backtest`, tasks/backtest/periods.py): retrain every
    `retrain_months` on the data before the period and score the period out of sample.

    Each period validates (early stopping) on the `valid_months` before it and trains on what
    comes before that: from the first day ("expanding") or on the last `train_months` only
    ("rolling"). The first period starts `train_months + valid_months` after the data's first
    day unless `start` says otherwise; `end` (optional) is the last day scored.
    """

    retrain_months: int = Field(3, ge=1, le=120)
    window: Literal["expanding", "rolling"] = "expanding"
    train_months: int = Field(24, ge=1, description="rolling: every period's; expanding: the first")
    valid_months: int = Field(3, ge=1)
    start: dt.date | None = None
    end: dt.date | None = None
    min_test_days: int = Field(
        21, ge=1, description="a shorter last period joins the previous one (or is dropped)"
    )
    short_last_period: Literal["join", "drop"] = Field(
        "join", description="join: scored by the previous period's model, no retrain of its own"
    )
    lightgbm: bool = Field(True, description="also retrain and score the LightGBM baseline")
    lightgbm_params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _start_before_end(self) -> BacktestSection:
        if self.start and self.end and self.end <= self.start:
            raise ValueError("backtest.end must be after backtest.start")
        return self
