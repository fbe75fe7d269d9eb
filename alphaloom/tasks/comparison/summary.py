"""The comparison table: mean and spread per variant, paired gains, markdown, CSV, chart.

Also the parent run's plan and its logged table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.comparison.compare import (
    GAIN_METRIC,
    ORACLE_METRIC,
    REFERENCE,
    TABLE_COLUMNS,
    TAG_KIND,
    VariantOutcome,
)
from alphaloom.tasks.comparison.variants import Variant
from alphaloom.tasks.evaluation.metrics import paired_t
from alphaloom.tasks.tracking.runs import TrackedRun


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the finite values; std NaN with fewer than two."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan
    std = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    return float(finite.mean()), std


def paired_gain(
    reference: Sequence[VariantOutcome], other: Sequence[VariantOutcome], metric: str = GAIN_METRIC
) -> tuple[float, float, int]:
    """Mean and std of reference - other per seed, over seeds where both finished; and n."""
    ref = {o.seed: o.metrics.get(metric, math.nan) for o in reference if o.status == "finished"}
    diffs = [
        ref[o.seed] - o.metrics.get(metric, math.nan)
        for o in other
        if o.status == "finished" and o.seed in ref
    ]
    diffs = [d for d in diffs if math.isfinite(d)]
    mean, std = _mean_std(diffs)
    return mean, std, len(diffs)


def paired_daily_test(
    reference: Sequence[VariantOutcome], other: Sequence[VariantOutcome], split: str = "test"
) -> tuple[float, float, int]:
    """Per-day paired test of reference - other in daily Rank IC: (mean daily difference,
    its t-statistic = mean / (std / sqrt(days)), days).

    Each day's difference is averaged over the seeds where both variants finished (days every
    such seed scored), so the test asks whether the gain holds day after day, not just on
    average over a few seeds. NaN with fewer than two days.
    """
    ref = {o.seed: o.daily_rank_ic.get(split, {}) for o in reference if o.status == "finished"}
    pairs = [
        (ref[o.seed], o.daily_rank_ic.get(split, {}))
        for o in other
        if o.status == "finished" and o.seed in ref
    ]
    if not pairs:
        return math.nan, math.nan, 0
    days = sorted(set.intersection(*(set(a) & set(b) for a, b in pairs)))
    if len(days) < 2:
        return math.nan, math.nan, len(days)
    return paired_t(np.mean([[a[d] - b[d] for d in days] for a, b in pairs], axis=0))


def _status(outcomes: Sequence[VariantOutcome], skipped: str | None) -> tuple[str, str | None]:
    if skipped is not None:
        return "skipped", skipped
    failed = [o for o in outcomes if o.status == "failed"]
    if not failed:
        return "ok", None
    return "failed", "; ".join(sorted({o.error or "unknown error" for o in failed}))


def summarise(
    variants: Sequence[Variant],
    outcomes: Sequence[VariantOutcome],
    skipped: Mapping[str, str] | None = None,
    reference: str = REFERENCE,
) -> list[dict[str, Any]]:
    """One row per variant: status, mean/std of the table metrics, paired gain of the reference."""
    skipped = skipped or {}
    by_name: dict[str, list[VariantOutcome]] = {v.name: [] for v in variants}
    for outcome in outcomes:
        by_name.setdefault(outcome.variant, []).append(outcome)
    ref_outcomes = by_name.get(reference, [])
    rows = []
    for variant in variants:
        runs = sorted(by_name[variant.name], key=lambda o: o.seed)
        done = [o for o in runs if o.status == "finished"]
        status, error = _status(runs, skipped.get(variant.name))
        row: dict[str, Any] = {
            "variant": variant.name,
            "kind": variant.kind,
            "status": status,
            "seeds_ok": len(done),
            "seeds_failed": len(runs) - len(done),
            "overrides": " ".join(variant.overrides),
            "description": variant.description,
        }
        for key, _, _ in TABLE_COLUMNS:
            mean, std = _mean_std([o.metrics.get(key, math.nan) for o in done])
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        has_gain = variant.name != reference and ref_outcomes
        gain = paired_gain(ref_outcomes, runs) if has_gain else (math.nan, math.nan, 0)
        row["gain_mean"], row["gain_std"], row["gain_n"] = gain
        daily = paired_daily_test(ref_outcomes, runs) if has_gain else (math.nan, math.nan, 0)
        row["daily_gain_mean"], row["daily_gain_t"], row["daily_gain_days"] = daily
        row["error"] = error or ""
        row["run_ids"] = " ".join(o.run_id for o in runs if o.run_id)
        rows.append(row)
    return rows


def oracle_rank_ic(outcomes: Iterable[VariantOutcome]) -> float | None:
    """The oracle's test Rank IC on the scored rows (the same for every variant), if known."""
    values = [o.metrics[ORACLE_METRIC] for o in outcomes if ORACLE_METRIC in o.metrics]
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _cell(mean: float, std: float, decimals: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    text = f"{mean:.{decimals}f}"
    return f"{text} ± {std:.{decimals}f}" if math.isfinite(std) else text


def _status_cell(row: Mapping[str, Any]) -> str:
    total = row["seeds_ok"] + row["seeds_failed"]
    if row["status"] == "ok":
        return f"ok ({row['seeds_ok']}/{total})"
    reason = str(row["error"]).replace("|", "/").replace("\n", " ")[:160]
    if row["status"] == "skipped":
        return f"skipped: {reason}"
    return f"failed ({row['seeds_failed']}/{total}): {reason}"


def comparison_markdown(
    rows: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    oracle: float | None,
    reference: str = REFERENCE,
) -> str:
    """The comparison as a markdown table with a legend."""
    gain_title = f"{reference} − variant (test Rank IC)"
    titles = ["variant", *(t for _, t, _ in TABLE_COLUMNS[:1]), gain_title, "per-day t"]
    titles += [t for _, t, _ in TABLE_COLUMNS[1:]] + ["status"]
    cells_by_row = []
    for row in rows:
        cells = [f"`{row['variant']}`"]
        for i, (key, _, decimals) in enumerate(TABLE_COLUMNS):
            cells.append(_cell(row[f"{key}_mean"], row[f"{key}_std"], decimals))
            if i == 0:
                gain = _cell(row["gain_mean"], row["gain_std"], 4)
                is_reference = row["variant"] == reference
                cells.append("—" if is_reference else f"{gain} (n={row['gain_n']})")
                t_stat = row["daily_gain_t"]
                cells.append(
                    "—"
                    if is_reference or not math.isfinite(t_stat)
                    else f"{t_stat:.2f} ({row['daily_gain_days']} d)"
                )
        cells.append(_status_cell(row))
        cells_by_row.append(cells)
    if oracle is not None:
        blank = [""] * (len(titles) - 2)
        cells_by_row.append(["oracle (true expected return)", f"{oracle:.4f}", *blank])
    table = pd.DataFrame(cells_by_row, columns=titles)
    lines = [
        table.to_markdown(index=False, tablefmt="pipe", disable_numparse=True),
        "",
        f"Cells are mean ± std (ddof=1) over seeds {list(seeds)}. The gain column is the "
        f"mean ± std of the per-seed paired difference `{reference}` − variant in test Rank IC "
        "over the n seeds where both finished: positive means the full model beats the variant. "
        "Per-day t: the daily test Rank IC difference (averaged over those seeds) divided by its "
        "standard error over the d test days; |t| > 2 is a difference that holds day by day.",
    ]
    return "\n".join(lines) + "\n"


def comparison_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison rows as CSV (one row per variant, NaN as empty)."""
    return pd.DataFrame(list(rows)).to_csv(index=False, float_format="%.6g")


def rank_ic_figure(rows: Sequence[Mapping[str, Any]], oracle: float | None) -> Figure:
    """Mean test Rank IC per variant (std as error bars), the oracle's as a dashed line."""
    fig = Figure(figsize=(max(6.0, 0.8 * len(rows) + 2.0), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = [row["variant"] for row in rows]
    means = np.array([row["test/rank_ic_mean"] for row in rows], dtype=float)
    stds = np.array([row["test/rank_ic_std"] for row in rows], dtype=float)
    colors = ["C1" if row["kind"] == "lightgbm" else "C0" for row in rows]
    positions = np.arange(len(rows))
    ax.bar(positions, np.nan_to_num(means), yerr=np.nan_to_num(stds), color=colors, capsize=3)
    for pos, row in zip(positions, rows, strict=True):
        if row["status"] != "ok":
            ax.text(pos, 0.0, row["status"], rotation=90, ha="center", va="bottom", fontsize=8)
    if oracle is not None:
        ax.axhline(oracle, color="k", ls="--", lw=1.0, label=f"oracle {oracle:.4f}")
        ax.legend()
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xticks(positions)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("test Rank IC (mean over seeds)")
    ax.set_title("Variants on the same shards and splits")
    fig.tight_layout()
    return fig


def parent_tags(shard_tags: Mapping[str, str], seeds: Sequence[int]) -> dict[str, str]:
    """Tags of the comparison's parent run."""
    return {**shard_tags, TAG_KIND: "compare", "alphaloom.seeds": json.dumps(list(seeds))}


def log_plan(run: TrackedRun, variants: Sequence[Variant], seeds: Sequence[int]) -> None:
    """Record what is being compared (the variant list as YAML, the seeds as a param)."""
    text = yaml.safe_dump([v.model_dump(mode="json") for v in variants], sort_keys=False)
    run.log_text(text, "variants.yaml")
    run.log_params({"compare.seeds": json.dumps(list(seeds))})


def log_comparison(
    cfg: PipelineConfig,
    run: TrackedRun,
    variants: Sequence[Variant],
    outcomes: Sequence[VariantOutcome],
    seeds: Sequence[int],
    skipped: Mapping[str, str] | None = None,
    reference: str = REFERENCE,
) -> dict[str, Any]:
    """Build the table, log it (markdown, CSV, bar chart, per-variant metrics); return a summary."""
    rows = summarise(variants, outcomes, skipped, reference)
    oracle = oracle_rank_ic(outcomes)
    markdown = comparison_markdown(rows, seeds, oracle, reference)
    run.log_text(markdown, "comparison.md")
    run.log_text(comparison_csv(rows), "comparison.csv")
    run.log_figure(rank_ic_figure(rows, oracle), "rank_ic.png")
    metrics: dict[str, float] = {} if oracle is None else {ORACLE_METRIC: oracle}
    for row in rows:
        for stat in ("mean", "std"):
            metrics[f"compare/{row['variant']}/test_rank_ic_{stat}"] = row[f"test/rank_ic_{stat}"]
        metrics[f"compare/{row['variant']}/gain_mean"] = row["gain_mean"]
    run.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    failed = [row["variant"] for row in rows if row["status"] == "failed"]
    run.set_tags({"alphaloom.failed_variants": json.dumps(failed)})
    return {
        "parent_run_id": run.run_id,
        "experiment": cfg.tracking.experiment,
        "seeds": list(seeds),
        "rows": rows,
        "markdown": markdown,
        "oracle_rank_ic": oracle,
        "failed": failed,
        "skipped": dict(skipped or {}),
    }


def publish_comparison(summary: Mapping[str, Any]) -> None:
    """Attach the comparison table to the current Prefect flow run as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        markdown=f"# Model comparison (MLflow run `{summary['parent_run_id']}`)\n\n"
        + summary["markdown"],
        key="model-comparison",
        description="Baselines and ablations on the same shards and splits",
    )


def outcome_line(outcome: VariantOutcome) -> str:
    """One line on a finished (variant, seed): its headline figures, or why it failed."""
    if outcome.status != "finished":
        return f"FAILED ({outcome.error})"
    metrics = outcome.metrics
    parts = [f"{title} {metrics[key]:.{decimals}f}" for key, title, decimals in TABLE_COLUMNS[:1]]
    for key, title in (("valid/rank_ic", "valid Rank IC"), ("test/score_vol_corr", "vol corr")):
        if key in metrics:
            parts.append(f"{title} {metrics[key]:.4f}")
    if "fit_seconds" in metrics:
        parts.append(f"fit {metrics['fit_seconds']:.0f} s")
    return ", ".join(parts)
