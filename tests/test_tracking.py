"""MLflow tracking: run lifecycle, params, tags, metrics, store creation and the UI command."""

from __future__ import annotations

import multiprocessing as mp

import mlflow
import pytest

from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.tracking import runs, store


@pytest.fixture
def cfg(mlflow_uri: str) -> PipelineConfig:
    return PipelineConfig(tracking={"experiment": "test-tracking", "tracking_uri": mlflow_uri})


def test_a_failure_inside_a_tracked_run_leaves_it_failed(cfg: PipelineConfig) -> None:
    with pytest.raises(RuntimeError, match="boom"), runs.tracked_run(cfg) as run_id:
        runs.TrackedRun.of(cfg, run_id).log_metrics({"ic": 0.1}, prefix="valid/")
        raise RuntimeError("boom")
    run = mlflow.MlflowClient(cfg.tracking.tracking_uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert "boom" in run.data.tags["alphaloom.error"]


def test_a_successful_run_is_finished_with_config_params_and_tags(cfg: PipelineConfig) -> None:
    tags = {runs.TAG_DATA_HASH: "d" * 16, runs.TAG_CODE_VERSION: "c" * 16}
    with runs.tracked_run(cfg, tags) as run_id:
        runs.TrackedRun.of(cfg, run_id).log_metrics({"loss": 0.5}, step=3, prefix="train/")
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["features.windows"] == "[5, 10, 20, 30, 60]"
    assert run.data.tags[runs.TAG_DATA_HASH] == "d" * 16
    assert run.data.tags[runs.TAG_TRIGGER] == "manual"
    assert run.data.tags.get(runs.TAG_GIT_COMMIT) == runs.git_commit()
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]
    config_text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    assert config_text == cfg.to_yaml()


def test_flatten_config_covers_every_leaf() -> None:
    cfg = PipelineConfig()
    flat = runs.flatten_config(cfg)
    assert flat["tracking.registered_model"] == cfg.tracking.registered_model
    assert flat["features.label.quantile_edges"] == "[0.3, 0.6, 0.9]"
    assert flat["tracking.tracking_uri"] == "null"
    assert flat["work_dir"] == cfg.work_dir
    assert all(isinstance(value, str) for value in flat.values())


def test_default_store_is_sqlite_in_cwd(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert store.resolve_tracking_uri(PipelineConfig()) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert store.resolve_tracking_uri(PipelineConfig()) == "sqlite:///elsewhere.db"
    cfg = PipelineConfig(tracking={"tracking_uri": "http://127.0.0.1:5001"})
    assert store.resolve_tracking_uri(cfg) == "http://127.0.0.1:5001"


def test_ui_command_serves_the_store_on_localhost(tmp_path) -> None:
    cfg = PipelineConfig(tracking={"tracking_uri": f"sqlite:///{tmp_path}/m.db", "ui_port": 5123})
    argv = store.ui_command(cfg.tracking.tracking_uri, cfg.tracking.ui_port)
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == cfg.tracking.tracking_uri
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "5123"


def _open_store(uri: str) -> str:
    store._CLIENTS.pop(uri, None)
    cfg = PipelineConfig(tracking={"tracking_uri": uri, "experiment": "race"})
    return store.ensure_experiment(store.client_for(cfg), cfg)


def test_concurrent_processes_create_one_fresh_store(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    with mp.get_context("fork").Pool(3) as pool:  # fork: children start at once
        ids = pool.map(_open_store, [uri] * 3)
    assert len(set(ids)) == 1
    assert mlflow.MlflowClient(uri).get_experiment_by_name("race").experiment_id == ids[0]


def test_the_final_evaluation_is_the_runs_latest_value_after_the_epoch_history(
    cfg: PipelineConfig,
) -> None:
    with runs.tracked_run(cfg) as run_id:
        run = runs.TrackedRun.of(cfg, run_id)
        for epoch, rank_ic in enumerate((0.01, 0.05, 0.03)):  # per-epoch, step = epoch
            run.log_metrics({"rank_ic": rank_ic}, step=epoch, prefix="valid/")
        run.log_evaluation("valid", {"rank_ic": 0.05, "accuracy": 0.4})
        run.log_evaluation("test", {"rank_ic": 0.02})
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["valid/rank_ic"] == 0.05 and metrics["test/rank_ic"] == 0.02
    history = client.get_metric_history(run_id, "valid/rank_ic")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 0.01),
        (1, 0.05),
        (2, 0.03),
        (3, 0.05),
    ]
    assert [m.step for m in client.get_metric_history(run_id, "valid/accuracy")] == [3]
    assert [m.step for m in client.get_metric_history(run_id, "test/rank_ic")] == [0]


def test_active_run_is_per_thread_and_leaves_the_run_running(cfg: PipelineConfig) -> None:
    import threading

    barrier = threading.Barrier(2, timeout=60)
    errors: list[BaseException] = []

    def log_as(run_id: str, who: str) -> None:
        try:
            with runs.TrackedRun.of(cfg, run_id).active():
                barrier.wait()  # both runs are active at once, each in its own thread
                mlflow.log_param("who", who)  # the fluent API: logs to this thread's run
                barrier.wait()
        except BaseException as err:
            errors.append(err)

    with runs.tracked_run(cfg) as first, runs.tracked_run(cfg) as second:
        threads = [
            threading.Thread(target=log_as, args=(first, "first")),
            threading.Thread(target=log_as, args=(second, "second")),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
        assert not errors
        assert client.get_run(first).info.status == "RUNNING"  # the flow still owns the run
        assert client.get_run(second).info.status == "RUNNING"
        assert mlflow.active_run() is None  # nothing leaked into this thread
    assert client.get_run(first).data.params["who"] == "first"
    assert client.get_run(second).data.params["who"] == "second"
    assert client.get_run(first).info.status == "FINISHED"


def test_active_run_keeps_an_ended_run_ended(cfg: PipelineConfig) -> None:
    with runs.tracked_run(cfg) as run_id:
        pass
    with runs.TrackedRun.of(cfg, run_id).active():
        mlflow.set_tag("late", "yes")
    run = mlflow.MlflowClient(cfg.tracking.tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["late"] == "yes"


def test_the_code_version_covers_every_model_side_module() -> None:
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    covered = set(runs.model_code_modules())
    folders = ("model", "tasks/training", "tasks/evaluation", "tasks/tracking", "tasks/serving")
    expected = {
        "alphaloom." + ".".join(path.relative_to(repo).with_suffix("").parts)
        for folder in folders
        for path in (repo / folder).glob("*.py")
        if path.name != "__init__.py"
    }
    assert {"alphaloom.model.batch", "alphaloom.tasks.evaluation.metrics"} <= expected
    assert expected <= covered
