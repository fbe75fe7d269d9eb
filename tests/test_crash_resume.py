"""kill -9 in the middle of training, then a plain rerun: it continues the same MLflow run from
the last checkpoint and ends with exactly the weights of an uninterrupted run; the killed
process leaves neither a RUNNING run nor Prefect's temporary server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from alphaloom.tasks.common.config import load_config
from alphaloom.tasks.tracking import resume, runs
from alphaloom.tasks.training.checkpoint import BEST_STATE_NAME, CHECKPOINT_NAME, load_checkpoint
from alphaloom.tasks.training.train import train_model

REPO = Path(__file__).resolve().parent.parent
EPOCHS, KILL_EPOCH, KILL_BATCH = 6, 2, 3

# `alphaloom run` with training made to stop (sleep) after batch KILL_BATCH of epoch KILL_EPOCH,
# so the test can kill it there for certain; it writes its pid to a marker file first.
_HANG_IN_TRAINING = """
import os, sys, time
from pathlib import Path

import alphaloom.tasks.training.train as train
from alphaloom.flows.cli import main

marker, epoch, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
original = train.train_epoch


def train_epoch(parts, state, cfg, on_batch, progress):
    def hang_there(flush):
        on_batch(flush)
        if (state.epoch, state.batch) == (epoch, batch):
            marker.write_text(str(os.getpid()))
            time.sleep(3600)

    return original(parts, state, cfg, hang_there, progress)


train.train_epoch = train_epoch
sys.exit(main(sys.argv[4:]))
"""


def overrides(work: Path) -> list[str]:
    return [
        f"work_dir={work}",
        f"train.epochs={EPOCHS}",
        f"train.patience={EPOCHS}",
        "train.device=cpu",
        "train.num_threads=1",
        "text.enabled=false",
        "model.use_text=false",
        "tracking.experiment=crash-resume",
        "tracking.registered_model=crash-resume",
    ]


def cli_args(work: Path) -> list[str]:
    args = ["run", "--config", str(REPO / "configs" / "smoke.yaml")]
    for item in overrides(work):
        args += ["--set", item]
    return args


def child_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        PREFECT_HOME=str(tmp / "prefect-home"),  # its own temporary server and database
    )
    return env


def wait_for(marker: Path, process: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None:
            out = process.stdout.read() if process.stdout else ""
            pytest.fail(f"alphaloom run ended (rc {process.returncode}) before the kill:\n{out}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("alphaloom run never reached the kill point")
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_in_training_then_rerun_continues_to_the_same_weights(tmp_path: Path) -> None:
    work, env = tmp_path / "work", child_env(tmp_path)
    marker = tmp_path / "in-training"
    hang_at = [str(marker), str(KILL_EPOCH), str(KILL_BATCH)]
    killed = subprocess.Popen(
        [sys.executable, "-c", _HANG_IN_TRAINING, *hang_at, *cli_args(work)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(marker, killed)
    descendants = psutil.Process(killed.pid).children(recursive=True)
    servers = [p for p in descendants if "prefect.server.api.server" in " ".join(p.cmdline())]
    assert servers, "the run should have started Prefect's temporary server"

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("crash-resume")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    checkpoint = work / "checkpoints" / run_id / CHECKPOINT_NAME
    assert load_checkpoint(checkpoint)["state"]["epoch"] == KILL_EPOCH  # epochs 0, 1 are saved

    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    killed.stdout.close()
    _, survivors = psutil.wait_procs(descendants, timeout=60)
    assert not survivors, f"left running after kill -9: {[p.cmdline() for p in survivors]}"
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing could end it

    rerun = subprocess.run(
        [sys.executable, "-m", "alphaloom.flows.cli", *cli_args(work)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    assert f"MLflow run:      {run_id}" in rerun.stdout  # the same run, continued

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[resume.TAG_RESUMED] == "1"
    assert f"process {killed.pid}" in run.data.tags[resume.TAG_DIED]  # found dead, marked
    assert len(client.search_runs([experiment.experiment_id])) == 1
    # Epochs 0 and 1 were not trained again: each epoch logged once, then the final evaluation.
    steps = sorted(m.step for m in client.get_metric_history(run_id, "valid/rank_ic"))
    assert steps == [*range(EPOCHS), EPOCHS]
    assert len(run.inputs.dataset_inputs) == 1

    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides(work))
    reference = train_model(run.data.tags[runs.TAG_SHARD_DIR], cfg, tmp_path / "uninterrupted")
    assert len(reference.history) == EPOCHS
    for name in (CHECKPOINT_NAME, BEST_STATE_NAME):
        resumed = torch.load(work / "checkpoints" / run_id / name, weights_only=True)
        straight = torch.load(tmp_path / "uninterrupted" / name, weights_only=True)
        if name == CHECKPOINT_NAME:
            resumed, straight = resumed["model"], straight["model"]
        assert resumed.keys() == straight.keys()
        assert all(torch.equal(resumed[k], straight[k]) for k in straight), name
