"""SIGTERM and SIGINT stop a long `alphaloom` command within seconds, and leave nothing running.

Without this a signal did not stop a command cleanly: SIGINT raised KeyboardInterrupt wherever
the main thread was, and during a flow Prefect's engine turns SIGTERM into a `TerminationSignal`
exception that unwinds the flow (reporting the crash to its temporary server) and then re-sends
the signal to the default handler, which kills the process without `atexit` hooks, so Prefect's
temporary server was left running (tasks/orchestration/reaper.py stops it later, for the
commands that start one). How long that takes depends on where the exception lands.

`stoppable(command, func)` wraps a command (flows/cli.py `main`): while it runs, SIGTERM and
SIGINT are handled here and nowhere else (Prefect's flow-engine SIGTERM bridge and the runner's
handler of `alphaloom serve` are pointed at the same handler for the duration). On the first
signal a thread, not the interrupted main thread, stops the command:

1. every stop hook registered with `on_stop` runs: tasks/tracking/runs.py registers each open
   MLflow run, which is marked KILLED with the reason in `alphaloom.died`;
2. every child process (Prefect's temporary server, torchrun and its ranks, loader or Dask
   workers, the fit pool's workers, which handle the signal the same way and so mark their
   own runs KILLED; not the reaper, which ends with this process) gets SIGTERM, and SIGKILL if
   it is still there after CHILD_GRACE seconds;
3. the temporaries this process was writing are removed (tasks/common/storage.py), so no partial
   output is left (before the children are ended, and again after);
4. the process exits with status 128 + the signal number (143 for SIGTERM, 130 for SIGINT).

Meanwhile the main thread carries on until it reaches `park_if_stopping` (a run ending, a new
run starting), where it waits for the exit instead of ending a run FINISHED or FAILED. Whatever
the cleanup does, the process is gone EXIT_DEADLINE seconds after the signal. A second signal
exits at once.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psutil

from alphaloom.tasks.common.storage import remove_live_temps
from alphaloom.tasks.orchestration import reaper

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_DEADLINE = 8.0  # seconds from the signal to the exit, whatever the cleanup is doing
CHILD_GRACE = 3.0  # seconds a child has to end after SIGTERM before SIGKILL
HOOKS_DEADLINE = 3.0  # seconds the stop hooks (MLflow) get before the children are ended

# The commands a signal stops this way: the ones that run flows (and may hold MLflow runs,
# Prefect's temporary server, torchrun).
STOPPABLE = ("run", "score", "nightly", "compare", "backtest", "train-ddp", "serve")

_hooks: dict[int, Callable[[str], Any]] = {}
_hook_ids = itertools.count()
_lock = threading.Lock()
_stopping = threading.Event()
_installed_in: int | None = None  # the pid the handlers belong to (not a forked child)

F = TypeVar("F", bound=Callable[..., Any])


def stopping() -> bool:
    """Whether this process is being stopped by a signal."""
    return _stopping.is_set()


@contextlib.contextmanager
def on_stop(hook: Callable[[str], Any]) -> Iterator[None]:
    """Run `hook(reason)` if a signal stops the process while the block runs (a true result
    counts as one MLflow run marked KILLED in the closing log line)."""
    with _lock:
        key = next(_hook_ids)
        _hooks[key] = hook
    try:
        yield
    finally:
        with _lock:
            _hooks.pop(key, None)


def park_if_stopping() -> None:
    """Wait here for the exit if a signal is stopping the process (the stop thread ends what
    this thread would otherwise end, or start)."""
    while _stopping.is_set() and os.getpid() == _installed_in:
        time.sleep(1.0)


def stoppable(command: str, func: F) -> F:
    """`func` with SIGTERM and SIGINT handled as the module doc says, if `command` is one of
    STOPPABLE (else `func` itself). Outside the main thread signals cannot be handled: `func`."""
    if command not in STOPPABLE:
        return func

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return func(*args, **kwargs)
        reaper.ensure_reaper()  # a kill -9, which nothing can handle, is the reaper's
        with handling_signals():
            try:
                return func(*args, **kwargs)
            finally:
                park_if_stopping()  # an error the stop caused must not end the process first

    return run  # type: ignore[return-value]


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
    """Handle SIGTERM and SIGINT here for the block (main thread only), then restore the
    previous handlers."""
    global _installed_in
    previous = {signum: signal.signal(signum, _handle) for signum in SIGNALS}
    installed_before, _installed_in = _installed_in, os.getpid()
    undo = _route_prefect_handlers()
    try:
        yield
    finally:
        undo()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _installed_in = installed_before


def handle_signals_in_worker() -> None:
    """Handle SIGTERM and SIGINT as a command does, for the rest of this process's life: for
    a task runner's worker process (tasks/orchestration/fits.py), so a stopped command's fits
    also mark their MLflow runs KILLED and remove their temporaries when the command's stop
    thread ends them."""
    global _installed_in
    for signum in SIGNALS:
        signal.signal(signum, _handle)
    _installed_in = os.getpid()
    _route_prefect_handlers()


def _route_prefect_handlers() -> Callable[[], None]:
    """Point Prefect's own SIGTERM handlers at `_handle` (returns the undo): the flow engine
    installs its bridge (`prefect.utilities.engine._prefect_sigterm_handler`, looked up when a
    flow starts) over ours, and `alphaloom serve`'s runner its `Runner.handle_sigterm`."""
    restore: list[Callable[[], None]] = []

    def route(owner: Any, name: str, value: Any) -> None:
        if name in vars(owner):
            original = vars(owner)[name]
            setattr(owner, name, value)
            restore.append(lambda: setattr(owner, name, original))

    with contextlib.suppress(ImportError):
        import prefect.utilities.engine as engine

        route(engine, "_prefect_sigterm_handler", _handle)
    with contextlib.suppress(ImportError):
        from prefect.runner.runner import Runner

        route(Runner, "handle_sigterm", lambda _runner, *args: _handle(signal.SIGTERM, None))

    def undo() -> None:
        for step in reversed(restore):
            step()

    return undo


def _handle(signum: int, frame: Any = None) -> None:
    """The signal handler: start the stop thread and return, so the interrupted code (which may
    hold a lock the cleanup needs) carries on until the exit."""
    if os.getpid() != _installed_in:  # a forked child that inherited the handler: default action
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _stopping.is_set():
        os._exit(128 + signum)  # a second signal: now
    _stopping.set()
    watchdog = threading.Timer(EXIT_DEADLINE, os._exit, args=(128 + signum,))
    watchdog.daemon = True
    watchdog.start()
    threading.Thread(target=_stop, args=(signum,), name="alphaloom-stop", daemon=True).start()


def _stop(signum: int) -> None:
    name = signal.Signals(signum).name
    reason = f"stopped by {name} (process {os.getpid()} on {os.uname().nodename})"
    log.warning("%s received: stopping (open MLflow runs -> KILLED, child processes ended)", name)
    started = time.monotonic()
    with _lock:
        hooks = list(_hooks.values())
    marked: list[bool] = []

    def run_hooks() -> None:
        for hook in hooks:
            try:
                marked.append(bool(hook(reason)))
            except Exception as err:  # the next hook and the exit still happen
                log.warning("while stopping: %s: %s", type(err).__name__, err)

    runner = threading.Thread(target=run_hooks, name="alphaloom-stop-hooks", daemon=True)
    runner.start()
    runner.join(HOOKS_DEADLINE)  # a hung tracking server must not keep the children running
    # temporaries first: a fit pool worker is itself a child of the command, which kills it
    # CHILD_GRACE seconds after its SIGTERM, possibly while it still waits for its own children
    # (the multiprocessing resource tracker ignores SIGTERM); once more after the children end
    removed = set(remove_live_temps())
    left = EXIT_DEADLINE - 2.0 - (time.monotonic() - started)
    ended = end_children(grace=max(0.5, min(CHILD_GRACE, left)))
    removed |= set(remove_live_temps())
    log.warning(
        "stopped by %s: %d MLflow run(s) marked KILLED, %d child process(es) ended, %d partial "
        "output(s) removed; exit status %d",
        name,
        sum(marked),
        len(ended),
        len(removed),
        128 + signum,
    )
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(128 + signum)


def end_children(grace: float = CHILD_GRACE) -> list[int]:
    """SIGTERM every descendant of this process but its reapers, SIGKILL those still running
    after `grace` seconds; returns the pids ended."""
    spared = set(reaper.started_pids())
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return reaper.reap([child for child in children if child.pid not in spared], grace)
