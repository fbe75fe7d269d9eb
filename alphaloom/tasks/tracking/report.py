"""What a finished pipeline run tells people: a summary dict, a Prefect markdown artifact.

Kept out of the flows so they stay composition only, and out of tracking so MLflow logging and
human-facing reporting change independently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.tracking.runs import TrackedRun

HEADLINE_METRICS = (
    "test/rank_ic",
    "test/oracle_rank_ic",
    "test/rank_ic_vs_oracle",
    "test/ic",
    "test/icir",
    "test/rank_icir",
    "test/accuracy",
    "test/macro_f1",
    "test/ls_ann_return",
    "test/ls_sharpe",
    "test/max_drawdown",
    "test/rows_no_fwd_return",
    "valid/rank_ic",
)


def run_url(cfg: PipelineConfig, run: TrackedRun, ui: str | None = None) -> str:
    """Link to the run in the MLflow UI (`alphaloom ui` serves it on 127.0.0.1)."""
    experiment_id = run.client.get_run(run.run_id).info.experiment_id
    base = ui or f"http://127.0.0.1:{cfg.tracking.ui_port}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run.run_id}"


def run_summary(
    cfg: PipelineConfig,
    run: TrackedRun,
    metrics: Mapping[str, float],
    decision: Any | None,
    best_epoch: int | None = None,
    data_notes: list[str] | None = None,
) -> dict[str, Any]:
    """The flow's return value: run id, link, headline metrics, the registry decision and what
    the run's input data needs said about it (tasks/tracking/data_quality.py)."""
    summary: dict[str, Any] = {
        "run_id": run.run_id,
        "experiment": cfg.tracking.experiment,
        "run_url": run_url(cfg, run),
        "metrics": {k: float(metrics[k]) for k in HEADLINE_METRICS if k in metrics},
        "best_epoch": best_epoch,
        "data_notes": list(data_notes or []),
    }
    if decision is not None:
        summary["promoted"] = bool(decision.promoted)
        summary["registry_reason"] = decision.reason
        summary["model_version"] = decision.new_version
    return summary


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """A markdown table of the headline metrics with a link to the MLflow run."""
    rows = [(key, _fmt(value)) for key, value in summary["metrics"].items()]
    table = pd.DataFrame(rows, columns=["metric", "value"])
    lines = [
        f"# alphaloom run `{summary['run_id']}`",
        "",
        f"[Open in MLflow]({summary['run_url']}) (start the UI with `alphaloom ui`)",
        "",
        table.to_markdown(index=False, tablefmt="pipe", disable_numparse=True),
    ]
    if "promoted" in summary:
        verdict = "moved to this model" if summary["promoted"] else "unchanged"
        lines += [
            "",
            f"Champion alias {verdict} (version {summary['model_version']}): "
            f"{summary['registry_reason']}",
        ]
    if summary.get("data_notes"):
        lines += ["", "## Input data", ""] + [f"- {note}" for note in summary["data_notes"]]
    return "\n".join(lines) + "\n"


def publish_summary(summary: Mapping[str, Any]) -> None:
    """Attach the summary to the current Prefect flow run as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        markdown=summary_markdown(summary),
        key="run-summary",
        description="Headline metrics of this training run",
    )
