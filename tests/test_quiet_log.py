"""A quiet log: `alphaloom run` shows its stages, epochs and summary, not the libraries' chatter.

The unit tests check `configure_logging` on the loggers and settings it owns; the slow test runs
the smoke pipeline once as a user would and reads what it printed.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from alphaloom.tasks.common import logging_setup
from alphaloom.tasks.common.logging_setup import (
    LOG_LEVEL_VARIABLE,
    QUIET_ENV,
    QUIET_LOGGERS,
    configure_logging,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_logging(monkeypatch) -> Iterator[Callable[[], logging.Logger]]:
    """None of configure_logging's settings in the environment, and a function that empties
    the root logger (pytest gives it capture handlers for each test phase: a test calls it to
    stand in a fresh process, where `configure_logging` adds its own); all undone afterwards."""
    root = logging.getLogger()
    level = root.level
    logging_setup._restore()  # undo what an earlier main() in this process set
    for key in (LOG_LEVEL_VARIABLE, *QUIET_ENV):
        monkeypatch.delenv(key, raising=False)

    def bare_root() -> logging.Logger:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        return root

    yield bare_root
    logging_setup._restore()
    for handler in root.handlers[:]:
        if handler.get_name() == "alphaloom":
            root.removeHandler(handler)
    root.setLevel(level)


def test_the_default_level_hides_the_libraries_request_logs(clean_logging) -> None:
    root = clean_logging()
    assert configure_logging(False) == logging.INFO
    for name in ("httpx", "httpcore", "urllib3", "alembic", "mlflow"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
    assert logging.getLogger("alphaloom.tasks.training.progress").isEnabledFor(logging.INFO)
    (handler,) = root.handlers
    assert handler.level == logging.INFO
    # Prefect and MLflow read these when imported: Prefect's own loggers at WARNING, its flow
    # and task run loggers (stages, epochs) at INFO; no artifact download progress bars.
    assert os.environ["PREFECT_LOGGING_LEVEL"] == "WARNING"
    assert os.environ["PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL"] == "INFO"
    assert os.environ["PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL"] == "INFO"
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


def test_an_explicit_setting_wins(clean_logging, monkeypatch) -> None:
    clean_logging()
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "DEBUG")
    urllib3 = logging.getLogger("urllib3")
    level = urllib3.level
    urllib3.setLevel(logging.ERROR)
    try:
        configure_logging(False)
        assert os.environ["PREFECT_LOGGING_LEVEL"] == "DEBUG"
        assert urllib3.level == logging.ERROR  # not lowered to WARNING
    finally:
        logging_setup._restore()
        urllib3.setLevel(level)


@pytest.mark.parametrize("how", ["--verbose", "ALPHALOOM_LOG_LEVEL=DEBUG"])
def test_verbose_brings_everything_back(clean_logging, monkeypatch, how) -> None:
    root = clean_logging()
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    configure_logging(False)  # quiet first: the verbose call undoes it
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    if how == "--verbose":
        assert configure_logging(True) == logging.DEBUG
    else:
        monkeypatch.setenv(LOG_LEVEL_VARIABLE, "debug")
        assert configure_logging(False) == logging.DEBUG
    assert {name: logging.getLogger(name).level for name in QUIET_LOGGERS} == levels
    for name in ("httpx", "httpcore", "urllib3"):
        assert logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    assert not set(QUIET_ENV) & set(os.environ)  # the libraries' own defaults again
    (handler,) = root.handlers  # one handler, however often it is called
    assert handler.level == logging.DEBUG


def test_the_log_level_variable_can_ask_for_less(clean_logging, monkeypatch) -> None:
    root = clean_logging()
    monkeypatch.setenv(LOG_LEVEL_VARIABLE, "WARNING")
    assert configure_logging(False) == logging.WARNING
    (handler,) = root.handlers
    assert handler.level == logging.WARNING  # also bounds Prefect's run loggers, set to INFO


def test_a_bad_log_level_is_named_and_the_default_used(clean_logging, monkeypatch, capsys):
    clean_logging()
    monkeypatch.setenv(LOG_LEVEL_VARIABLE, "LOUD")
    assert configure_logging(False) == logging.INFO
    assert "ALPHALOOM_LOG_LEVEL='LOUD' is not a log level" in capsys.readouterr().err


def test_run_lines_name_their_prefect_task_run() -> None:
    formatter = logging_setup.RunNameFormatter(logging_setup.LINE_FORMAT)
    record = logging.makeLogRecord(
        {"name": "prefect.task_runs", "msg": "Finished", "levelname": "INFO"}
    )
    record.task_run_name = "ingest-0ab"
    assert formatter.format(record).endswith("INFO prefect.task_runs [ingest-0ab]: Finished")
    plain = logging.makeLogRecord({"name": "alphaloom.x", "msg": "hi", "levelname": "INFO"})
    assert formatter.format(plain).endswith("INFO alphaloom.x: hi")


@pytest.mark.slow
def test_a_smoke_run_prints_stages_epochs_and_summary_only(tmp_path) -> None:
    """`alphaloom run` on the smoke config, at the default level, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in {LOG_LEVEL_VARIABLE, *QUIET_ENV}}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "alphaloom.flows.cli", "run"]
    command += ["--config", str(REPO / "configs" / "smoke.yaml")]
    command += ["--set", f"work_dir={tmp_path / 'work'}"]
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out[-6000:]
    lines = out.splitlines()
    noisy = [
        line
        for line in lines
        if "httpx" in line
        or "HTTP Request" in line
        or "UserWarning" in line
        or "Downloading artifacts" in line
    ]
    assert not noisy, "\n".join(noisy)
    epochs = [line for line in lines if re.search(r"epoch \d+/2: train loss", line)]
    assert len(epochs) == 2, out
    assert any(line.startswith("MLflow run:") for line in lines), out
    assert any("output" in line and "building it" in line for line in lines), out  # stages
