"""MLflow tracking: one run per pipeline run, logged through `MlflowClient` with explicit run ids.

MLflow's fluent "active run" is thread-local, and Prefect runs tasks in worker threads, so nothing
here relies on it: the flow opens a run with `tracked_run`, passes the run id to every task, and
each task logs with the client. The default store is `sqlite:///<cwd>/mlflow.db`; it is created
once under a file lock because several processes migrating a fresh SQLite store at once break it.

Models are logged as MLflow "models from code" pyfunc models: a small script (written from
`_MODEL_CODE` below) rebuilds `model.network.SequenceModel` from a JSON spec and loads a plain
state_dict with `torch.load(weights_only=True)`, so loading never unpickles anything. The PyTorch
flavor's default `pt2` format was measured against it (benchmarks/model_format.py) and not used:
it takes only a tensor or a list of tensors (the network takes a dict batch, so it needs an
adapter per input-key set), has no pyfunc flavor, and was slower to log (4.9 s vs 1.3 s) and to
load and score in a fresh process (8.9 s vs 5.6 s) on the tiny model here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import torch
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.common.hashing import code_version
from alphaloom.tasks.common.storage import (
    Location,
    base_name,
    child,
    is_file,
    local_or_url,
    location_id,
    read_bytes,
    read_text,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout (for its git commit)
MODEL_INPUT_KEYS = ("x", "mask", "text", "has_text", "industry", "index", "dow", "month")
OUTPUT_COLUMNS = ("score", "p0", "p1", "p2", "p3")
TAG_DATA_HASH = "alphaloom.data_hash"
TAG_CODE_VERSION = "alphaloom.code_version"
TAG_TRIGGER = "alphaloom.trigger"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_SHARD_DIR = "alphaloom.shard_dir"
TAG_SHARD_KEY = "alphaloom.shard_key"
_MAX_PARAM_CHARS = 6000
_BATCH_LIMIT = 900
_READY_STORES: set[str] = set()


# ----------------------------------------------------------------------------------------------
# store


def resolve_tracking_uri(cfg: PipelineConfig) -> str:
    """cfg.tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:"):
        return None
    path = unquote(urlparse(uri).path)
    if path in ("", "/:memory:"):
        return None
    # sqlite:///relative.db parses to "/relative.db" and sqlite:////abs.db to "//abs.db"
    return Path(path[1:])


def ensure_store(uri: str) -> None:
    """Create (migrate) the tracking store once, serialised across processes by a file lock."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if uri in _READY_STORES:
        return
    db = _sqlite_path(uri)
    if db is None:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    else:
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                mlflow.MlflowClient(uri).search_experiments(max_results=1)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    _READY_STORES.add(uri)


def client_for(cfg: PipelineConfig) -> mlflow.MlflowClient:
    """A client on the configured store (created if needed); also sets the global URI for
    MLflow calls that take no client (model logging and loading)."""
    uri = resolve_tracking_uri(cfg)
    ensure_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(uri, registry_uri=uri)


def ensure_experiment(client: mlflow.MlflowClient, cfg: PipelineConfig) -> str:
    """The experiment id, creating it (artifacts beside a SQLite store) when missing."""
    name = cfg.tracking.experiment
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    db = _sqlite_path(client.tracking_uri)
    if db is not None:
        location = (db.resolve().parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # another process created it first
        if found is None:
            raise
        return found.experiment_id


def ui_command(tracking_uri: str, port: int = 5000) -> list[str]:
    """argv for `mlflow ui` on 127.0.0.1 against the tracking store `tracking_uri`."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


# ----------------------------------------------------------------------------------------------
# runs


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


def model_code_version() -> str:
    """Hash of the code that turns a shard set into a model (training through registry)."""
    import importlib

    names = (
        "alphaloom.model.network",
        "alphaloom.model.losses",
        "alphaloom.model.data",
        "alphaloom.tasks.training.train",
        "alphaloom.tasks.evaluation.evaluate",
        "alphaloom.tasks.tracking.tracking",
        "alphaloom.tasks.serving.registry",
    )
    return code_version(*(importlib.import_module(name) for name in names))


def run_tags(shards: Any) -> dict[str, str]:
    """Run tags for a shard set (a `StageRef` or a directory): data hash, shard key, code.

    The data hash is the source-data hash recorded in the shard manifest; the code version
    covers the model-side modules (the data side is in the shard key).
    """
    shard_dir = local_or_url(getattr(shards, "path", shards))
    manifest = json.loads(read_text(child(shard_dir, "manifest.json")))
    return {
        TAG_DATA_HASH: str(manifest.get("source_hash", "")),
        TAG_SHARD_KEY: str(getattr(shards, "key", base_name(shard_dir))),
        TAG_SHARD_DIR: location_id(shard_dir),
        TAG_CODE_VERSION: model_code_version(),
    }


def start_run(
    cfg: PipelineConfig, tags: Mapping[str, str] | None = None, run_name: str | None = None
) -> str:
    """Create a RUNNING run with the config as params and YAML artifact; return its id.

    `tags` should carry `alphaloom.data_hash` and `alphaloom.code_version` (the flow knows
    them); the trigger and git commit are added here.
    """
    client = client_for(cfg)
    experiment_id = ensure_experiment(client, cfg)
    all_tags = {TAG_TRIGGER: cfg.tracking.trigger, **(tags or {})}
    commit = git_commit()
    if commit and TAG_GIT_COMMIT not in all_tags:
        all_tags[TAG_GIT_COMMIT] = commit
    run = client.create_run(
        experiment_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=run_name
    )
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in flatten_config(cfg).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    return run_id


def end_run(cfg: PipelineConfig, run_id: str, failed: bool) -> None:
    """Mark a run FINISHED or FAILED."""
    status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
    client_for(cfg).set_terminated(run_id, status=status)


@contextlib.contextmanager
def tracked_run(
    cfg: PipelineConfig, tags: Mapping[str, str] | None = None, run_name: str | None = None
) -> Iterator[str]:
    """Yield a run id; the run ends FAILED if the block raises (anything) and FINISHED else."""
    run_id = start_run(cfg, tags, run_name)
    try:
        yield run_id
    except BaseException as err:
        with contextlib.suppress(Exception):
            client_for(cfg).set_tag(
                run_id, "alphaloom.error", f"{type(err).__name__}: {err}"[:5000]
            )
        end_run(cfg, run_id, failed=True)
        raise
    end_run(cfg, run_id, failed=False)


# ----------------------------------------------------------------------------------------------
# metrics, params, artifacts


def log_metrics(
    cfg: PipelineConfig,
    run_id: str,
    metrics: Mapping[str, float],
    step: int | None = None,
    prefix: str = "",
) -> None:
    """Log scalar metrics (NaN kept: it says "undefined", not "missing") in batches."""
    stamp = int(time.time() * 1000)
    entries = [
        Metric(f"{prefix}{k}", float(v), stamp, step or 0)
        for k, v in metrics.items()
        if v is not None and not (isinstance(v, float) and math.isinf(v))
    ]
    client = client_for(cfg)
    for start in range(0, len(entries), _BATCH_LIMIT):
        client.log_batch(run_id, metrics=entries[start : start + _BATCH_LIMIT])


def log_params(cfg: PipelineConfig, run_id: str, params: Mapping[str, Any]) -> None:
    """Log extra params (values stringified)."""
    entries = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
    if entries:
        client_for(cfg).log_batch(run_id, params=entries)


def set_tags(cfg: PipelineConfig, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set run tags (values stringified)."""
    entries = [RunTag(k, str(v)) for k, v in tags.items()]
    if entries:
        client_for(cfg).log_batch(run_id, tags=entries)


def log_figures(
    cfg: PipelineConfig, run_id: str, figures: Mapping[str, Any], folder: str = "plots"
) -> None:
    """Log matplotlib figures as PNG artifacts under `folder/`."""
    client = client_for(cfg)
    for name, fig in figures.items():
        client.log_figure(run_id, fig, f"{folder}/{name}")


def log_evaluation(
    cfg: PipelineConfig,
    run_id: str,
    split: str,
    metrics: Mapping[str, float],
    figures: Mapping[str, Any] | None = None,
) -> None:
    """Log one split's evaluation as `<split>/<metric>` plus its plots under plots/<split>/."""
    log_metrics(cfg, run_id, metrics, prefix=f"{split}/")
    if figures:
        log_figures(cfg, run_id, figures, folder=f"plots/{split}")


def log_shard_dataset(
    cfg: PipelineConfig, run_id: str, shard_dir: str | Path, context: str = "training"
) -> None:
    """Record the shard set as the run's dataset input (digest = sha256 of its manifest)."""
    from mlflow.data.meta_dataset import MetaDataset

    location = local_or_url(shard_dir)
    manifest_url = child(location, "manifest.json")
    if not is_file(manifest_url):
        raise FileNotFoundError(f"shard manifest not found: {manifest_url}")
    manifest_bytes = read_bytes(manifest_url)
    manifest = json.loads(manifest_bytes)
    features = manifest.get("feature_names") or []
    schema = Schema([ColSpec("double", str(name)) for name in features]) if features else None
    client = client_for(cfg)
    source = _dataset_source(location)
    if source is not None:
        dataset = MetaDataset(
            source=source,
            name=f"shards-{base_name(location)}",
            digest=hashlib.sha256(manifest_bytes).hexdigest()[:20],
            schema=schema,
        )
        entity = DatasetInput(
            dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]
        )
        client.log_inputs(run_id, datasets=[entity])
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "manifest.json"
        copy.write_bytes(manifest_bytes)
        client.log_artifact(run_id, str(copy), "dataset")
    client.set_tag(run_id, TAG_SHARD_DIR, location_id(location))


def _dataset_source(location: Location) -> Any:
    """MLflow's dataset source for a shard location: a local path, or a URL scheme MLflow knows
    (s3://, gs://, ...); None for others (memory://), whose runs keep the tag and manifest."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source

    if isinstance(location, Path):
        local = [s for s in get_registered_sources() if s._get_source_type() == "local"][:1]
        return resolve_dataset_source(str(location.resolve()), candidate_sources=local)
    try:
        return resolve_dataset_source(location)
    except MlflowException:
        log.info("MLflow has no dataset source for %s; logging the manifest only", location)
        return None


# ----------------------------------------------------------------------------------------------
# the model


_MODEL_CODE = '''"""alphaloom ranker: MLflow pyfunc model from code (written by tasks/tracking.py).

Rebuilds model.network.SequenceModel from spec.json and loads state_dict.pt with
torch.load(weights_only=True): nothing is unpickled. Input: a dict of numpy arrays with the batch
keys of model/batch.py; output: a DataFrame with score = sum_k k * p_k and p0..p3.
"""

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class AlphaloomRanker(PythonModel):
    def load_context(self, context):
        from alphaloom.model.network import SequenceModel, expected_class_score

        with open(context.artifacts["spec"]) as handle:
            spec = json.load(handle)
        model = SequenceModel(spec=SimpleNamespace(**spec["model"]), **spec["dims"])
        state = torch.load(context.artifacts["state_dict"], map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self.model = model.eval()
        self.spec = spec
        self.score = expected_class_score
        self.keys = spec["input_keys"]

    def predict(self, context, model_input, params=None):
        batch = {key: torch.as_tensor(np.asarray(model_input[key])) for key in self.keys}
        with torch.no_grad():
            logits = self.model(batch).float()
        probs = torch.softmax(logits, dim=-1).numpy().astype(np.float64)
        out = pd.DataFrame(probs, columns=[f"p{k}" for k in range(probs.shape[1])])
        out.insert(0, "score", self.score(logits).numpy().astype(np.float64))
        return out


set_model(AlphaloomRanker())
'''


def package_source(dest: Path) -> Path:
    """A copy of the installed `alphaloom` package under `dest` (returns dest/alphaloom).

    The logged model ships it as MLflow code, so a serving process imports `alphaloom.*` (one
    namespace, no top-level `model` or `tasks` on its path) without the project installed. The
    subpackages are copied from wherever they are imported from, which in an editable install of
    the repository are its top-level flows/, tasks/ and model/ folders.
    """
    import importlib
    import shutil

    import alphaloom

    root = dest / "alphaloom"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(alphaloom.__file__).parent, root, ignore=ignore)
    for name in ("flows", "tasks", "model", "configs"):
        package = importlib.import_module(f"alphaloom.{name}")
        source = Path(next(iter(package.__path__)))
        if not (root / name).exists():
            shutil.copytree(source, root / name, ignore=ignore)
    return root


def model_input_example(
    batch: Mapping[str, torch.Tensor], keys: Iterable[str] = MODEL_INPUT_KEYS, rows: int = 4
) -> dict[str, np.ndarray]:
    """The network's inputs (`model.input_keys`) of the first `rows` windows as numpy arrays."""
    return {key: batch[key][:rows].detach().cpu().numpy() for key in keys}


def pip_requirements() -> list[str]:
    """Pinned requirements of the logged model (explicit: inference would load it, ~20 s)."""
    import pandas

    def base(version: str) -> str:
        return version.split("+")[0]

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={base(torch.__version__)}",
        f"numpy=={np.__version__}",
        f"pandas=={pandas.__version__}",
    ]


def _signature(example: Mapping[str, np.ndarray]) -> ModelSignature:
    inputs = Schema(
        [TensorSpec(value.dtype, (-1, *value.shape[1:]), name) for name, value in example.items()]
    )
    outputs = Schema([ColSpec("double", name) for name in OUTPUT_COLUMNS])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_ranker(
    cfg: PipelineConfig,
    run_id: str,
    model: torch.nn.Module,
    dims: Mapping[str, int],
    example: Mapping[str, np.ndarray],
    feature_names: Iterable[str],
    register: bool = True,
    with_example: bool = True,
) -> tuple[str, str | None]:
    """Log the model as a pyfunc (from code) under the run; register it if asked.

    `dims` are SequenceModel's size arguments (n_features, text_dim, n_industries, n_indices);
    `feature_names` are recorded so the registry can tell whether a later shard set still fits.
    Returns (model URI, registered version or None).
    """
    client = client_for(cfg)
    run = client.get_run(run_id)
    # Created here so the model lives in the run's experiment: Model.log would otherwise put it
    # in the fluent "current" experiment (Default, artifacts under ./mlruns) in this thread.
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name="model",
        source_run_id=run_id,
        params=dict(run.data.params),
        model_type="alphaloom-ranker",
    )
    spec = {
        "model": cfg.model.model_dump(mode="json"),
        "dims": {k: int(v) for k, v in dims.items()},
        "input_keys": list(example),
        "feature_names": list(feature_names),
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="alphaloom-model-") as tmp:
        tmp_dir = Path(tmp)
        (tmp_dir / "spec.json").write_text(json.dumps(spec, indent=2))
        torch.save(state, tmp_dir / "state_dict.pt")
        code = tmp_dir / "alphaloom_ranker.py"
        code.write_text(_MODEL_CODE)
        info = Model.log(
            artifact_path=None,
            name="model",
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=str(code),
            artifacts={
                "spec": str(tmp_dir / "spec.json"),
                "state_dict": str(tmp_dir / "state_dict.pt"),
            },
            code_paths=[str(package_source(tmp_dir / "code"))],
            pip_requirements=pip_requirements(),
            signature=_signature(example),
            input_example=dict(example) if with_example else None,
            registered_model_name=cfg.tracking.registered_model if register else None,
            await_registration_for=0,
            model_id=logged.model_id,
        )
    version = info.registered_model_version
    log.info("logged model %s (version %s)", info.model_uri, version)
    return info.model_uri, None if version is None else str(version)
