"""The reaper: what a SIGKILLed command started (Prefect's temporary server, DDP ranks) dies too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

_PARENT = """
import subprocess, sys, time
from alphaloom.tasks.orchestration.reaper import start_reaper

reaper = start_reaper(interval=0.1)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(child.pid, reaper.pid, flush=True)
time.sleep(float(sys.argv[1]))
"""


def start_parent(lifetime: float) -> tuple[subprocess.Popen, psutil.Process, psutil.Process]:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(lifetime)], stdout=subprocess.PIPE, text=True
    )
    child_pid, reaper_pid = map(int, parent.stdout.readline().split())
    return parent, psutil.Process(child_pid), psutil.Process(reaper_pid)


def test_a_sigkilled_parent_leaves_no_child_running() -> None:
    parent, child, reaper = start_parent(lifetime=300)
    try:
        time.sleep(1.0)  # the reaper notes the child
        assert child.is_running()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        _, alive = psutil.wait_procs([child, reaper], timeout=30)
        assert not alive, f"still running: {alive}"
    finally:
        for process in (child, reaper):
            if process.is_running():
                process.kill()


def test_a_reaper_ends_with_its_parent_and_spares_unrelated_processes() -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        parent, child, reaper = start_parent(lifetime=1.0)
        parent.wait(timeout=30)
        _, alive = psutil.wait_procs([reaper], timeout=30)
        assert not alive  # the reaper does not outlive the process it watches
        assert bystander.poll() is None  # never a descendant of the parent: untouched
        psutil.wait_procs([child], timeout=30)
        assert not child.is_running()  # orphaned by the parent's exit, so reaped too
    finally:
        bystander.kill()
        bystander.wait()
