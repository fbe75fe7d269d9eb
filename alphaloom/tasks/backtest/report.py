"""The backtest's verdict: per-period and overall figures of the concatenated out-of-sample
predictions, the network against LightGBM period by period, logged to the parent run.

Every figure comes from one daily series per model, built once on the whole out-of-sample
history with the evaluation's functions (tasks/evaluation/): the daily IC / Rank IC of the raw
score, the factor-neutral Rank IC (with the market's exposures), the daily long-short book after
costs (`long_short_returns`: top / bottom `evaluate.long_short_quantile` by score,
`evaluate.cost_bps` per unit of turnover) and the TopkDropout books (`topk_dropout_returns`:
`evaluate.topk` held, at most `evaluate.n_drop` replaced a day). With
`evaluate.smoothing_half_life` > 0 both books trade the EMA of the daily score ranks, smoothed
causally over the concatenated series, so a period's first days carry the previous period's
history as they would in production. A period's row is each series over its test days, so the
first day of a period pays for turning the previous model's book into the new one's; the "all"
row is the whole series. Turnover is the mean daily sum |w_t - w_{t-1}| (the decile book: both
legs, 2.0 = the whole book replaced once; the TopkDropout long book: its one leg, 2.0 likewise).
The Rank IC difference comes with the t-statistic of its daily values.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from alphaloom.tasks.common.config import EvaluateSection, PipelineConfig
from alphaloom.tasks.evaluation.metrics import (
    daily_ic,
    ic_summary,
    labelled_rows,
    long_short_returns,
    paired_t,
    portfolio_metrics,
)
from alphaloom.tasks.evaluation.neutral import FACTORS, neutral_daily_rank_ic
from alphaloom.tasks.evaluation.portfolio import topk_dropout_metrics, topk_dropout_returns
from alphaloom.tasks.evaluation.smoothing import smooth_scores
from alphaloom.tasks.tracking import runs, store

MODELS = ("network", "lightgbm")
MARKDOWN_NAME = "backtest.md"
TAG_WALL = "alphaloom.wall_seconds"


@dataclass
class DailySeries:
    """One model's daily out-of-sample figures, indexed by date."""

    rank_ic: pd.Series
    ic: pd.Series
    book: pd.DataFrame  # gross, turnover, cost, net
    topk: pd.DataFrame  # portfolio.DAILY_COLUMNS
    rank_ic_neutral: pd.Series | None = None  # with the market's exposures
    rank_ic_smoothed: pd.Series | None = None  # with smoothing on


def concatenate(
    loaded: Sequence[tuple[Mapping[str, Any], Mapping[str, pd.DataFrame]]],
) -> tuple[list[dict[str, Any]], dict[str, pd.DataFrame]]:
    """(periods, {model: out-of-sample predictions of every period, with a `period` column})
    of the finished periods' (period.json, predictions); a model is kept if every period has
    it (a LightGBM installed half-way would otherwise compare different days)."""
    periods = [dict(record["period"]) for record, _ in loaded]
    models = [m for m in MODELS if all(m in preds for _, preds in loaded)]
    frames = {
        model: pd.concat(
            [preds[model].assign(period=record["period"]["number"]) for record, preds in loaded],
            ignore_index=True,
        )
        for model in models
    }
    return periods, frames


def daily_series(
    preds: pd.DataFrame, cfg: EvaluateSection, exposures: pd.DataFrame | None = None
) -> DailySeries:
    """The daily Rank IC and IC of the raw score, its neutral Rank IC when `exposures` carry
    the factors, and the books (decile long-short, TopkDropout) on the traded score: the raw
    one, or its causal EMA over the whole concatenated frame when smoothing is on."""
    traded = labelled_rows(smooth_scores(preds, cfg.smoothing_half_life))
    neutral = None
    if exposures is not None and all(c in exposures for c in (*FACTORS, "industry")):
        neutral = neutral_daily_rank_ic(preds, exposures)
    return DailySeries(
        rank_ic=daily_ic(preds, "spearman"),
        ic=daily_ic(preds, "pearson"),
        book=long_short_returns(traded, cfg.long_short_quantile, cfg.cost_bps),
        topk=topk_dropout_returns(traded, cfg.topk, cfg.n_drop, cfg.cost_bps),
        rank_ic_neutral=neutral,
        rank_ic_smoothed=daily_ic(traded, "spearman") if cfg.smoothing_half_life else None,
    )


def _between(frame: pd.Series | pd.DataFrame, first: Any, last: Any) -> Any:
    index = pd.DatetimeIndex(frame.index)
    return frame[(index >= pd.Timestamp(first)) & (index <= pd.Timestamp(last))]


TOPK_COLUMNS = (
    "topk_excess_ann_return_net",
    "topk_excess_ir_net",
    "topk_excess_turnover",
    "topk_ls_sharpe_net",
)


def span_metrics(series: DailySeries, first: Any, last: Any, cfg: EvaluateSection) -> dict:
    """Rank IC, its IR, IC, the decile book's net return, Sharpe, drawdown and turnover, the
    TopkDropout books' `TOPK_COLUMNS`, and the neutral / smoothed Rank IC where the series has
    them, over the days from `first` to `last`."""
    rank_ic, rank_icir = ic_summary(_between(series.rank_ic, first, last))
    ic, _ = ic_summary(_between(series.ic, first, last))
    book = portfolio_metrics(_between(series.book, first, last), cfg.annualization_days)
    topk = topk_dropout_metrics(_between(series.topk, first, last), cfg.annualization_days)
    out = {"rank_ic": rank_ic, "rank_icir": rank_icir, "ic": ic, **book}
    out.update({key: topk[key] for key in TOPK_COLUMNS})
    if series.rank_ic_neutral is not None:
        out["rank_ic_neutral"] = ic_summary(_between(series.rank_ic_neutral, first, last))[0]
    if series.rank_ic_smoothed is not None:
        out["rank_ic_smoothed"] = ic_summary(_between(series.rank_ic_smoothed, first, last))[0]
    return out


def paired_difference(a: pd.Series, b: pd.Series) -> tuple[float, float, int]:
    """Mean daily a - b over the days both have, its t-statistic (`paired_t`) and the number
    of days."""
    diff = (a - b).dropna()
    _, t_stat, days = paired_t(diff)
    return float(diff.mean()), t_stat, days  # the mean of a single day too


def oracle_daily(preds: pd.DataFrame, oracle: pd.DataFrame | None) -> pd.Series | None:
    """Daily Rank IC of the synthetic market's true expected return on the scored rows."""
    if oracle is None:
        return None
    rows = preds[["symbol", "date", "fwd_return"]].merge(
        oracle[["symbol", "date", "expected_return"]].assign(
            date=lambda f: pd.to_datetime(f["date"]).dt.normalize()
        ),
        on=["symbol", "date"],
        how="inner",
    )
    return daily_ic(rows, "spearman", score="expected_return")


def period_rows(
    periods: Sequence[Mapping[str, Any]],
    preds: Mapping[str, pd.DataFrame],
    cfg: EvaluateSection,
    oracle: pd.DataFrame | None = None,
    exposures: pd.DataFrame | None = None,
    series: Mapping[str, DailySeries] | None = None,
) -> pd.DataFrame:
    """One row per period plus the "all" row: each model's figures, their Rank IC difference
    (network - LightGBM) with its daily t, and the oracle's Rank IC when there is one.
    `series` (`daily_series` of each model, with the same `exposures`) saves recomputing them."""
    if series is None:
        series = {model: daily_series(frame, cfg, exposures) for model, frame in preds.items()}
    truth = oracle_daily(preds["network"], oracle)
    spans = [(str(p["number"]), p["test_start"], p["test_end"]) for p in periods]
    spans.append(("all", periods[0]["test_start"], periods[-1]["test_end"]))
    rows = []
    for name, first, last in spans:
        row: dict[str, Any] = {"period": name, "test_start": first, "test_end": last}
        row["days"] = len(_between(series["network"].rank_ic, first, last))
        for model, daily in series.items():
            row.update(
                {f"{model}_{k}": v for k, v in span_metrics(daily, first, last, cfg).items()}
            )
        if "lightgbm" in series:
            mean, t, _ = paired_difference(
                _between(series["network"].rank_ic, first, last), series["lightgbm"].rank_ic
            )
            row["rank_ic_difference"], row["rank_ic_difference_t"] = mean, t
        if truth is not None:
            row["oracle_rank_ic"] = ic_summary(_between(truth, first, last))[0]
        rows.append(row)
    return pd.DataFrame(rows)


def _num(value: Any, decimals: int = 4) -> str:
    if value is None or not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{decimals}f}"


def _excess(row: Mapping[str, Any], model: str) -> str:
    """ "return (IR)" of a model's TopkDropout long-only book, net of costs."""
    ann = _num(row.get(f"{model}_topk_excess_ann_return_net"), 3)
    return f"{ann} ({_num(row.get(f'{model}_topk_excess_ir_net'), 2)})"


def backtest_markdown(table: pd.DataFrame, cfg: PipelineConfig) -> str:
    """The per-period table (period, model Rank IC, LightGBM Rank IC, difference, L-S net
    returns, turnover; the TopkDropout books' net excess return (IR), turnover and long-short
    net Sharpe; the neutral Rank IC when measured) with a line saying how it was made."""
    bt, ev = cfg.backtest, cfg.evaluate
    window = (
        f"rolling {bt.train_months}-month training window"
        if bt.window == "rolling"
        else f"expanding training window (first {bt.train_months} months)"
    )
    oracle = "oracle_rank_ic" in table
    neutral = "network_rank_ic_neutral" in table
    header = [
        "period", "test period", "days", "network Rank IC", "LightGBM Rank IC", "difference (t)",
        "network L-S net ann.", "LightGBM L-S net ann.", "network turnover", "LightGBM turnover",
        "network TopK net excess ann. (IR)", "LightGBM TopK net excess ann. (IR)",
        "network TopK turnover", "LightGBM TopK turnover",
        "network TopK L-S net Sharpe", "LightGBM TopK L-S net Sharpe",
    ] + (["network neutral Rank IC", "LightGBM neutral Rank IC"] if neutral else []) + (
        ["oracle Rank IC"] if oracle else []
    )  # fmt: skip
    smoothing = (
        f"; the books trade the score's rank EMA (half-life {ev.smoothing_half_life:g} days)"
        if ev.smoothing_half_life
        else ""
    )
    intro = (
        f"Walk-forward backtest: retrained every {bt.retrain_months} months on an {window}, "
        f"validated (early stopping) on the {bt.valid_months} months before each period; "
        f"long-short top/bottom {ev.long_short_quantile:.0%} daily after {ev.cost_bps:g} bps "
        "per unit turnover; turnover = mean daily sum |dw| over both legs. TopK: TopkDropout "
        f"holding {ev.topk}, replacing at most {ev.n_drop} a day, long-only excess over the "
        "equal-weighted universe (turnover of its one leg) and long-short, after the same "
        f"costs{smoothing}. Rank IC is the model's raw score"
        + ("; neutral: after volatility, size, 5-day reversal and industry." if neutral else ".")
    )
    cells_by_row = []
    for row in table.to_dict(orient="records"):
        bold = "**" if row["period"] == "all" else ""
        cells = [
            f"{bold}{row['period']}{bold}",
            f"{row['test_start']}..{row['test_end']}",
            str(row["days"]),
            _num(row.get("network_rank_ic")),
            _num(row.get("lightgbm_rank_ic")),
            f"{_num(row.get('rank_ic_difference'))} ({_num(row.get('rank_ic_difference_t'), 2)})",
            _num(row.get("network_ls_ann_return"), 3),
            _num(row.get("lightgbm_ls_ann_return"), 3),
            _num(row.get("network_ls_turnover"), 3),
            _num(row.get("lightgbm_ls_turnover"), 3),
            *[_excess(row, model) for model in MODELS],
            *[_num(row.get(f"{model}_topk_excess_turnover"), 3) for model in MODELS],
            *[_num(row.get(f"{model}_topk_ls_sharpe_net"), 2) for model in MODELS],
        ]
        if neutral:
            cells += [_num(row.get(f"{model}_rank_ic_neutral")) for model in MODELS]
        cells += [_num(row.get("oracle_rank_ic"))] if oracle else []
        cells_by_row.append(cells)
    body = pd.DataFrame(cells_by_row, columns=header).to_markdown(
        index=False, tablefmt="pipe", disable_numparse=True
    )
    return f"{intro}\n\n{body}\n"


def backtest_figure(table: pd.DataFrame, series: Mapping[str, DailySeries]) -> Figure:
    """Rank IC per period of each model, each model's cumulative net decile long-short return,
    and its TopkDropout long-only cumulative excess return, net of costs."""
    figure = Figure(figsize=(15, 4))
    FigureCanvasAgg(figure)
    bars, lines, topk = figure.subplots(1, 3)
    periods = table[table["period"] != "all"]
    x = np.arange(len(periods))
    for offset, model in zip((-0.2, 0.2), series, strict=False):
        bars.bar(x + offset, periods[f"{model}_rank_ic"], width=0.4, label=model)
        net = series[model].book["net"].cumsum()
        lines.plot(net.index, net.to_numpy(), label=model)
        excess = series[model].topk["excess_net"].cumsum()
        topk.plot(excess.index, excess.to_numpy(), label=model)
    bars.set(xticks=x, xticklabels=periods["period"], xlabel="period", ylabel="Rank IC")
    lines.set(xlabel="date", ylabel="cumulative net L-S return (sum)")
    topk.set(xlabel="date", ylabel="cumulative net TopK excess return (sum)")
    for axes in (bars, lines, topk):
        axes.legend()
    figure.tight_layout()
    return figure


HEADLINE = ("rank_ic", "rank_icir", "ic", "ls_ann_return", "ls_sharpe", "max_drawdown",
            "ls_turnover", *TOPK_COLUMNS)  # fmt: skip
OPTIONAL = ("rank_ic_neutral", "rank_ic_smoothed")  # logged when the table has them
PER_PERIOD = ("_rank_ic", "_ls_ann_return", "_ls_turnover", "_topk_excess_ann_return_net",
              "_topk_excess_ir_net", "_topk_excess_turnover", "_topk_ls_sharpe_net",
              "_rank_ic_neutral", "_rank_ic_smoothed")  # fmt: skip


def parent_metrics(table: pd.DataFrame) -> tuple[dict[str, float], list[tuple[int, dict]]]:
    """(overall metrics, per-period metrics by step) of the parent run: `test/<metric>` for the
    network's whole out-of-sample history, `test/lightgbm_<metric>` for the baseline's."""
    overall = table[table["period"] == "all"].iloc[0]
    keys = [*HEADLINE, *(k for k in OPTIONAL if f"network_{k}" in table)]
    flat = {f"test/{k}": overall[f"network_{k}"] for k in keys}
    if "lightgbm_rank_ic" in table:
        flat.update({f"test/lightgbm_{k}": overall[f"lightgbm_{k}"] for k in keys})
        flat["test/rank_ic_difference"] = overall["rank_ic_difference"]
        flat["test/rank_ic_difference_t"] = overall["rank_ic_difference_t"]
    steps = []
    for row in table[table["period"] != "all"].to_dict(orient="records"):
        keys = [c for c in row if c.endswith(PER_PERIOD)]
        steps.append((int(row["period"]), {f"period/{k}": float(row[k]) for k in keys}))
    return flat, steps


def log_backtest(
    cfg: PipelineConfig,
    parent_run_id: str,
    periods: Sequence[Mapping[str, Any]],
    preds: Mapping[str, pd.DataFrame],
    oracle: pd.DataFrame | None = None,
    wall_seconds: float | None = None,
    exposures: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Build the table from the concatenated predictions and log it (backtest.md, .csv, .png,
    the predictions, metrics) to the parent run; return the flow's summary. `wall_seconds` of
    the invocation that first finishes the backtest (after a crash: its last leg) is a tag;
    `exposures` (`neutral.market_exposures`) add the neutral Rank IC."""
    series = {model: daily_series(frame, cfg.evaluate, exposures) for model, frame in preds.items()}
    table = period_rows(periods, preds, cfg.evaluate, oracle, series=series)
    markdown = backtest_markdown(table, cfg)
    flat, steps = parent_metrics(table)
    run = runs.TrackedRun.of(cfg, parent_run_id)
    run.log_metrics(flat)
    for step, metrics in steps:
        run.log_metrics(metrics, step=step)
    if wall_seconds is not None and TAG_WALL not in run.client.get_run(run.run_id).data.tags:
        run.set_tags({TAG_WALL: f"{wall_seconds:.0f}"})
    run.log_text(markdown, MARKDOWN_NAME)
    run.log_text(table.to_csv(index=False), "backtest.csv")
    run.log_figure(backtest_figure(table, series), "backtest.png")
    with tempfile.TemporaryDirectory(prefix="alphaloom-backtest-") as tmp:
        for model, frame in preds.items():
            frame.to_parquet(Path(tmp) / f"{model}.parquet", index=False)
        run.log_artifacts(tmp, "predictions")
    return {
        "parent_run_id": parent_run_id,
        "experiment": cfg.tracking.experiment,
        "markdown": markdown,
        "table": table.to_dict(orient="records"),
        "metrics": {k: float(v) for k, v in flat.items()},
    }


def markdown_of_run(cfg: PipelineConfig, parent_run_id: str) -> str:
    """The `backtest.md` table of a finished backtest parent run (for docs/benchmark.md)."""
    import mlflow

    store.client_for(cfg)  # points MLflow at the configured store
    try:
        return mlflow.artifacts.load_text(f"runs:/{parent_run_id}/{MARKDOWN_NAME}")
    except Exception as err:
        raise LookupError(
            f"run {parent_run_id} in {store.resolve_tracking_uri(cfg)} has no {MARKDOWN_NAME}: "
            f"is it a finished backtest parent run? ({type(err).__name__}: {err})"
        ) from err
