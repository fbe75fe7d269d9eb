"""What a run says about its input data: validation counts, quarantined rows, suspected splits
and whether industry, index and description are point-in-time.

Why in the run: a nightly retrain that dropped three vendor rows, or that applies today's index
members to 2015, still produces a model; the people comparing runs must see that on the run
itself (MLflow metrics `data/*`, tags, the report as an artifact) and in its summary, not only in
a log nobody reads.
"""

from __future__ import annotations

from typing import Any

from alphaloom.tasks.data.ingest import saved_facts
from alphaloom.tasks.data.validation import QUARANTINE_FILE, REPORT_FILE
from alphaloom.tasks.orchestration.caching import StageRef
from alphaloom.tasks.tracking.runs import TrackedRun

TAG_POINT_IN_TIME = "alphaloom.instruments_point_in_time"

TAG_STATIC_FIELDS = "alphaloom.static_fields"


def data_notes(facts: dict[str, Any], market_path: str = "") -> list[str]:
    """Plain sentences about the input for the run summary (empty when there is nothing to say)."""
    notes = []
    counts = facts.get("validation", {})
    invalid, quarantined = int(counts.get("invalid_rows", 0)), int(facts.get("quarantined_rows", 0))
    if invalid:
        share = float(counts.get("invalid_fraction", 0.0))
        notes.append(
            f"{invalid} invalid input row(s) ({share:.4%}) were dropped "
            f"(data.on_invalid: {facts.get('on_invalid')}); {quarantined} are in "
            f"{market_path}/{QUARANTINE_FILE}, every problem in {REPORT_FILE}"
        )
    warnings = int(counts.get("warning_findings", 0))
    if warnings:
        notes.append(f"{warnings} warning(s) about rows kept as they are; see {REPORT_FILE}")
    splits = int(facts.get("suspected_splits", 0))
    if splits:
        done = "adjusted" if facts.get("splits_adjusted") else "NOT adjusted (data.detect_splits)"
        notes.append(f"{splits} split-like move(s) in unadjusted prices, {done}")
    static = list(facts.get("static_fields", []))
    if static and facts.get("source") == "files":
        notes.append(
            f"{', '.join(static)}: static over the whole history, not point-in-time; on real data "
            "that is a look-ahead (today's index members and a description written later, "
            "applied to every past date). Dated instrument rows (start_date, end_date) fix it"
        )
    return notes


def log_data_quality(run: TrackedRun, market: StageRef) -> list[str]:
    """Log the market's validation counts (`data/*`), point-in-time tags and validation report
    to the run; return the notes for its summary."""
    facts = saved_facts(market)
    counts = dict(facts.get("validation", {}))
    counts["quarantined_rows"] = facts.get("quarantined_rows", 0)
    counts["suspected_splits"] = facts.get("suspected_splits", 0)
    run.log_metrics(counts, prefix="data/")
    static = list(facts.get("static_fields", []))
    run.set_tags(
        {
            TAG_POINT_IN_TIME: str(bool(facts.get("instruments_point_in_time", False))).lower(),
            TAG_STATIC_FIELDS: ", ".join(static) if static else "none",
        },
    )
    report = market.dir / REPORT_FILE
    if report.is_file():
        run.log_artifact(report, "data")
    return data_notes(facts, market.path)
