"""Which failures a task retries: transient ones (IO, network, timeouts), never deterministic ones.

A data, config or code error (DataValidationError, ShardSetError, a corrupt file's StorageError,
ConfigError, ...) fails the same way on every attempt, so retrying it only delays the message;
an interrupted connection, a throttled object store or a hung call may well succeed next time.
"""

from __future__ import annotations

from typing import Any

# OSErrors that describe the state of the filesystem rather than a hiccup: retrying finds the
# same missing file, the same existing directory, the same permissions.
DETERMINISTIC_OS_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def is_transient(error: BaseException | None) -> bool:
    """True for an IO, network or timeout error (OSError and its subclasses ConnectionError and
    TimeoutError, which fsspec, s3fs, aiohttp and requests raise), or for any error raised
    `from` one (a reader wrapping a dropped connection in its own error type)."""
    while error is not None:
        if isinstance(error, OSError) and not isinstance(error, DETERMINISTIC_OS_ERRORS):
            return True
        error = error.__cause__
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry the failed run only if its error is transient."""
    try:
        state.result()
    except Exception as error:  # classified here, not handled
        return is_transient(error)
    return False
