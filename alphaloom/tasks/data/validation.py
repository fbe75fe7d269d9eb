"""The validation report: every problem of every input file, found in one pass, in one table.

Why one table: a user fixing a vendor's files wants the whole list at once (file, column,
problem, how many rows, the first examples), in the log, in the Prefect UI and as a file next to
the market output, instead of one error per run. Severity says what happened to the rows:
`error` rows are invalid (the run stops, or they are quarantined under `data.on_invalid: drop`),
`warning` rows are kept as they are, `note` is information (a file that was skipped or decoded
from another encoding).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd

Severity = Literal["error", "warning", "note"]

REPORT_COLUMNS = ("severity", "file", "column", "problem", "rows", "examples")

REPORT_FILE = "validation_report.csv"

QUARANTINE_FILE = "quarantine.parquet"

MAX_EXAMPLES = 3


@dataclass(frozen=True)
class Problem:
    """One kind of problem in one column of one file."""

    severity: Severity
    file: str
    column: str  # the file's own spelling; "" for a problem of the whole file
    problem: str
    rows: int
    examples: str = ""

    def line(self) -> str:
        where = f"{self.file}: column '{self.column}'" if self.column else self.file
        count = f", {self.rows} row(s)" if self.rows else ""
        detail = f" (e.g. {self.examples})" if self.examples else ""
        return f"[{self.severity}] {where}: {self.problem}{count}{detail}"


@dataclass
class ValidationReport:
    """Problems plus the counts a policy decision and the MLflow run need."""

    problems: list[Problem] = field(default_factory=list)
    rows_read: int = 0
    invalid_rows: int = 0  # rows with at least one error (duplicates included)
    duplicate_rows: int = 0  # rows sharing a (symbol, date) key with another row
    files_read: int = 0
    files_skipped: int = 0

    def add(self, problems: Iterable[Problem]) -> None:
        self.problems.extend(problems)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def invalid_fraction(self) -> float:
        return self.invalid_rows / self.rows_read if self.rows_read else 0.0

    def frame(self) -> pd.DataFrame:
        """The report as a table, errors first (what `validation_report.csv` holds)."""
        order = {"error": 0, "warning": 1, "note": 2}
        rows = sorted(self.problems, key=lambda p: (order[p.severity], p.file, p.column))
        return pd.DataFrame(
            [[getattr(p, c) for c in REPORT_COLUMNS] for p in rows], columns=list(REPORT_COLUMNS)
        ).astype({"rows": "int64"})

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, counts: dict[str, float]) -> ValidationReport:
        """The report `frame()` and `counts()` describe (a saved market's)."""
        text = frame.fillna("").astype({"rows": "int64"})
        problems = [Problem(**row) for row in text.to_dict("records")]
        fields = ("rows_read", "invalid_rows", "duplicate_rows", "files_read", "files_skipped")
        return cls(problems, **{name: int(counts.get(name, 0)) for name in fields})

    def summary(self) -> str:
        """One line of counts."""
        return (
            f"{self.rows_read} rows in {self.files_read} file(s): {self.invalid_rows} invalid "
            f"({self.invalid_fraction:.4%}, {self.duplicate_rows} of them in duplicate keys), "
            f"{len(self.errors)} error and {len(self.warnings)} warning finding(s), "
            f"{self.files_skipped} file(s) skipped"
        )

    def render(self, severities: Sequence[Severity] = ("error", "warning", "note")) -> str:
        """The summary line, then every problem of the given severities, one per line."""
        lines = [self.summary()]
        lines += [p.line() for p in self.problems if p.severity in severities]
        return "\n".join(lines)

    def counts(self) -> dict[str, float]:
        """The numbers logged to MLflow (as `data/<name>`) and kept in the market's meta.json."""
        return {
            "rows_read": self.rows_read,
            "invalid_rows": self.invalid_rows,
            "invalid_fraction": self.invalid_fraction,
            "duplicate_rows": self.duplicate_rows,
            "files_read": self.files_read,
            "files_skipped": self.files_skipped,
            "error_findings": len(self.errors),
            "warning_findings": len(self.warnings),
        }


def examples(items: Iterable[str], limit: int = MAX_EXAMPLES) -> str:
    """The first `limit` examples joined for a report cell."""
    items = list(items)
    text = "; ".join(items[:limit])
    return text + (f"; ... {len(items) - limit} more" if len(items) > limit else "")


def log_report(report: ValidationReport, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Log the summary, then every problem on its own line (errors and warnings as WARNING)."""
    level = logging.WARNING if report.errors or report.warnings else logging.INFO
    logger.log(level, "data validation: %s", report.summary())
    for problem in report.problems:
        loud = problem.severity in ("error", "warning")
        logger.log(logging.WARNING if loud else logging.INFO, "%s", problem.line())


def publish_report(report: ValidationReport) -> None:
    """The report as a Prefect table artifact of the current run (nothing outside a run)."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    nothing = {**dict.fromkeys(REPORT_COLUMNS, ""), "problem": "no problem found", "rows": 0}
    table = report.frame().to_dict("records") or [nothing]
    create_table_artifact(
        table=table, key="validation-report", description=f"Data validation: {report.summary()}"
    )
