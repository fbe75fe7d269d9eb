"""Which MLflow format for the ranker: pyfunc "models from code" or the PyTorch flavor's pt2?

For each format: time to log (and register) the model, time for a fresh process to load it from
the registry and score a batch, and whether those scores equal the in-memory model's.

    .venv/bin/python benchmarks/model_format.py

The last line prints the ratio of fresh-process load+score times (pt2 / pyfunc-from-code).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import Schema, TensorSpec
from train_epoch import build

from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.config import load_config, packaged_config
from alphaloom.tasks.evaluation.predictions import eval_dataset, torch_scorer
from alphaloom.tasks.serving import model_logging
from alphaloom.tasks.tracking import runs
from alphaloom.tasks.training.train import build_model, model_dims

# A tiny shard set: the shipped smoke config, shrunk (the scores, not the model, matter here).
TINY = [
    "data.synthetic.n_symbols=60",
    "data.synthetic.n_days=400",
    "shards.n_shards=4",
    "loader.batch_size=128",
    "model.use_text=false",
    "train.device=cpu",
]

_LOAD = """
import json, sys, time
started = time.perf_counter()
import mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
with np.load(sys.argv[3], allow_pickle=False) as data:
    arrays = {key: data[key] for key in data.files}
uri = "models:/" + sys.argv[2] + "/1"
if sys.argv[4] == "dict":
    score = mlflow.pyfunc.load_model(uri).predict(arrays)["score"].to_numpy()
else:  # the pt2 model has no pyfunc flavor: the PyTorch flavor loads the exported program
    import torch
    model = mlflow.pytorch.load_model(uri)
    keys = json.loads(sys.argv[5])
    with torch.no_grad():
        score = model(*[torch.as_tensor(arrays[k]) for k in keys]).float().numpy()
print(json.dumps({"seconds": time.perf_counter() - started, "score": score.tolist()}))
"""


class Positional(torch.nn.Module):
    """pt2 takes a list of tensors, the network a dict: this adapter maps one to the other and
    returns the network's ranking score (`net.score` of its logits, as the pyfunc model serves).

    It must spell out one argument per input key, so it only fits the benchmark's key set
    (x, mask, industry, index, dow, month: text off); each key set needs its own adapter.
    """

    def __init__(self, net: torch.nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.net, self.keys = net, keys

    def forward(  # torch.export needs named positional arguments, not *args
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        c: torch.Tensor,
        d: torch.Tensor,
        e: torch.Tensor,
        f: torch.Tensor,
    ) -> torch.Tensor:
        return self.net.score(self.net(dict(zip(self.keys, (a, b, c, d, e, f), strict=True))))


def fresh_load(uri: str, name: str, inputs: Path, mode: str, keys: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, uri, name, str(inputs), mode, json.dumps(keys)],
        cwd=inputs.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def tensor_schema(example: dict[str, np.ndarray]) -> Schema:
    """The batch arrays as TensorSpecs (the pt2 flavor takes tensors only)."""
    return Schema([TensorSpec(v.dtype, (-1, *v.shape[1:]), k) for k, v in example.items()])


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> None:
    build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    work = Path(tempfile.mkdtemp(prefix="model-format-"))
    try:
        compare(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare(work: Path) -> None:
    """Log both formats into a throwaway tracking store, load each in a fresh process."""
    smoke = packaged_config("smoke.yaml")
    shard_dir, _ = build(work / "shards", TINY, config=smoke)
    cfg = load_config(smoke, [*TINY, f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}"])
    info = ShardSetInfo.open(shard_dir)
    torch.manual_seed(0)
    net = build_model(info, cfg).eval()
    batch = next(iter(eval_dataset(shard_dir, "test", cfg)))
    keys = list(net.input_keys)
    example = model_logging.model_input_example(batch, keys)
    expected, _ = torch_scorer(net)(batch)
    inputs = work / "batch.npz"
    np.savez(inputs, **{k: batch[k].numpy() for k in keys})
    results = {}
    with runs.tracked_run(cfg) as run_id:
        cfg.tracking.registered_model = "fmt-pyfunc"
        started = time.perf_counter()
        model_logging.log_ranker(
            cfg, run_id, net, model_dims(info), example, info.feature_names,
            shard_dir=shard_dir,
        )  # fmt: skip
        results["pyfunc-from-code"] = {"log_seconds": time.perf_counter() - started}
        started = time.perf_counter()
        try:  # in the run's experiment (its artifacts beside the throwaway store)
            with runs.TrackedRun.of(cfg, run_id).active():
                Model.log(
                    artifact_path=None,
                    name="pt2",
                    flavor=mlflow.pytorch,
                    run_id=run_id,
                    pytorch_model=Positional(net, keys).eval(),
                    serialization_format="pt2",
                    input_example=[example[k] for k in keys],
                    signature=ModelSignature(
                        inputs=tensor_schema(example),
                        outputs=Schema([TensorSpec(np.dtype("float32"), (-1,))]),
                    ),
                    pip_requirements=model_logging.pip_requirements(),
                    registered_model_name="fmt-pt2",
                    await_registration_for=0,
                )
            results["pt2"] = {"log_seconds": time.perf_counter() - started}
        except Exception as err:  # report, do not hide: this is what the comparison is about
            results["pt2"] = {"log_error": f"{type(err).__name__}: {str(err)[:300]}"}
    uri = cfg.tracking.tracking_uri
    for label, name, mode in (
        ("pyfunc-from-code", "fmt-pyfunc", "dict"),
        ("pt2", "fmt-pt2", "list"),
    ):
        if "log_error" in results[label]:
            continue
        loaded = fresh_load(uri, name, inputs, mode, keys)
        if "error" in loaded:
            results[label]["load_error"] = loaded["error"]
            continue
        results[label]["fresh_load_and_score_seconds"] = round(loaded["seconds"], 2)
        diff = np.abs(np.asarray(loaded["score"]) - expected).max()
        results[label]["max_abs_score_diff"] = float(diff)
        results[label]["batch_rows"] = len(expected)
    for label, row in results.items():
        print(label, json.dumps(row))
    a = results["pyfunc-from-code"].get("fresh_load_and_score_seconds")
    b = results["pt2"].get("fresh_load_and_score_seconds")
    ratio = f"{b / a:.2f}" if a and b else "n/a (pt2 failed, see above)"
    print(f"fresh-process load+score time, pt2 / pyfunc-from-code: {ratio}")


if __name__ == "__main__":
    main()
