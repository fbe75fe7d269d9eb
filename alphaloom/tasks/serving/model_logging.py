"""The model as MLflow logs it: a pyfunc 'model from code' that needs no pickle to load.

Models are logged as MLflow "models from code" pyfunc models: a small script (written from
`_MODEL_CODE` below) rebuilds `alphaloom.model.network.SequenceModel` from a JSON spec and loads a
plain state_dict with `torch.load(weights_only=True)`, so loading never unpickles anything. They
are logged with the public `mlflow.pyfunc.log_model`, which logs to the active run only, so the
call runs inside `TrackedRun.active` (that run active in the calling thread for the one call). The
PyTorch flavor's default `pt2` format was measured against it (benchmarks/model_format.py), unused:
it takes only a tensor or a list of tensors (the network takes a dict batch, so it needs an
adapter per input-key set), has no pyfunc flavor, and was slower to log (4.9 s vs 1.3 s) and to
load and score in a fresh process (8.9 s vs 5.6 s) on the tiny model here.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec

from alphaloom.model.ensemble import members_of
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.serving.bundle import write_bundle
from alphaloom.tasks.tracking.runs import TrackedRun

log = logging.getLogger(__name__)


MODEL_INPUT_KEYS = ("x", "mask", "text", "has_text", "industry", "index", "dow", "month")


MODEL_TYPE = "alphaloom-ranker"  # the logged model's type, to search for in the MLflow UI


_MODEL_CODE = '''"""alphaloom ranker: MLflow pyfunc model from code.

Written by alphaloom.tasks.serving.model_logging. Rebuilds alphaloom.model.network.SequenceModel
(or a SeedEnsemble of spec["ensemble"] of them) from spec.json and loads state_dict.pt with
torch.load(weights_only=True): nothing is unpickled.
The serving bundle (preprocess.json, symbols.parquet, text_vectors.npy) holds the preprocessing
of the shard set it was trained on. Input: a DataFrame of raw bars (symbol, date, open, high,
low, close, volume[, amount]) or raw factor rows, plus optional industry / index / description,
-> rank, symbol, date, score, p0..p3; or a dict of batch arrays -> score, p0..p3. See
alphaloom.tasks.serving.ranking.
"""

import json
from types import SimpleNamespace

import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class AlphaloomRanker(PythonModel):
    def load_context(self, context):
        from alphaloom.model.network import SequenceModel
        from alphaloom.tasks.serving.bundle import load_bundle

        with open(context.artifacts["spec"]) as handle:
            spec = json.load(handle)
        def network():
            return SequenceModel(spec=SimpleNamespace(**spec["model"]), **spec["dims"])

        members = int(spec.get("ensemble", 1))  # a seed ensemble: all members' weights in one
        if members == 1:
            model = network()
        else:
            from alphaloom.model.ensemble import SeedEnsemble

            model = SeedEnsemble([network() for _ in range(members)])
        state = torch.load(context.artifacts["state_dict"], map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self.model = model.eval()
        self.spec = spec
        self.keys = spec["input_keys"]
        self.bundle = load_bundle(context.artifacts)

    # The hint names the frame MLflow's serving passes; MLflow infers no schema from a DataFrame
    # hint and so leaves the input to ranking.predict, which also takes a dict of batch arrays
    # and checks either, naming every problem.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        from alphaloom.tasks.serving.ranking import predict

        return predict(self.model, self.bundle, model_input, params)


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


# What the served model imports besides torch and mlflow: the factor, normalisation and window
# code of the bundled `alphaloom` package (pyarrow for parquet, pydantic/yaml for the config
# sections, fsspec and prefect through the features module). sentence-transformers is left out:
# it only embeds descriptions of symbols the model has never seen (tasks/serving/bundle.py).
SERVING_DISTRIBUTIONS = ("numpy", "pandas", "pyarrow", "pydantic", "PyYAML", "fsspec", "prefect")


def pip_requirements() -> list[str]:
    """Pinned requirements of the logged model (explicit: inference would load it, ~20 s)."""
    from importlib.metadata import version

    def base(text: str) -> str:
        return text.split("+")[0]

    pinned = [f"{name}=={version(name)}" for name in SERVING_DISTRIBUTIONS]
    return [f"mlflow=={mlflow.__version__}", f"torch=={base(torch.__version__)}", *pinned]


def _signature() -> ModelSignature:
    """Params only: the model takes two input shapes (a frame of raw rows, or a dict of batch
    arrays, tasks/serving/ranking.py) and a signature holds one input schema, which MLflow would
    then enforce on both; the inputs are checked by the model itself, naming every problem.
    `member` (>= 0) scores with one member of a seed ensemble only (tasks/serving/ranking.py)."""
    return ModelSignature(
        params=ParamSchema(
            [ParamSpec("all_dates", "boolean", False), ParamSpec("member", "long", -1)]
        )
    )


def log_ranker(
    cfg: PipelineConfig,
    run_id: str,
    model: torch.nn.Module,
    dims: Mapping[str, int],
    example: Mapping[str, np.ndarray],
    feature_names: Iterable[str],
    register: bool = True,
    with_example: bool = True,
    *,
    shard_dir: str | Path,
) -> tuple[str, str | None]:
    """Log the model as a pyfunc (from code) under the run; register it if asked.

    `dims` are SequenceModel's size arguments (n_features, text_dim, n_industries, n_indices);
    `feature_names` are recorded so the registry can tell whether a later shard set still fits.
    `shard_dir` is the shard set it was trained on: its preprocessing is logged with it (the
    serving bundle, tasks/serving/bundle.py), so the model scores raw bars on its own.
    Returns (model URI, registered version or None).
    """
    spec = {
        "model": cfg.model.model_dump(mode="json"),
        "dims": {k: int(v) for k, v in dims.items()},
        "input_keys": list(example),
        "feature_names": list(feature_names),
    }
    members = members_of(model)
    if len(members) > 1:  # one model holding every member's weights (state_dict.pt)
        seeds = [cfg.train.seed + i for i in range(len(members))]
        spec |= {"ensemble": len(members), "member_seeds": seeds}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="alphaloom-model-") as tmp:
        tmp_dir = Path(tmp)
        (tmp_dir / "spec.json").write_text(json.dumps(spec, indent=2))
        torch.save(state, tmp_dir / "state_dict.pt")
        code = tmp_dir / "alphaloom_ranker.py"
        code.write_text(_MODEL_CODE)
        bundle = write_bundle(shard_dir, cfg, tmp_dir / "bundle")
        # mlflow.pyfunc.log_model takes no run id: it logs to the calling thread's active run,
        # and creates the logged model in that run's experiment (not the fluent default one).
        with TrackedRun.of(cfg, run_id).active():
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),  # a file path: a model from code, nothing pickled
                artifacts={
                    "spec": str(tmp_dir / "spec.json"),
                    "state_dict": str(tmp_dir / "state_dict.pt"),
                    **bundle,
                },
                code_paths=[str(package_source(tmp_dir / "code"))],
                pip_requirements=pip_requirements(),
                signature=_signature(),
                input_example=dict(example) if with_example else None,
                registered_model_name=cfg.tracking.registered_model if register else None,
                await_registration_for=0,
                model_type=MODEL_TYPE,
            )
    version = info.registered_model_version
    log.info("logged model %s (version %s)", info.model_uri, version)
    return info.model_uri, None if version is None else str(version)
