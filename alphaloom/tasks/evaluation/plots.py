"""Evaluation plots (matplotlib, Agg backend) that the tracker logs to MLflow as PNG artifacts.

Figures are built with the object API (no pyplot state), so tasks running in threads cannot
draw into each other's figures.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_BINS = 10


def _figure(width: float = 7.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def cumulative_return_figure(daily: pd.DataFrame) -> Figure:
    """Cumulative (additive) long-short return, gross and net of costs."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(daily.index, daily["gross"].cumsum(), label="gross")
    ax.plot(daily.index, daily["net"].cumsum(), label="net of costs")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_title("Long-short cumulative return")
    ax.set_ylabel("cumulative return (sum)")
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def topk_excess_figure(daily: pd.DataFrame) -> Figure:
    """The TopkDropout long-only book's cumulative (additive) excess return over the
    equal-weighted universe, gross and net of costs, and its drawdown: how much of the signal
    survives trading, and how deep it fell on the way."""
    fig = _figure(7.0, 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for column, label in (("excess_gross", "gross"), ("excess_net", "net of costs")):
        wealth = daily[column].cumsum()
        top.plot(daily.index, wealth.to_numpy(), label=label)
        bottom.plot(daily.index, drawdown(wealth).to_numpy(), label=label)
    top.axhline(0.0, color="grey", lw=0.5)
    top.set_title("TopkDropout long-only: cumulative excess return")
    top.set_ylabel("cumulative excess (sum)")
    top.legend()
    bottom.set_ylabel("drawdown (sum)")
    bottom.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def drawdown(wealth: pd.Series) -> pd.Series:
    """Additive drawdown of a cumulative return: distance below its running peak (the start,
    0, counts as a peak), as `metrics.portfolio_metrics` measures max drawdown."""
    return wealth - wealth.cummax().clip(lower=0.0)


def ic_figure(rank_ic: pd.Series, window: int = 20) -> Figure:
    """Daily Rank IC with its rolling mean: is the signal stable or one lucky stretch?"""
    fig = _figure()
    ax = fig.add_subplot()
    ax.bar(rank_ic.index, rank_ic.to_numpy(), width=1.0, alpha=0.4, label="daily Rank IC")
    rolling = rank_ic.rolling(window, min_periods=1).mean()
    ax.plot(rolling.index, rolling.to_numpy(), color="C1", label=f"{window}-day mean")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_title(f"Rank IC over time (mean {rank_ic.mean():.4f})")
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def confusion_figure(cm: np.ndarray) -> Figure:
    """Row-normalised confusion matrix with raw counts annotated."""
    fig = _figure(5.0, 4.5)
    ax = fig.add_subplot()
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_xticks(range(cm.shape[1]))
    ax.set_yticks(range(cm.shape[0]))
    ax.set_title("Confusion matrix (row-normalised)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def calibration_figure(probs: np.ndarray, labels: np.ndarray) -> Figure:
    """Reliability curve per class: mean predicted p_k against observed frequency of class k."""
    fig = _figure(5.5, 5.0)
    ax = fig.add_subplot()
    edges = np.linspace(0.0, 1.0, _BINS + 1)
    for k in range(probs.shape[1]):
        p = probs[:, k]
        hit = (labels == k).astype(float)
        bins = np.clip(np.digitize(p, edges) - 1, 0, _BINS - 1)
        count = np.bincount(bins, minlength=_BINS)
        keep = count > 0
        mean_p = np.bincount(bins, weights=p, minlength=_BINS)[keep] / count[keep]
        freq = np.bincount(bins, weights=hit, minlength=_BINS)[keep] / count[keep]
        ax.plot(mean_p, freq, marker="o", label=f"class {k}")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title("Class-probability calibration")
    ax.legend()
    fig.tight_layout()
    return fig


def quantile_return_figure(table: pd.DataFrame) -> Figure:
    """Mean daily forward return per score quantile, in basis points: does the score sort
    returns monotonically, or only at one end?"""
    fig = _figure(5.5, 4.0)
    ax = fig.add_subplot()
    bps = table["mean_return"].to_numpy(dtype=float) * 1e4
    colors = ["C3" if value < 0 else "C2" for value in bps]
    positions = np.arange(len(bps))
    ax.bar(positions, bps, color=colors)
    ax.set_xticks(positions, [str(int(q)) for q in table["quantile"]])
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("score quantile (1 = lowest)")
    ax.set_ylabel("mean forward return (bps)")
    ax.set_title("Forward return by score quantile")
    fig.tight_layout()
    return fig


def evaluation_figures(
    daily: pd.DataFrame,
    rank_ic: pd.Series,
    cm: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    quantiles: pd.DataFrame | None = None,
    topk_daily: pd.DataFrame | None = None,
) -> dict[str, Figure]:
    """All evaluation figures keyed by their artifact file name."""
    figures = {
        "long_short_cumulative.png": cumulative_return_figure(daily),
        "rank_ic_over_time.png": ic_figure(rank_ic),
        "confusion_matrix.png": confusion_figure(cm),
        "calibration.png": calibration_figure(probs, labels),
    }
    if quantiles is not None:
        figures["quantile_returns.png"] = quantile_return_figure(quantiles)
    if topk_daily is not None:
        figures["topk_excess_cumulative.png"] = topk_excess_figure(topk_daily)
    return figures
