"""Registry with real models: registered once per run, alias `challenger`; champion and
challenger scored through the same pyfunc path on the promotion window; the logged champion
loads in a fresh process and scores exactly like the in-memory model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.evaluation.predictions import eval_dataset, torch_scorer
from alphaloom.tasks.serving import promotion, registry
from alphaloom.tasks.tracking import runs, store
from alphaloom.tasks.training.train import TrainResult, train_model
from tests.helpers_train import TinyData, build_tiny_shards, tiny_config


@pytest.fixture
def cfg(module_store_uri: str, request) -> PipelineConfig:
    name = request.node.name.removeprefix("test_")[:60]
    return PipelineConfig(
        tracking={"tracking_uri": module_store_uri, "experiment": "reg", "registered_model": name}
    )


# ----------------------------------------------------------------------------------------------
# the real model, end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyData:
    return build_tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def trained(tiny: TinyData, tmp_path_factory) -> TrainResult:
    cfg = tiny_config("train.epochs=1", "train.max_batches_per_epoch=6")
    return train_model(tiny.shard_dir, cfg, tmp_path_factory.mktemp("ckpt"))


_FRESH_PROCESS = """
import json, sys
import mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/" + sys.argv[2] + "@champion")
with np.load(sys.argv[3], allow_pickle=False) as batch:
    out = model.predict({key: batch[key] for key in batch.files})
print(json.dumps(out.to_dict(orient="list")))
"""


def test_the_champion_loads_in_a_fresh_process_and_scores_identically(
    tiny: TinyData, trained: TrainResult, cfg: PipelineConfig, tmp_path: Path
) -> None:
    run_cfg = tiny.cfg.model_copy(update={"tracking": cfg.tracking})
    client = store.client_for(run_cfg)
    with runs.tracked_run(run_cfg) as run_id:
        first = promotion.register_and_promote(run_cfg, run_id, trained, tiny.shard_dir)
        assert client.get_run(run_id).info.status == "RUNNING"  # logging did not end the run
    assert first.promoted
    assert mlflow.active_run() is None
    version = client.get_model_version(cfg.tracking.registered_model, first.new_version)
    run = client.get_run(run_id)
    (output,) = run.outputs.model_outputs  # the run's logged model, in the run's experiment
    logged = client.get_logged_model(output.model_id)
    assert logged.experiment_id == run.info.experiment_id and logged.source_run_id == run_id
    assert logged.model_type == "alphaloom-ranker"
    default = client.get_experiment_by_name("Default")
    assert default is None or not client.search_logged_models([default.experiment_id])
    assert version.source == f"models:/{output.model_id}" and version.run_id == run_id

    batch = next(iter(eval_dataset(tiny.shard_dir, "test", run_cfg)))
    inputs = tmp_path / "batch.npz"
    np.savez(inputs, **{k: batch[k].numpy() for k in trained.model.input_keys})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _FRESH_PROCESS,
            cfg.tracking.tracking_uri,
            cfg.tracking.registered_model,
            str(inputs),
        ],
        cwd=tmp_path,  # not the repo: the model must bring its own code
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    score, probs = torch_scorer(trained.model)(batch)
    np.testing.assert_allclose(loaded["score"], score, rtol=0, atol=1e-6)
    for k in range(4):
        np.testing.assert_allclose(loaded[f"p{k}"], probs[:, k], rtol=0, atol=1e-6)

    # The same weights registered again: champion and challenger go through the same pyfunc
    # code at the same precision on the same window, so every day ties exactly; the champion stays.
    with runs.tracked_run(run_cfg) as run_id:
        second = promotion.register_and_promote(run_cfg, run_id, trained, tiny.shard_dir)
    assert second.champion_version == first.new_version
    assert second.mean_daily_diff == 0.0 and second.new_score == second.champion_score
    assert not second.promoted
    assert second.window.startswith("test ")  # fraction splits: the test window
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    name = cfg.tracking.registered_model
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"


def test_a_retried_registration_adds_no_version(
    tiny: TinyData, trained: TrainResult, cfg: PipelineConfig
) -> None:
    run_cfg = tiny.cfg.model_copy(update={"tracking": cfg.tracking})
    client = store.client_for(run_cfg)
    name = cfg.tracking.registered_model
    with runs.tracked_run(run_cfg) as run_id:
        first = registry.register_once(run_cfg, run_id, trained, tiny.shard_dir)
        again = registry.register_once(run_cfg, run_id, trained, tiny.shard_dir)
        decision = promotion.register_and_promote(run_cfg, run_id, trained, tiny.shard_dir)
    assert first == again == decision.new_version
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert len(client.get_run(run_id).outputs.model_outputs) == 1  # logged once, too
    assert str(client.get_model_version_by_alias(name, "challenger").version) == first


def test_the_promotion_window_scores_the_days_after_validation(
    tiny: TinyData, trained: TrainResult
) -> None:
    from alphaloom.tasks.dataset.split_windows import split_bounds

    window, _ = promotion.window_scorer(tiny.shard_dir, tiny.cfg)
    bounds = split_bounds(tiny.shard_dir)
    assert (window.name, window.first, window.last) == (
        "test",
        pd.Timestamp(bounds["test"][0]),
        pd.Timestamp(bounds["test"][1]),
    )
    assert window.first > pd.Timestamp(bounds["valid"][1])


def test_a_champion_with_another_feature_set_cannot_be_scored(
    tiny: TinyData, trained: TrainResult, cfg: PipelineConfig, tmp_path: Path
) -> None:
    run_cfg = tiny.cfg.model_copy(update={"tracking": cfg.tracking})
    with runs.tracked_run(run_cfg) as run_id:
        promotion.register_and_promote(run_cfg, run_id, trained, tiny.shard_dir)
    other = build_tiny_shards(tmp_path, "features.factors=[KMID, KLEN, ROC]")
    _, scorer = promotion.window_scorer(other.shard_dir, run_cfg)
    with pytest.raises(registry.IncompatibleChampion, match="feature set differs"):
        scorer(f"models:/{cfg.tracking.registered_model}@champion")
