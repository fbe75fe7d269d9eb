"""Registry: the champion alias moves only on a better score on the same window; the logged
champion loads in a fresh process and scores exactly like the in-memory model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.evaluation.predictions import eval_dataset, torch_scorer
from alphaloom.tasks.serving import registry
from alphaloom.tasks.tracking import runs, store
from alphaloom.tasks.training.train import TrainResult, train_model
from tests.helpers_train import TinyData, build_tiny_shards, tiny_config


def test_decision_rule() -> None:
    assert registry.decide(0.01, None, None) == (True, "no champion yet")
    assert registry.decide(0.05, "1", 0.04)[0] is True
    assert registry.decide(0.04, "1", 0.04)[0] is False  # a tie keeps the champion
    assert registry.decide(0.03, "1", 0.04)[0] is False
    assert registry.decide(math.nan, "1", 0.04)[0] is False
    promoted, reason = registry.decide(0.0, "1", None, "feature set differs")
    assert promoted and "feature set differs" in reason and "v1" in reason


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs seconds); models are named per test."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture
def cfg(store_uri: str, request) -> PipelineConfig:
    name = request.node.name.removeprefix("test_")[:60]
    return PipelineConfig(
        tracking={"tracking_uri": store_uri, "experiment": "reg", "registered_model": name}
    )


def _register(cfg: PipelineConfig, run_id: str) -> str:
    """A real model version (any artifact will do for the decision logic)."""
    client = store.client_for(cfg)
    client.log_text(run_id, "weights", "model/placeholder.txt")
    name = cfg.tracking.registered_model
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    return str(client.create_model_version(name, source, run_id=run_id).version)


def test_champion_moves_only_on_a_better_score_and_both_scores_are_logged(
    cfg: PipelineConfig,
) -> None:
    # Scores of each version on "the new validation window" (what re-scoring would return).
    on_window = {"1": 0.030, "2": 0.020, "3": 0.045}
    scored: list[str] = []

    def scorer(uri: str) -> float:
        version = uri.rsplit("/", 1)[1]
        scored.append(version)
        return on_window[version]

    client = store.client_for(cfg)
    outcomes = {}
    for version_expected, new_score in (("1", 0.030), ("2", 0.020), ("3", 0.045)):
        with runs.tracked_run(cfg) as run_id:
            version = _register(cfg, run_id)
            assert version == version_expected
            outcomes[version] = (
                run_id,
                registry.promote_if_better(cfg, run_id, version, new_score, scorer),
            )

    assert [d.promoted for _, d in outcomes.values()] == [True, False, True]
    assert scored == ["1", "1"]  # the champion of the day is re-scored, the newcomer is not
    assert (
        str(client.get_model_version_by_alias(cfg.tracking.registered_model, "champion").version)
        == "3"
    )

    run_id, decision = outcomes["2"]
    metrics = client.get_run(run_id).data.metrics
    tags = client.get_run(run_id).data.tags
    assert metrics["registry/new_valid_rank_ic"] == pytest.approx(0.020)
    assert metrics["registry/champion_valid_rank_ic"] == pytest.approx(on_window["1"])
    assert metrics["registry/promoted"] == 0.0
    assert tags["registry.champion_version"] == "1" and tags["registry.promoted"] == "false"
    assert decision.reason in tags["registry.reason"]
    version_tags = client.get_model_version(cfg.tracking.registered_model, "2").tags
    assert version_tags["promoted"] == "false" and float(version_tags["valid_rank_ic"]) == 0.02

    run_id, _ = outcomes["3"]
    assert client.get_run(run_id).data.metrics["registry/promoted"] == 1.0


def test_an_incomparable_champion_loses_and_says_why(cfg: PipelineConfig) -> None:
    def incompatible(uri: str) -> float:
        raise registry.IncompatibleChampion("its feature set differs from the new shard set")

    with runs.tracked_run(cfg) as first:
        registry.promote_if_better(cfg, first, _register(cfg, first), 0.05, incompatible)
    with runs.tracked_run(cfg) as second:
        decision = registry.promote_if_better(
            cfg, second, _register(cfg, second), 0.01, incompatible
        )
    assert decision.promoted and decision.champion_score is None
    client = store.client_for(cfg)
    tags = client.get_run(second).data.tags
    assert "feature set differs" in tags["registry.reason"]
    assert "registry/champion_valid_rank_ic" not in client.get_run(second).data.metrics
    assert (
        str(client.get_model_version_by_alias(cfg.tracking.registered_model, "champion").version)
        == "2"
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
        first = registry.register_and_promote(run_cfg, run_id, trained, tiny.shard_dir)
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

    # The same weights registered again: the champion re-scored on this window ties, so it stays.
    with runs.tracked_run(run_cfg) as run_id:
        second = registry.register_and_promote(run_cfg, run_id, trained, tiny.shard_dir)
    assert second.champion_version == first.new_version
    assert second.champion_score == pytest.approx(trained.best_val_rank_ic, abs=1e-9)
    assert not second.promoted
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    assert (
        str(client.get_model_version_by_alias(cfg.tracking.registered_model, "champion").version)
        == "1"
    )


def test_a_champion_with_another_feature_set_cannot_be_scored(
    tiny: TinyData, trained: TrainResult, cfg: PipelineConfig, tmp_path: Path
) -> None:
    run_cfg = tiny.cfg.model_copy(update={"tracking": cfg.tracking})
    with runs.tracked_run(run_cfg) as run_id:
        registry.register_and_promote(run_cfg, run_id, trained, tiny.shard_dir)
    other = build_tiny_shards(tmp_path, "features.factors=[KMID, KLEN, ROC]")
    scorer = registry.pyfunc_champion_scorer(other.shard_dir, run_cfg)
    with pytest.raises(registry.IncompatibleChampion, match="feature set differs"):
        scorer(f"models:/{cfg.tracking.registered_model}@champion")
