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

1. every child process (Prefect's temporary server, torchrun and its ranks, loader or Dask
   workers, the fit pool's workers, which handle the signal the same way and so mark their
   own runs KILLED; not the reaper, which ends with this process) gets SIGTERM at once, so a
   fit worker marks its runs while this process marks its own;
2. every stop hook registered with `on_stop` runs: tasks/tracking/runs.py registers each open
   MLflow run, which is marked KILLED with the reason in `alphaloom.died`. A run being made
   when the signal came (`making_run`) is waited for and marked too, so no run is left RUNNING
   because the signal fell between its creation and its hook;
3. the temporaries this process was writing are removed (tasks/common/storage.py), so no partial
   output is left (before the children are gone, and again after);
4. children still running get SIGKILL, AFTER_CHILDREN seconds before the exit deadline;
5. the `after_children` stop hooks run: the flows that fan fits out mark KILLED the runs a
   worker left RUNNING (one busy in a long call that holds the GIL cannot mark its own in
   time; tasks/tracking/resume.py `marking_orphaned_runs`);
6. the process exits with status 128 + the signal number (143 for SIGTERM, 130 for SIGINT).

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
HOOKS_DEADLINE = 3.0  # seconds the stop hooks (MLflow) get before the children are ended
AFTER_CHILDREN = 3.5  # seconds kept, after the children's SIGKILL, for the after-children hooks

# The commands a signal stops this way: the ones that run flows (and may hold MLflow runs,
# Prefect's temporary server, torchrun).
STOPPABLE = ("run", "score", "nightly", "compare", "backtest", "train-ddp", "serve")

_hooks: dict[int, tuple[Callable[[str], Any], bool]] = {}  # key -> (hook, after_children)
_hook_ids = itertools.count()
_lock = threading.Lock()
_made = threading.Condition(_lock)  # notified when a `making_run` block ends
_making = 0  # `making_run` blocks in progress
_stopping = threading.Event()
_installed_in: int | None = None  # the pid the handlers belong to (not a forked child)

F = TypeVar("F", bound=Callable[..., Any])


def stopping() -> bool:
    """Whether this process is being stopped by a signal."""
    return _stopping.is_set()


@contextlib.contextmanager
def on_stop(hook: Callable[[str], Any], after_children: bool = False) -> Iterator[None]:
    """Run `hook(reason)` if a signal stops the process while the block runs; its result, a
    bool or a count, is the number of MLflow runs it marked KILLED (for the closing log line).
    With `after_children`, the hook runs once the child processes have ended: for the runs a
    fit worker left RUNNING because it could not mark them itself in time."""
    with _lock:
        key = next(_hook_ids)
        _hooks[key] = (hook, after_children)
    try:
        yield
    finally:
        with _lock:
            _hooks.pop(key, None)


@contextlib.contextmanager
def making_run() -> Iterator[None]:
    """A block that makes an MLflow run RUNNING and registers its `on_stop` hook: a stop that
    begins meanwhile waits for the block (up to HOOKS_DEADLINE) and then runs that hook too.
    Once a stop has begun, the block is not entered: the thread parks (`park_if_stopping`)."""
    global _making
    with _lock:
        counted = not _stopping.is_set()
        if counted:
            _making += 1
    if not counted:
        park_if_stopping()
    try:
        yield
    finally:
        if counted:
            with _made:
                _making -= 1
                _made.notify_all()


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
    children = terminate_children()  # first: a fit worker marks its runs while we mark ours
    marked: list[int] = []
    _run_hooks_until(reason, marked, started + HOOKS_DEADLINE, after_children=False)
    # temporaries before the SIGKILL: a fit pool worker may be killed while it still waits for
    # its own children (the multiprocessing resource tracker ignores SIGTERM); once more after
    removed = set(remove_live_temps())
    left = EXIT_DEADLINE - AFTER_CHILDREN - (time.monotonic() - started)
    ended = reaper.kill_stragglers(children, grace=max(0.5, left))
    removed |= set(remove_live_temps())
    _run_hooks_until(reason, marked, started + EXIT_DEADLINE - 0.5, after_children=True)
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


def _run_hooks_until(reason: str, marked: list[int], deadline: float, after_children: bool) -> None:
    """`_run_hooks` in a thread, waited for until `deadline` at most (a hung tracking server
    must not keep the children running, or the process from exiting)."""
    runner = threading.Thread(
        target=_run_hooks, args=(reason, marked, deadline, after_children), daemon=True
    )
    runner.start()
    runner.join(max(0.0, deadline - time.monotonic()))
    if runner.is_alive():
        log.warning("stop hooks still running at their deadline: going on without them")


def _run_hooks(reason: str, marked: list[int], deadline: float, after_children: bool) -> None:
    """Run every stop hook of the phase (`after_children` or not) once, appending its count
    to `marked`: those registered now, then, after the `making_run` blocks in progress end
    (until `deadline`), those they registered."""
    done: set[int] = set()

    def run_new() -> None:
        with _lock:
            pending = [
                (key, hook)
                for key, (hook, after) in _hooks.items()
                if key not in done and after == after_children
            ]
        for key, hook in pending:
            done.add(key)
            try:
                marked.append(int(hook(reason) or 0))
            except Exception as err:  # the next hook and the exit still happen
                log.warning("while stopping: %s: %s", type(err).__name__, err)

    run_new()
    if after_children:
        return
    with _made:
        made = _made.wait_for(lambda: _making == 0, timeout=max(0.0, deadline - time.monotonic()))
    if not made:
        log.warning("a run being made when the signal came was not ready in time")
    run_new()


def terminate_children() -> list[psutil.Process]:
    """SIGTERM every descendant of this process but its reapers; returns them (for
    `reaper.kill_stragglers`, which waits for them and SIGKILLs the stubborn)."""
    spared = set(reaper.started_pids())
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return reaper.terminate([child for child in children if child.pid not in spared])
