"""What the `alphaloom` command line logs: its own work, not the libraries' chatter.

At the default level a run shows its stages (the flow and task run lines, each naming its task),
the epoch lines and the summary. The HTTP clients Prefect and MLflow talk through (httpx,
httpcore, urllib3) log every request at INFO, MLflow and Prefect narrate their internals, and
MLflow and Hugging Face draw download progress bars: those loggers are set to WARNING and the
bars are switched off with the libraries' own settings, so warnings and errors still show.

`--verbose`, or ALPHALOOM_LOG_LEVEL=DEBUG, logs at DEBUG and leaves every library its own
settings (what an explicitly set environment variable says always wins). ALPHALOOM_LOG_LEVEL
also takes WARNING or ERROR for less than the default.

Prefect configures its loggers when it is first imported, from its environment variables, so
`configure_logging` must run before Prefect is imported: the command line's `main` calls it right
after parsing its arguments (tests/test_quiet_log.py runs a pipeline to check the result). MLflow
may already be imported by then: its logger is set directly, and its variables reach the
processes a run starts (DDP workers, a served model).
"""

from __future__ import annotations

import logging
import os

LOG_LEVEL_VARIABLE = "ALPHALOOM_LOG_LEVEL"

LINE_FORMAT = "%(asctime)s %(levelname)s %(source)s: %(message)s"

# Libraries that log at INFO what nobody running a pipeline needs (every HTTP request, database
# migrations, font caches, model loading); at the default level only their warnings show.
QUIET_LOGGERS = (
    "httpx",
    "httpcore",
    "urllib3",
    "alembic",
    "huey",  # MLflow's job queue
    "mlflow",
    "matplotlib",
    "sentence_transformers",
    "transformers",
    "huggingface_hub",
    "filelock",
    "fsspec",
    "botocore",
    "s3fs",
    "distributed",  # dask, under prefect-dask
    "asyncio",
)

# Settings the libraries read when imported (so set before they are): Prefect's own loggers at
# WARNING but its flow and task run loggers (the pipeline's stage and epoch lines) at INFO, MLflow
# at WARNING, and no artifact-download or model-loading progress bars.
QUIET_ENV = {
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "INFO",
    "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "INFO",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}

_HANDLER_NAME = "alphaloom"
# What a quiet configure_logging changed, so that a verbose one (in the same process, as in the
# tests) puts it back: logger levels before, and the environment variables it set.
_saved_levels: dict[str, int] = {}
_set_env: dict[str, str] = {}


class RunNameFormatter(logging.Formatter):
    """The usual line, naming the Prefect task or flow run a run logger's record comes from
    (`prefect.task_runs [ingest_task-0ab]: Finished in state Completed()`)."""

    def format(self, record: logging.LogRecord) -> str:
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        record.source = f"{record.name} [{run}]" if run else record.name
        return super().format(record)


def requested_level(verbose: bool) -> int:
    """DEBUG with --verbose, else ALPHALOOM_LOG_LEVEL (a level name), else INFO."""
    if verbose:
        return logging.DEBUG
    name = os.environ.get(LOG_LEVEL_VARIABLE, "").strip().upper()
    level = logging.getLevelName(name) if name else logging.INFO
    if not isinstance(level, int):
        raise ValueError(
            f"{LOG_LEVEL_VARIABLE}={os.environ[LOG_LEVEL_VARIABLE]!r} is not a log level "
            "(DEBUG, INFO, WARNING, ERROR or CRITICAL)"
        )
    return level


def configure_logging(verbose: bool) -> int:
    """Set up logging for one command line run; returns the level chosen.

    One line format on stderr for every logger. Quiet (the default): the libraries in
    QUIET_LOGGERS at WARNING and QUIET_ENV's settings where the environment sets none. Verbose
    (`verbose`, or ALPHALOOM_LOG_LEVEL=DEBUG): everything at DEBUG, the libraries as they would
    be without alphaloom. Like `logging.basicConfig`, the root logger is left alone when
    something else (a test runner) has already given it handlers.
    """
    try:
        level, problem = requested_level(verbose), None
    except ValueError as err:
        level, problem = logging.INFO, str(err)
    if level <= logging.DEBUG:
        _restore()
    else:
        _quiet()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(handler)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(RunNameFormatter(LINE_FORMAT))
        handler.setLevel(level)  # also bounds the loggers set to INFO above, for WARNING
        root.addHandler(handler)
        root.setLevel(level)
    if problem:
        logging.getLogger(__name__).warning("%s; logging at INFO", problem)
    return level


def _quiet() -> None:
    for key, value in QUIET_ENV.items():
        if key not in os.environ:
            os.environ[key] = _set_env[key] = value
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        _saved_levels.setdefault(name, logger.level)
        if logger.level < logging.WARNING:  # NOTSET or below: a library set ERROR keeps it
            logger.setLevel(logging.WARNING)


def _restore() -> None:
    for key, value in list(_set_env.items()):
        if os.environ.get(key) == value:
            del os.environ[key]
        del _set_env[key]
    for name, level in list(_saved_levels.items()):
        logging.getLogger(name).setLevel(level)
        del _saved_levels[name]
