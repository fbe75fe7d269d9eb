"""MLflow tracking: one run per pipeline run, logged through `MlflowClient` with explicit run ids.

MLflow's fluent "active run" is thread-local, and Prefect runs tasks in worker threads, so nothing
relies on one being open: the flow opens a run with `tracked_run`, passes the run id to every task,
and each task logs through one `TrackedRun.of(cfg, run_id)` (the store's client and the id). The
few public APIs that log only to the active run (`mlflow.log_input`, `mlflow.pyfunc.log_model`)
are called inside `TrackedRun.active()`, which makes that run active in the calling thread for
the one call. The default store is
`sqlite:///<cwd>/mlflow.db`; it is created once under a file lock because several processes
migrating a fresh SQLite store at once break it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.types.schema import ColSpec, Schema

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.common.hashing import code_version
from alphaloom.tasks.common.storage import FsPath, Location
from alphaloom.tasks.orchestration import shutdown
from alphaloom.tasks.tracking.store import client_for, ensure_experiment, use_store

log = logging.getLogger(__name__)


REPO_ROOT = Path(__file__).resolve().parents[3]  # the checkout (for its git commit)


TAG_DATA_HASH = "alphaloom.data_hash"


TAG_CODE_VERSION = "alphaloom.code_version"


TAG_TRIGGER = "alphaloom.trigger"


TAG_GIT_COMMIT = "mlflow.source.git.commit"


TAG_SHARD_DIR = "alphaloom.shard_dir"


TAG_SHARD_KEY = "alphaloom.shard_key"


TAG_DIED = "alphaloom.died"  # why a run ended KILLED


_MAX_PARAM_CHARS = 6000


_BATCH_LIMIT = 900  # metrics per log_batch call (MLflow takes 1000)


_PARAM_BATCH_LIMIT = 100  # params per log_batch call (MLflow's limit)


def flatten_config(cfg: PipelineConfig) -> dict[str, str]:
    """The config as dotted params (`train.lr` -> "0.001"); lists and nulls as JSON."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
            return
        text = value if isinstance(value, str) else json.dumps(value)
        out[prefix] = text[:_MAX_PARAM_CHARS]

    walk("", cfg.model_dump(mode="json"))
    return out


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """HEAD's commit of the project checkout, or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


MODEL_CODE_PACKAGES = (
    "alphaloom.model",
    "alphaloom.tasks.training",
    "alphaloom.tasks.evaluation",
    "alphaloom.tasks.tracking",
    "alphaloom.tasks.serving",
)


def model_code_modules() -> list[str]:
    """Every module of the packages that turn a shard set into a model (training through
    registry), found by walking them so that a module split off later is covered too."""
    import importlib
    import pkgutil

    names: set[str] = set()
    for package in MODEL_CODE_PACKAGES:
        path = importlib.import_module(package).__path__
        names.update(info.name for info in pkgutil.walk_packages(path, f"{package}."))
    return sorted(names)


def model_code_version() -> str:
    """Hash of the source of `model_code_modules()`, the run's `alphaloom.code_version` tag."""
    import importlib

    return code_version(*(importlib.import_module(name) for name in model_code_modules()))


def run_tags(shards: Any) -> dict[str, str]:
    """Run tags for a shard set (a `StageRef` or a directory): data hash, shard key, code.

    The data hash is the source-data hash recorded in the shard manifest; the code version
    covers the model-side modules (the data side is in the shard key).
    """
    shard_dir = FsPath.of(getattr(shards, "path", shards))
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    return {
        TAG_DATA_HASH: str(manifest.get("source_hash", "")),
        TAG_SHARD_KEY: str(getattr(shards, "key", shard_dir.name)),
        TAG_SHARD_DIR: shard_dir.id,
        TAG_CODE_VERSION: model_code_version(),
    }


@dataclass(frozen=True)
class TrackedRun:
    """One MLflow run as the code logs to it: the client on the configured store and the run's
    id, explicit in every call (never the thread-local active run, except in `active`).

    Flows pass the run id, a string, to their tasks; a task opens its run once with
    `TrackedRun.of(cfg, run_id)` and logs through it.
    """

    client: mlflow.MlflowClient
    run_id: str

    @classmethod
    def of(cls, cfg: PipelineConfig, run_id: str) -> TrackedRun:
        return cls(client_for(cfg), run_id)

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None, prefix: str = ""
    ) -> None:
        """Log scalar metrics (NaN kept: it says "undefined", not "missing") in batches."""
        stamp = int(time.time() * 1000)
        self._log_metric_batches(
            [
                Metric(f"{prefix}{k}", float(v), stamp, step or 0)
                for k, v in metrics.items()
                if v is not None and not (isinstance(v, float) and math.isinf(v))
            ]
        )

    def log_history(self, name: str, values: Iterable[float], first_step: int = 0) -> None:
        """Log a series of one metric, the i-th value at step `first_step + i` (a curve)."""
        stamp = int(time.time() * 1000)
        self._log_metric_batches(
            [Metric(name, float(v), stamp, step) for step, v in enumerate(values, first_step)]
        )

    def _log_metric_batches(self, entries: list[Metric]) -> None:
        for start in range(0, len(entries), _BATCH_LIMIT):
            self.client.log_batch(self.run_id, metrics=entries[start : start + _BATCH_LIMIT])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values stringified) in batches."""
        entries = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for start in range(0, len(entries), _PARAM_BATCH_LIMIT):
            self.client.log_batch(self.run_id, params=entries[start : start + _PARAM_BATCH_LIMIT])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified)."""
        entries = [RunTag(k, str(v)) for k, v in tags.items()]
        if entries:
            self.client.log_batch(self.run_id, tags=entries)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_artifact(self, local_file: str | Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(local_file), folder)

    def log_artifacts(self, local_dir: str | Path, folder: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), folder)

    def log_figures(self, figures: Mapping[str, Any], folder: str = "plots") -> None:
        """Log matplotlib figures as PNG artifacts under `folder/` (DataFrames as CSV tables)."""
        import pandas as pd

        for name, item in figures.items():
            if isinstance(item, pd.DataFrame):
                self.log_text(item.to_csv(index=False), f"{folder}/{name}")
            else:
                self.log_figure(item, f"{folder}/{name}")

    def log_evaluation(
        self,
        split: str,
        metrics: Mapping[str, float],
        figures: Mapping[str, Any] | None = None,
        step: int | None = None,
    ) -> None:
        """Log one split's evaluation as `<split>/<metric>` plus its plots under plots/<split>/.

        The metrics go in at `step`, by default one past the highest step the run already has
        for any `<split>/` metric (training logs `valid/ic` and `valid/rank_ic` per epoch at
        step = epoch): MLflow shows the value at the highest step as a metric's value, so the
        evaluation of the selected model is what the run reports, and the per-epoch history
        stays intact.
        """
        prefix = f"{split}/"
        if step is None:
            step = self.next_step(prefix)
        self.log_metrics(metrics, step=step, prefix=prefix)
        if figures:
            self.log_figures(figures, folder=f"plots/{split}")

    def next_step(self, prefix: str) -> int:
        """One past the highest step of the run's metrics named `<prefix>...`; 0 when none."""
        names = [n for n in self.client.get_run(self.run_id).data.metrics if n.startswith(prefix)]
        steps = [
            metric.step
            for name in names
            for metric in self.client.get_metric_history(self.run_id, name)
        ]
        return max(steps) + 1 if steps else 0

    def log_shard_dataset(self, shard_dir: Location, context: str = "training") -> None:
        """Record the shard set as the run's dataset input (digest = sha256 of its manifest)."""
        from mlflow.data.meta_dataset import MetaDataset

        location = FsPath.of(shard_dir)
        manifest_file = location / "manifest.json"
        if not manifest_file.is_file():
            raise FileNotFoundError(f"shard manifest not found: {manifest_file}")
        manifest_bytes = manifest_file.read_bytes()
        manifest = json.loads(manifest_bytes)
        features = manifest.get("feature_names") or []
        schema = Schema([ColSpec("double", str(name)) for name in features]) if features else None
        source = _dataset_source(location)
        if source is not None:
            dataset = MetaDataset(
                source=source,
                name=f"shards-{location.name}",
                digest=hashlib.sha256(manifest_bytes).hexdigest()[:20],
                schema=schema,
            )
            with self.active():  # mlflow.log_input logs to the active run only
                mlflow.log_input(dataset, context=context)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "manifest.json"
            copy.write_bytes(manifest_bytes)
            self.log_artifact(copy, "dataset")
        self.set_tags({TAG_SHARD_DIR: location.id})

    @contextlib.contextmanager
    def active(self) -> Iterator[mlflow.ActiveRun]:
        """Make this run MLflow's active run in the calling thread for the block, then
        deactivate it in its previous status.

        For public APIs that take no run id and log to the active run (`mlflow.log_input`,
        `mlflow.pyfunc.log_model`). MLflow keeps the active-run stack per thread, so two tasks
        doing this at once in Prefect's worker threads each see their own; `nested=True` lets a
        caller that already has an active run use it too. Leaving the block restores the status
        the run had (normally RUNNING: the flow's `tracked_run` ends it), where
        `with mlflow.start_run()` would mark it FINISHED mid-pipeline.
        """
        use_store(self.client.tracking_uri)  # the fluent API logs to the global store
        status = self.client.get_run(self.run_id).info.status
        run = mlflow.start_run(run_id=self.run_id, nested=True)
        try:
            yield run
        finally:
            mlflow.end_run(status=status)

    def end(self, failed: bool) -> None:
        """Mark the run FINISHED or FAILED."""
        status = RunStatus.FAILED if failed else RunStatus.FINISHED
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(status))

    def mark_stopped(self, why: str) -> bool:
        """End the run KILLED if it is RUNNING, saying why in `alphaloom.died`; False if it had
        ended."""
        if self.client.get_run(self.run_id).info.status != RunStatus.to_string(RunStatus.RUNNING):
            return False
        self.set_tags({TAG_DIED: why[:5000]})
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.KILLED))
        return True


def start_run(
    cfg: PipelineConfig, tags: Mapping[str, str] | None = None, run_name: str | None = None
) -> str:
    """Create a RUNNING run with the config as params and YAML artifact; return its id.

    `tags` should carry `alphaloom.data_hash` and `alphaloom.code_version` (the flow knows
    them); the trigger and git commit are added here.
    """
    client = client_for(cfg)
    experiment_id = ensure_experiment(client, cfg)
    shutdown.park_if_stopping()  # no new run once a signal is stopping the process
    all_tags = {TAG_TRIGGER: cfg.tracking.trigger, **(tags or {})}
    commit = git_commit()
    if commit and TAG_GIT_COMMIT not in all_tags:
        all_tags[TAG_GIT_COMMIT] = commit
    created = client.create_run(
        experiment_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=run_name
    )
    run = TrackedRun(client, created.info.run_id)
    run.log_params(flatten_config(cfg))
    run.log_text(cfg.to_yaml(), "config.yaml")
    return run.run_id


def _signal_of(err: BaseException) -> int | None:
    """The signal an exception stands for: KeyboardInterrupt (SIGINT) or Prefect's
    TerminationSignal (SIGTERM, raised by its flow engine in a flow-run process)."""
    from prefect.exceptions import TerminationSignal

    if isinstance(err, KeyboardInterrupt):
        return signal.SIGINT
    return err.signal if isinstance(err, TerminationSignal) else None


@contextlib.contextmanager
def ending_run(run: TrackedRun) -> Iterator[str]:
    """Yield the run's id; the run ends FAILED if the block raises (anything) and FINISHED else.

    A SIGTERM or SIGINT meanwhile ends it KILLED instead (tasks/orchestration/shutdown.py): the
    stop thread marks it, and this thread waits for the exit rather than ending it."""
    with shutdown.on_stop(run.mark_stopped):
        try:
            yield run.run_id
        except BaseException as err:
            shutdown.park_if_stopping()
            signum = _signal_of(err)
            if signum is not None:  # where the handlers of shutdown.py are not installed
                why = f"stopped by {signal.Signals(signum).name} ({type(err).__name__})"
                with contextlib.suppress(Exception):
                    run.mark_stopped(why)
                raise
            with contextlib.suppress(Exception):
                run.set_tags({"alphaloom.error": f"{type(err).__name__}: {err}"[:5000]})
            run.end(failed=True)
            raise
        shutdown.park_if_stopping()
        run.end(failed=False)


@contextlib.contextmanager
def owned_run(client: mlflow.MlflowClient, make_run: Callable[[], str]) -> Iterator[str]:
    """`ending_run` of the RUNNING run `make_run()` creates or reopens. A signal that arrives
    while the run is being made still ends it KILLED: the stop waits for it to be made and its
    hook registered (`shutdown.making_run`)."""
    with contextlib.ExitStack() as stack:
        with shutdown.making_run():
            run_id = stack.enter_context(ending_run(TrackedRun(client, make_run())))
        yield run_id


@contextlib.contextmanager
def tracked_run(
    cfg: PipelineConfig, tags: Mapping[str, str] | None = None, run_name: str | None = None
) -> Iterator[str]:
    """Yield a new run's id; the run ends FAILED if the block raises (anything), FINISHED else."""
    with owned_run(client_for(cfg), lambda: start_run(cfg, tags, run_name)) as run_id:
        yield run_id


def _dataset_source(location: FsPath) -> Any:
    """MLflow's dataset source for a shard location: a local path, or a URL scheme MLflow knows
    (s3://, gs://, ...); None for others (memory://), whose runs keep the tag and manifest."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.sources import LocalArtifactDatasetSource

    if location.local is not None:
        # Named directly: MLflow registers two local sources, and resolving a path warns that
        # it matches both.
        return LocalArtifactDatasetSource(str(location.local.resolve()))
    try:
        return resolve_dataset_source(location.url)
    except MlflowException:
        log.info("MLflow has no dataset source for %s; logging the manifest only", location)
        return None
