"""A K = 2 seed ensemble through the training pipeline: one registered version holding both
members, which loads back through MLflow and scores exactly like the in-memory ensemble."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from alphaloom.flows.pipeline import train_pipeline
from alphaloom.model.ensemble import SeedEnsemble
from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.config import load_config
from alphaloom.tasks.evaluation.metrics import ic_metrics
from alphaloom.tasks.evaluation.predictions import predict
from alphaloom.tasks.serving.registry import predict_registered, version_uri
from alphaloom.tasks.serving.scoring import score_latest_date
from alphaloom.tasks.training.checkpoint import BEST_STATE_NAME, CHECKPOINT_NAME, load_weights
from alphaloom.tasks.training.ensemble import ENSEMBLE_STATE_NAME, member_dir
from alphaloom.tasks.training.train import build_model, checkpoint_dir_for

REPO = Path(__file__).resolve().parent.parent
FAST = [
    "train.epochs=2",
    "train.patience=2",
    "train.max_batches_per_epoch=4",
    "train.device=cpu",
    "train.num_threads=1",
    "model.use_attention=false",
    "runner.fit_workers=1",
]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_two_seed_ensemble_is_registered_served_and_scored_as_one_model(
    tmp_path: Path, mlflow_uri: str
) -> None:
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"work_dir={tmp_path / 'work'}",
            *FAST,
            "train.ensemble=2",
            "train.seed=11",
            "tracking.registered_model=ensemble-smoke",
        ],
    )
    started = time.perf_counter()
    summary = train_pipeline(config=cfg)
    print(f"K=2 pipeline: {time.perf_counter() - started:.1f} s")
    client = mlflow.MlflowClient(mlflow_uri)
    name = cfg.tracking.registered_model
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert version.run_id == summary["run_id"] and summary["promoted"]
    run = client.get_run(summary["run_id"])
    assert run.data.params["train.ensemble"] == "2"
    for i in range(2):
        assert f"ensemble/member{i}/best_epoch" in run.data.metrics
        assert f"ensemble/member{i}/best_valid_rank_ic" in run.data.metrics
        member = member_dir(checkpoint_dir_for(cfg, run.info.run_id), i)
        assert (member / BEST_STATE_NAME).exists() and (member / CHECKPOINT_NAME).exists()

    shard_dir = run.data.tags["alphaloom.shard_dir"]
    info = ShardSetInfo.open(shard_dir)
    loaded = mlflow.pyfunc.load_model(version_uri(name, version.version))
    spec = loaded.unwrap_python_model().spec
    assert spec["ensemble"] == 2 and spec["member_seeds"] == [11, 12]
    assert isinstance(loaded.unwrap_python_model().model, SeedEnsemble)

    # the in-memory ensemble, from the weights the pipeline wrote
    ensemble = SeedEnsemble([build_model(info, cfg) for _ in range(2)])
    state = checkpoint_dir_for(cfg, run.info.run_id) / ENSEMBLE_STATE_NAME
    ensemble.load_state_dict(load_weights(state))
    ensemble.eval()
    memory = predict(ensemble, shard_dir, "test", cfg)
    served = predict_registered(
        version_uri(name, version.version), shard_dir, "test", cfg, info.feature_names
    )
    assert served[["symbol", "date"]].equals(memory[["symbol", "date"]])
    np.testing.assert_array_equal(served["score"], memory["score"])
    for k in range(4):
        np.testing.assert_allclose(served[f"p{k}"], memory[f"p{k}"], rtol=0, atol=1e-6)
    assert served["score"].between(0, 1).all()
    # the evaluation logged the same model's figures
    assert run.data.metrics["test/rank_ic"] == pytest.approx(ic_metrics(memory)["rank_ic"])

    _, ranked = score_latest_date(cfg, shard_dir)  # the champion, scored as one model
    latest = predict(ensemble, shard_dir, None, cfg, dates=[info.last_date])
    by_symbol = latest.set_index("symbol")["score"]
    np.testing.assert_array_equal(ranked["score"], by_symbol[ranked["symbol"]].to_numpy())
