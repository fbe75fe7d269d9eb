"""Baselines and ablations side by side: one parent MLflow run, one child run per variant and seed.

A variant is data: a name plus `section.key=value` overrides of the pipeline config (or
`kind: lightgbm` plus LightGBM parameters), so the ablation list can be extended from YAML
(`alphaloom compare --variants FILE`) without code. Every variant trains on the same shard set
and splits, in its own checkpoint directory, and both kinds go through one scoring path
(`score_and_log`: the prediction frame of each split into `tasks.evaluate.evaluate_predictions`,
logged by `tasks.tracking.log_evaluation`), so every child run carries the same `valid/*` and
`test/*` metric keys and MLflow's compare view lines them up. Nothing is registered: a
comparison never moves the `champion` alias.

Runs are created with explicit ids through `tasks.tracking.tracked_run` (child runs carry the
`mlflow.parentRunId` tag), never through MLflow's thread-local active run. A variant that fails
ends its child run FAILED and its row says so; the others still run.

The parent run logs `comparison.md`, `comparison.csv` and `rank_ic.png` (mean test Rank IC per
variant, std as error bars, the oracle's as a line). With several seeds each cell is mean ± std
over seeds, and the gain column is the mean ± std of the per-seed paired difference
reference (the full model) minus variant in test Rank IC, so seed noise shared by both cancels.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow.entities import Metric
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from alphaloom.tasks.common.config import ConfigError, PipelineConfig, config_from_dict
from alphaloom.tasks.comparison import baselines
from alphaloom.tasks.tracking import tracking

log = logging.getLogger(__name__)

REFERENCE = "full"
GAIN_METRIC = "test/rank_ic"
ORACLE_METRIC = "test/oracle_rank_ic"
TAG_KIND = "alphaloom.kind"
TAG_VARIANT = "alphaloom.variant"
TAG_SEED = "alphaloom.seed"
TAG_PARENT = "mlflow.parentRunId"
# (metric key, column title, decimals) of the comparison table
TABLE_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("test/rank_ic", "test Rank IC", 4),
    ("test/ic", "test IC", 4),
    ("test/rank_icir", "test Rank ICIR", 3),
    ("test/ls_sharpe", "L-S Sharpe", 2),
    ("test/accuracy", "test accuracy", 3),
    ("valid/rank_ic", "valid Rank IC", 4),
    ("fit_seconds", "fit s", 0),
)


class Variant(BaseModel):
    """One entry of the comparison: config overrides for the network, or the LightGBM baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["network", "lightgbm"] = "network"
    overrides: tuple[str, ...] = ()
    params: dict[str, Any] = Field(default_factory=dict, description="LightGBM parameters")
    description: str = ""

    @model_validator(mode="after")
    def _params_need_lightgbm(self) -> Variant:
        if self.params and self.kind != "lightgbm":
            raise ValueError(f"variant '{self.name}': params are for kind 'lightgbm' only")
        return self


# Inverse class frequencies of the default quantile labels (edges 0.3/0.6/0.9 -> shares
# 0.3/0.3/0.3/0.1), normalised to mean 1: what batch alpha averages to, but held fixed.
_FIXED_ALPHA = "loss.alpha=[0.6667, 0.6667, 0.6667, 2.0]"

DEFAULT_VARIANTS: tuple[Variant, ...] = (
    Variant(name="full", description="the configured model and loss"),
    Variant(
        name="no_attention",
        overrides=("model.use_attention=false",),
        description="LSTM only, no self-attention",
    ),
    Variant(name="no_text", overrides=("model.use_text=false",), description="no text vector"),
    Variant(
        name="no_industry",
        overrides=("model.use_industry=false",),
        description="no industry embedding",
    ),
    Variant(
        name="no_index", overrides=("model.use_index=false",), description="no index embedding"
    ),
    Variant(
        name="no_calendar",
        overrides=("model.use_calendar=false",),
        description="no day-of-week / month embedding",
    ),
    Variant(
        name="cross_entropy",
        overrides=("loss.kind=cross_entropy",),
        description="plain cross-entropy instead of the composite loss",
    ),
    Variant(
        name="focal_no_distance",
        overrides=("loss.kind=focal",),
        description="focal loss without the ordinal distance term",
    ),
    Variant(
        name="fixed_alpha",
        overrides=(_FIXED_ALPHA,),
        description="fixed class weights instead of batch alpha",
    ),
    Variant(
        name="lightgbm",
        kind="lightgbm",
        description="LightGBM on the end-day factors (Qlib's Alpha158 baseline)",
    ),
)


class CompareError(ValueError):
    """The variant list is unusable; the message names the file or the variant."""


# ----------------------------------------------------------------------------------------------
# the plan


def load_variants(path: str | Path) -> list[Variant]:
    """Variants from a YAML list of mappings (name, kind, overrides, params, description)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CompareError(f"variants file not found: {path}") from None
    except yaml.YAMLError as err:
        raise CompareError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, list) or not raw:
        raise CompareError(f"{path}: expected a non-empty list of variants")
    variants = []
    for i, entry in enumerate(raw):
        try:
            variants.append(Variant.model_validate(entry))
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "<entry>"
            raise CompareError(f"{path}: variant #{i + 1}: '{key}': {first['msg']}") from None
    return check_variants(variants)


def check_variants(variants: Sequence[Variant]) -> list[Variant]:
    """The list itself if its names are unique (rows and runs are keyed by name)."""
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CompareError(f"variant names must be unique; repeated: {duplicates}")
    if not variants:
        raise CompareError("the variant list is empty")
    return list(variants)


def seed_list(cfg: PipelineConfig, n_seeds: int) -> list[int]:
    """train.seed, train.seed + 1, ...: the seeds every variant runs with (paired by seed)."""
    if n_seeds < 1:
        raise CompareError(f"--seeds must be >= 1, got {n_seeds}")
    return [cfg.train.seed + i for i in range(n_seeds)]


def skipped_variants(variants: Iterable[Variant]) -> dict[str, str]:
    """Variants that cannot run here and why (LightGBM without the optional extra)."""
    if baselines.lightgbm_available():
        return {}
    reason = f"LightGBM is not installed: {baselines.INSTALL_HINT}"
    return {v.name: reason for v in variants if v.kind == "lightgbm"}


def variant_config(cfg: PipelineConfig, variant: Variant, seed: int) -> PipelineConfig:
    """The base config with the variant's overrides and the seed applied (ConfigError if bad)."""
    overrides = [*variant.overrides, f"train.seed={seed}"]
    return config_from_dict(cfg.model_dump(mode="json"), overrides, f"variant '{variant.name}'")


# ----------------------------------------------------------------------------------------------
# one variant, one seed


@dataclass
class VariantOutcome:
    """What one (variant, seed) child run produced."""

    variant: str
    seed: int
    status: Literal["finished", "failed"]
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class VariantFailed(RuntimeError):
    """A variant's child run failed; carries the run id so its row can link it."""

    def __init__(self, variant: str, seed: int, run_id: str | None, cause: str) -> None:
        super().__init__(f"variant '{variant}' (seed {seed}) failed: {cause}")
        self.variant, self.seed, self.run_id, self.cause = variant, seed, run_id, cause

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.variant, self.seed, self.run_id, self.cause))


def child_tags(
    parent_run_id: str, variant: Variant, seed: int, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Tags of a child run: the parent link, the variant, its seed and overrides."""
    return {
        **(base or {}),
        TAG_PARENT: parent_run_id,
        TAG_KIND: "compare-variant",
        TAG_VARIANT: variant.name,
        TAG_SEED: str(seed),
        "alphaloom.variant_kind": variant.kind,
        "alphaloom.overrides": json.dumps(list(variant.overrides)),
    }


SplitPredictor = Callable[[str], pd.DataFrame]


def score_and_log(
    cfg: PipelineConfig,
    run_id: str,
    predict_split: SplitPredictor,
    oracle: pd.DataFrame | None,
    figures: bool,
) -> dict[str, float]:
    """Score valid and test with `evaluate_predictions` and log `<split>/<metric>` (+ plots).

    The one scoring path of every variant, network or LightGBM, so their metrics line up.
    """
    from alphaloom.tasks.evaluation.evaluate import evaluate_predictions

    flat: dict[str, float] = {}
    for split in ("valid", "test"):
        preds = predict_split(split)
        metrics, plots = evaluate_predictions(preds, cfg.evaluate, oracle, with_figures=figures)
        tracking.log_evaluation(cfg, run_id, split, metrics, plots)
        flat.update({f"{split}/{key}": value for key, value in metrics.items()})
    return flat


def _fit_network(cfg: PipelineConfig, run_id: str, shard_dir: str) -> tuple[SplitPredictor, dict]:
    """Train in this run's own checkpoint dir (a retried task resumes there); never register."""
    from alphaloom.tasks.evaluation.evaluate import predict
    from alphaloom.tasks.training.train import checkpoint_dir_for, train_model

    started = time.perf_counter()
    result = train_model(shard_dir, cfg, checkpoint_dir_for(cfg, run_id), run_id)
    extra = {"fit_seconds": time.perf_counter() - started, "best_epoch": float(result.best_epoch)}

    def predict_split(split: str) -> pd.DataFrame:
        return predict(result.model, shard_dir, split, cfg, device=result.device)

    return predict_split, extra


def _fit_lightgbm(
    cfg: PipelineConfig, variant: Variant, seed: int, run_id: str, shard_dir: str
) -> tuple[SplitPredictor, dict]:
    """Fit the baseline; log its parameters and its validation Rank IC per boosting round."""
    from alphaloom.tasks.comparison.baselines import predict_lightgbm, train_lightgbm

    fit = train_lightgbm(shard_dir, cfg, variant.params, seed=seed)
    tracking.log_params(cfg, run_id, {f"lightgbm.{k}": v for k, v in fit.params.items()})
    stamp = int(time.time() * 1000)
    curve = [
        Metric("val/rank_ic", float(v), stamp, step) for step, v in enumerate(fit.history, start=1)
    ]
    client = tracking.client_for(cfg)
    for start in range(0, len(curve), 900):
        client.log_batch(run_id, metrics=curve[start : start + 900])
    extra = {"fit_seconds": fit.fit_seconds, "best_iteration": float(fit.best_iteration)}

    def predict_split(split: str) -> pd.DataFrame:
        return predict_lightgbm(fit, shard_dir, split, cfg)

    return predict_split, extra


def run_variant(
    cfg: PipelineConfig,
    variant: Variant,
    seed: int,
    parent_run_id: str,
    shard_dir: str,
    oracle: pd.DataFrame | None = None,
    tags: Mapping[str, str] | None = None,
    figures: bool = True,
) -> VariantOutcome:
    """Train and evaluate one variant with one seed inside its own child run.

    Raises VariantFailed (after the child run is marked FAILED) if anything goes wrong,
    including an override the config rejects. `figures=False` skips the per-split plots.
    """
    try:
        vcfg, bad_config = variant_config(cfg, variant, seed), None
    except ConfigError as err:
        vcfg, bad_config = cfg, err  # still open a child run, so the failure is on record
    run_id: str | None = None
    try:
        with tracking.tracked_run(
            vcfg, child_tags(parent_run_id, variant, seed, tags), f"{variant.name} seed={seed}"
        ) as run_id:
            if bad_config is not None:
                raise bad_config
            if variant.kind == "lightgbm":
                predict_split, extra = _fit_lightgbm(vcfg, variant, seed, run_id, shard_dir)
            else:
                predict_split, extra = _fit_network(vcfg, run_id, shard_dir)
            tracking.log_metrics(vcfg, run_id, extra)
            metrics = {**score_and_log(vcfg, run_id, predict_split, oracle, figures), **extra}
    except Exception as err:
        log.exception("variant %s seed %d failed", variant.name, seed)
        raise VariantFailed(variant.name, seed, run_id, f"{type(err).__name__}: {err}") from err
    return VariantOutcome(variant.name, seed, "finished", run_id, metrics)


@task(
    name="compare-variant",
    task_run_name="{variant.name}-seed{seed}",
    retries=0,  # a retry would open a second child run
    timeout_seconds=12 * 3600,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def variant_task(
    cfg: PipelineConfig,
    variant: Variant,
    seed: int,
    parent_run_id: str,
    shard_dir: str,
    oracle: pd.DataFrame | None = None,
    tags: dict[str, str] | None = None,
    figures: bool = True,
) -> VariantOutcome:
    """Prefect wrapper of `run_variant` (a failed variant is a failed task run)."""
    return run_variant(cfg, variant, seed, parent_run_id, shard_dir, oracle, tags, figures)


def outcome_from_state(state: Any, variant: Variant, seed: int) -> VariantOutcome:
    """A task run's final state as an outcome: its result, or a failed row with the reason."""
    if state.is_completed():
        return state.result()
    err = state.result(raise_on_failure=False)
    if isinstance(err, VariantFailed):
        return VariantOutcome(variant.name, seed, "failed", err.run_id, error=err.cause)
    message = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else state.message
    return VariantOutcome(variant.name, seed, "failed", None, error=str(message))


# ----------------------------------------------------------------------------------------------
# the table


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
    titles = ["variant", *(t for _, t, _ in TABLE_COLUMNS[:1]), gain_title]
    titles += [t for _, t, _ in TABLE_COLUMNS[1:]] + ["status"]
    lines = ["| " + " | ".join(titles) + " |", "|" + " --- |" * len(titles)]
    for row in rows:
        cells = [f"`{row['variant']}`"]
        for i, (key, _, decimals) in enumerate(TABLE_COLUMNS):
            cells.append(_cell(row[f"{key}_mean"], row[f"{key}_std"], decimals))
            if i == 0:
                gain = _cell(row["gain_mean"], row["gain_std"], 4)
                cells.append("—" if row["variant"] == reference else f"{gain} (n={row['gain_n']})")
        cells.append(_status_cell(row))
        lines.append("| " + " | ".join(cells) + " |")
    if oracle is not None:
        lines.append(f"| oracle (true expected return) | {oracle:.4f} |" + " |" * (len(titles) - 2))
    lines += [
        "",
        f"Cells are mean ± std (ddof=1) over seeds {list(seeds)}. The gain column is the "
        f"mean ± std of the per-seed paired difference `{reference}` − variant in test Rank IC "
        "over the n seeds where both finished: positive means the full model beats the variant.",
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


# ----------------------------------------------------------------------------------------------
# the parent run


def parent_tags(shard_tags: Mapping[str, str], seeds: Sequence[int]) -> dict[str, str]:
    """Tags of the comparison's parent run."""
    return {**shard_tags, TAG_KIND: "compare", "alphaloom.seeds": json.dumps(list(seeds))}


def log_plan(
    cfg: PipelineConfig, run_id: str, variants: Sequence[Variant], seeds: Sequence[int]
) -> None:
    """Record what is being compared (the variant list as YAML, the seeds as a param)."""
    text = yaml.safe_dump([v.model_dump(mode="json") for v in variants], sort_keys=False)
    tracking.client_for(cfg).log_text(run_id, text, "variants.yaml")
    tracking.log_params(cfg, run_id, {"compare.seeds": json.dumps(list(seeds))})


def log_comparison(
    cfg: PipelineConfig,
    run_id: str,
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
    client = tracking.client_for(cfg)
    client.log_text(run_id, markdown, "comparison.md")
    client.log_text(run_id, comparison_csv(rows), "comparison.csv")
    client.log_figure(run_id, rank_ic_figure(rows, oracle), "rank_ic.png")
    metrics: dict[str, float] = {} if oracle is None else {ORACLE_METRIC: oracle}
    for row in rows:
        for stat in ("mean", "std"):
            metrics[f"compare/{row['variant']}/test_rank_ic_{stat}"] = row[f"test/rank_ic_{stat}"]
        metrics[f"compare/{row['variant']}/gain_mean"] = row["gain_mean"]
    tracking.log_metrics(cfg, run_id, {k: v for k, v in metrics.items() if math.isfinite(v)})
    failed = [row["variant"] for row in rows if row["status"] == "failed"]
    tracking.set_tags(cfg, run_id, {"alphaloom.failed_variants": json.dumps(failed)})
    return {
        "parent_run_id": run_id,
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
