"""SIGTERM and SIGINT stop every long command within 10 s: exit status 128 + the signal, open
MLflow runs KILLED, no child process left (Prefect's temporary server, the reaper), no partial
output. Each command runs as a real `alphaloom` process that gets a real signal mid-training."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import psutil
import pytest

from alphaloom.tasks.common import storage
from alphaloom.tasks.orchestration import shutdown
from alphaloom.tasks.tracking import resume, runs

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"
DEADLINE = 10.0  # seconds from the signal to the exit

# Enough epochs to be still training when the signal comes; each epoch is two batches.
QUICK = [
    "data.synthetic.n_symbols=30",
    "data.synthetic.n_days=320",
    "text.enabled=false",
    "model.use_text=false",
    "model.use_attention=false",
    "train.epochs=5000",
    "train.patience=5000",
    "train.max_batches_per_epoch=2",
    "train.device=cpu",
    "train.num_threads=1",
]
BACKTEST = [
    "backtest.retrain_months=2",
    "backtest.train_months=6",
    "backtest.valid_months=2",
    "backtest.end=2020-02-28",
]


@pytest.fixture(scope="module")
def store_template(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made, copied per test (migrating one costs
    seconds)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="module")
def shared_api(prefect_harness) -> str:
    """The session's Prefect server, for commands that need not start their own (one start
    costs 20-40 s here); `run` starts its own, to show that one is stopped too."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def child_env(tmp: Path, store: Path, api: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    shutil.copy(store, tmp / "mlflow.db")
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        PREFECT_HOME=str(tmp / "prefect-home"),
        PREFECT_LOGGING_TO_API_ENABLED="false",
    )
    if api:
        env["PREFECT_API_URL"] = api
    return env


def wait_until(ready, process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"ended (rc {process.returncode}) before the signal:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"never got ready:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)


def in_training(work: Path):
    """True once an epoch is checkpointed: an MLflow run is open and training goes on."""
    return lambda: any(work.glob("checkpoints/*/checkpoint.pt"))


def signal_and_check(
    process: subprocess.Popen, signum: int, log: Path, server_expected: bool
) -> list[psutil.Process]:
    """Send `signum`; the process must exit within DEADLINE with 128 + signum and leave none of
    its descendants (taken just before the signal) or its process group running."""
    descendants = psutil.Process(process.pid).children(recursive=True)
    servers = [p for p in descendants if "prefect.server.api.server" in " ".join(p.cmdline())]
    assert bool(servers) == server_expected, [p.cmdline() for p in descendants]
    sent = time.monotonic()
    process.send_signal(signum)
    try:
        code = process.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running {DEADLINE} s after {signum}:\n{log.read_text()[-4000:]}")
    took = time.monotonic() - sent
    text = log.read_text()
    assert code == 128 + signum, text[-4000:]
    assert took < DEADLINE
    assert f"stopped by {signal.Signals(signum).name}" in text
    _, survivors = psutil.wait_procs(descendants, timeout=10)
    assert not survivors, [p.cmdline() for p in survivors]
    group = [p for p in psutil.process_iter() if _pgid(p) == process.pid]
    assert not group, [p.cmdline() for p in group]
    return descendants


def _pgid(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except OSError:
        return None


def assert_runs_killed(env: dict[str, str], signum: int, at_least: int) -> None:
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    found = [
        run
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id])
    ]
    assert len(found) >= at_least
    for run in found:
        assert run.info.status == "KILLED", (run.info.run_name, run.info.status)
        assert run.data.tags[runs.TAG_DIED].startswith(f"stopped by {signal.Signals(signum).name}")


def stall_a_fit_worker(one: Launched) -> None:
    """Freeze (SIGSTOP) the fit worker that owns an open period run once two are open, as a
    worker stuck in a long call that holds the GIL is: it cannot mark its run KILLED itself."""
    client = mlflow.MlflowClient(one.env["MLFLOW_TRACKING_URI"])

    def open_period_runs() -> list[mlflow.entities.Run]:
        return [
            run
            for experiment in client.search_experiments()
            for run in client.search_runs(
                [experiment.experiment_id], filter_string="attributes.status = 'RUNNING'"
            )
            if run.info.run_name.startswith("period ")
        ]

    wait_until(lambda: len(open_period_runs()) >= 2, one.process, one.log)
    owners = [json.loads(run.data.tags[resume.TAG_OWNER])["pid"] for run in open_period_runs()]
    workers = {child.pid for child in psutil.Process(one.process.pid).children(recursive=True)}
    stalled = max(pid for pid in owners if pid in workers)
    os.kill(stalled, signal.SIGSTOP)


def assert_no_partial_output(work: Path) -> None:
    partial = [p for p in work.rglob(".*") if ".tmp-" in p.name or ".parts-" in p.name]
    assert not partial, partial


def launch(args: list[str], tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    log = tmp / "out.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "alphaloom.flows.cli", *args],
            cwd=tmp,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the check, and no stray signals
        )
    return process, log


def overrides(*items: str) -> list[str]:
    return [token for item in items for token in ("--set", item)]


# ----------------------------------------------------------------------------------------------
# real commands, real signals


@dataclass
class Launched:
    process: subprocess.Popen
    log: Path
    env: dict[str, str]
    work: Path


# command -> (signal, MLflow runs open mid-training: compare and backtest have a parent run and
# the first variant's / period's run)
# (in the order they get ready: `run` starts its own Prefect server)
COMMANDS = {
    "serve": (signal.SIGTERM, 0),
    "nightly": (signal.SIGINT, 1),
    "compare": (signal.SIGINT, 2),
    "backtest": (signal.SIGTERM, 2),
    "run": (signal.SIGTERM, 1),
}


# `run` starts its own temporary Prefect server, to show that one is stopped too; `serve` does,
# because registering its deployments while four other commands write flow runs to the shared
# server was refused with 503 (SQLite busy) on this 2-core machine.
OWN_SERVER = ("run", "serve")


@pytest.fixture(scope="module")
def launched(tmp_path_factory, store_template: Path, shared_api: str) -> Iterator[dict]:
    """Every command started at once (each start costs 20-40 s here, mostly imports): `run` and
    `serve` with their own temporary Prefect servers, the others on the session's."""
    started: dict[str, Launched] = {}
    for command in COMMANDS:
        tmp = tmp_path_factory.mktemp(command)
        work = tmp / "work"
        env = child_env(tmp, store_template, api=None if command in OWN_SERVER else shared_api)
        if command == "serve":
            args = ["serve", "--config", str(SMOKE)]
        else:
            extra: list[str] = []
            if command == "compare":
                (tmp / "variants.yaml").write_text("- full\n")
                extra = ["--seeds", "1", "--variants", str(tmp / "variants.yaml")]
            sets = [f"work_dir={work}", *QUICK, *(BACKTEST if command == "backtest" else [])]
            args = [command, "--config", str(SMOKE), *extra, *overrides(*sets)]
        process, log = launch(args, tmp, env)
        started[command] = Launched(process, log, env, work)
    yield started
    for one in started.values():
        if one.process.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(one.process.pid, signal.SIGKILL)
            one.process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_signal_stops_a_long_command(command: str, launched: dict[str, Launched]) -> None:
    """Mid-training (for `serve`: serving), the signal stops the command within 10 s."""
    one = launched[command]
    signum, runs_open = COMMANDS[command]
    if command == "serve":
        wait_until(lambda: "being served" in one.log.read_text(), one.process, one.log)
    else:
        wait_until(in_training(one.work), one.process, one.log)
    if command == "backtest":  # a fit worker too busy to mark its own run: the command does
        stall_a_fit_worker(one)
    signal_and_check(one.process, signum, one.log, server_expected=command in OWN_SERVER)
    if runs_open:
        assert_runs_killed(one.env, signum, at_least=runs_open)
        assert_no_partial_output(one.work)


# ----------------------------------------------------------------------------------------------
# the parts, in this process


def test_outside_a_stop_nothing_changes_and_handlers_are_restored() -> None:
    before = {signum: signal.getsignal(signum) for signum in shutdown.SIGNALS}
    calls = []
    with shutdown.handling_signals():
        assert all(signal.getsignal(s) is shutdown._handle for s in shutdown.SIGNALS)
        import prefect.utilities.engine as engine

        assert engine._prefect_sigterm_handler is shutdown._handle  # Prefect's bridge routed here
        with shutdown.on_stop(calls.append):
            shutdown.park_if_stopping()  # returns at once: nothing is stopping
    assert {signum: signal.getsignal(signum) for signum in shutdown.SIGNALS} == before
    assert engine._prefect_sigterm_handler is not shutdown._handle
    assert calls == [] and not shutdown.stopping()
    assert shutdown.stoppable("synth", print) is print  # short commands are left alone


def test_live_temporaries_name_their_writer_and_are_removed_on_a_stop(tmp_path: Path) -> None:
    target = tmp_path / "out" / "key"
    started, release = threading.Event(), threading.Event()

    def write() -> None:
        with pytest.raises(FileNotFoundError), storage.atomic_file(target) as tmp:
            tmp.write_text("partial")
            started.set()
            release.wait(10)

    writer = threading.Thread(target=write)
    writer.start()
    assert started.wait(10)
    (temp,) = (tmp_path / "out").glob(".key.tmp-*")
    assert temp.name.startswith(f".key.tmp-{storage.temp_tag()}-")
    assert temp in storage.remove_live_temps()  # (other tests' writers may be live too)
    assert not temp.exists()
    release.set()
    writer.join(10)
    assert not target.exists()


def test_a_run_being_made_when_a_stop_begins_is_still_marked_killed(tmp_path: Path) -> None:
    """The signal falls between a run's creation and its stop hook (a fit worker starting its
    period's run as the command is stopped): the stop waits for the run and marks it KILLED."""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("stops")
    created: list[str] = []
    made, release, inside, leave = (threading.Event() for _ in range(4))

    def make_run() -> str:
        created.append(client.create_run(experiment_id).info.run_id)
        made.set()
        release.wait(30)  # RUNNING, its hook not yet registered
        return created[0]

    def work() -> None:
        with runs.owned_run(client, make_run):
            inside.set()
            leave.wait(30)

    worker = threading.Thread(target=work)
    worker.start()
    assert made.wait(60)
    first_pass = threading.Event()
    marked: list[int] = []
    stopper = threading.Thread(
        target=shutdown._run_hooks,
        args=("stopped by SIGTERM (test)", marked, time.monotonic() + 30, False),
    )
    with shutdown.on_stop(lambda _why: first_pass.set()):
        stopper.start()
        assert first_pass.wait(10)  # the hooks registered at the signal have run
        release.set()
        stopper.join(30)
    assert inside.wait(10)
    killed = client.get_run(created[0])
    leave.set()
    worker.join(30)
    assert killed.info.status == "KILLED"
    assert killed.data.tags[runs.TAG_DIED] == "stopped by SIGTERM (test)"
    assert sum(marked) == 1  # the made run; the first hook marks nothing
