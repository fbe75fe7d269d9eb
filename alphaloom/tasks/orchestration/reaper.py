"""Nothing an `alphaloom` command started outlives it, even when it is killed with SIGKILL.

Prefect runs a flow without a configured API by starting a temporary server: a uvicorn
subprocess (`prefect.server.api.server.SubprocessASGIServer`) that it stops from an `atexit`
hook. SIGKILL (a pre-empted machine, the OOM killer, `kill -9`) runs no hook, and the server has
no watch on its parent, so it keeps running, orphaned, holding its port and database, forever;
so would torchrun's DDP ranks. A reaper is a small detached process (`python -m
alphaloom.tasks.orchestration.reaper PID START_TIME`) that watches one process: while it lives
it notes its descendants every `interval` seconds; once it is gone (or a zombie) it sends SIGTERM
to every noted descendant still running (same pid and start time, so a reused pid is spared),
SIGKILL after a grace period, and exits. A normally ending command has stopped them itself.
A child started and orphaned within one interval before the kill can be missed.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import psutil

GRACE_SECONDS = 10.0

_started: list[subprocess.Popen[bytes]] = []  # the reapers this process started


def started_pids() -> list[int]:
    """The pids of the reapers this process started (tasks/orchestration/shutdown.py spares
    them when it ends its children: each ends by itself once this process is gone)."""
    return [reaper.pid for reaper in _started if reaper.poll() is None]


def ensure_reaper(interval: float = 0.5) -> None:
    """Start a reaper of the calling process unless one is running."""
    if not started_pids():
        start_reaper(interval)


def start_reaper(interval: float = 0.5) -> subprocess.Popen[bytes]:
    """Start a reaper of the calling process, in its own session (so a terminal's Ctrl-C, which
    the command handles itself, does not reach it)."""
    me = psutil.Process()
    command = [
        sys.executable,
        "-m",
        "alphaloom.tasks.orchestration.reaper",
        str(me.pid),
        repr(me.create_time()),
        str(interval),
    ]
    reaper = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    _started.append(reaper)
    return reaper


def _gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _note_descendants(parent: psutil.Process, noted: dict[int, psutil.Process]) -> None:
    """Add the parent's current descendants (not this reaper) and forget those that ended."""
    try:
        children = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    me = psutil.Process().pid
    for child in children:
        if child.pid != me:
            noted.setdefault(child.pid, child)
    for pid in [pid for pid, process in noted.items() if not process.is_running()]:
        del noted[pid]


def reap(processes: list[psutil.Process], grace: float = GRACE_SECONDS) -> list[int]:
    """SIGTERM the processes still running (psutil checks pid and start time), SIGKILL those
    that outlast `grace`; returns the pids signalled."""
    return kill_stragglers(terminate(processes), grace)


def terminate(processes: list[psutil.Process]) -> list[psutil.Process]:
    """SIGTERM the processes still running (psutil checks pid and start time); returns them."""
    alive = [p for p in processes if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    return alive


def kill_stragglers(processes: list[psutil.Process], grace: float) -> list[int]:
    """Wait up to `grace` seconds for processes already sent SIGTERM, SIGKILL those still
    running (a second SIGTERM would cut short the cleanup of one that handles the first);
    returns their pids."""
    _, stubborn = psutil.wait_procs(processes, timeout=grace)
    for process in stubborn:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(stubborn, timeout=1.0)
    return [p.pid for p in processes]


def watch(pid: int, started: float, interval: float = 0.5) -> list[int]:
    """Watch process `pid` (started at `started`, psutil's create_time) until it is gone, then
    reap the descendants it left; returns their pids."""
    try:
        parent = psutil.Process(pid)
        if abs(parent.create_time() - started) > 1e-3:
            return []  # the pid was reused: the process to watch is already gone
    except psutil.NoSuchProcess:
        return []
    noted: dict[int, psutil.Process] = {}
    while not _gone(parent):
        _note_descendants(parent, noted)
        time.sleep(interval)
    return reap(list(noted.values()))


def main(argv: list[str]) -> int:
    """`python -m alphaloom.tasks.orchestration.reaper PID START_TIME [INTERVAL]`."""
    pid, started = int(argv[0]), float(argv[1])
    interval = float(argv[2]) if len(argv) > 2 else 0.5
    watch(pid, started, interval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
