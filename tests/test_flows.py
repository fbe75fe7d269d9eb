"""End-to-end Prefect flows on the smoke config: caching, retries, scoring, nightly, failures."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
)

from alphaloom.flows.nightly import nightly_retrain
from alphaloom.flows.pipeline import train_pipeline
from alphaloom.flows.score import score_latest
from alphaloom.model.shard_format import ShardSetError
from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.config import PipelineConfig, load_config
from alphaloom.tasks.common.storage import output_problem
from alphaloom.tasks.data.synthetic import extend_market, generate_market, write_market

REPO = Path(__file__).resolve().parent.parent
DATA_STAGES = ("ingest", "features", "text", "shards")
FAST = [
    "train.epochs=2",
    "train.patience=2",
    "train.device=cpu",
    "train.num_threads=1",
    "model.use_attention=false",
]

pytestmark = pytest.mark.usefixtures("prefect_harness")


def smoke(work_dir: Path, *extra: str) -> PipelineConfig:
    return load_config(REPO / "configs" / "smoke.yaml", [f"work_dir={work_dir}", *FAST, *extra])


def run_with_states(flow, cfg: PipelineConfig) -> tuple[dict, dict[str, str]]:
    """Run a flow; return its result and {task name: final state name} of its task runs and
    of its subflows' (the fan-outs)."""
    state = flow(config=cfg, return_state=True)
    result = state.result()
    root = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[root])
            )
        )
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[root, *(child.id for child in children)])
            )
        )
    states = {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}
    return result, states


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, mlflow_store) -> tuple[PipelineConfig, dict, dict[str, str]]:
    cfg = smoke(tmp_path_factory.mktemp("work"))
    summary, states = run_with_states(train_pipeline, cfg)
    return cfg, summary, states


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> str:
    """One MLflow store for this module (creating one costs seconds)."""
    import os

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def test_smoke_pipeline_end_to_end(first_run, mlflow_store) -> None:
    cfg, summary, states = first_run
    assert all(states[name] == "Completed" for name in (*DATA_STAGES, "train-model", "evaluate"))
    run = mlflow.MlflowClient(mlflow_store).get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert {"test/rank_ic", "test/oracle_rank_ic", "valid/rank_ic"} <= set(run.data.metrics)
    assert not any(name.startswith("val/") for name in run.data.metrics)  # one prefix per split
    # the strategy and the neutral Rank IC (exposures with the instruments' industry) per split
    wired = {"topk_excess_ir_net", "topk_ls_sharpe_net", "rank_ic_neutral", "score_vol_corr"}
    assert {f"{split}/{key}" for split in ("valid", "test") for key in wired} <= set(
        run.data.metrics
    )
    assert summary["metrics"]["test/oracle_rank_ic"] > 0
    # The summary's validation figure is the run's: the final evaluation of the selected model.
    assert summary["metrics"]["valid/rank_ic"] == run.data.metrics["valid/rank_ic"]
    assert summary["promoted"] is True  # the first model is always the champion
    client = mlflow.MlflowClient(mlflow_store)
    champion = client.get_model_version_by_alias(cfg.tracking.registered_model, "champion")
    assert champion.run_id == summary["run_id"]


def test_rerun_hits_the_cache_for_data_stages(first_run) -> None:
    cfg, _, _ = first_run
    _, states = run_with_states(train_pipeline, cfg)
    assert {states[name] for name in DATA_STAGES} == {"Cached"}
    assert states["train-model"] == "Completed"


def flip_byte(path: Path) -> None:
    data = path.read_bytes()
    middle = len(data) // 2
    path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])


def without_registering(cfg: PipelineConfig) -> PipelineConfig:
    """The same config, with the module's champion left as it is."""
    changed = cfg.model_copy(deep=True)
    changed.tracking.log_model = False
    return changed


def test_a_deleted_output_is_rebuilt_not_reported_cached(first_run) -> None:
    cfg, _, _ = first_run
    (features_dir,) = (Path(cfg.work_dir) / "features").iterdir()
    shutil.rmtree(features_dir)
    _, states = run_with_states(train_pipeline, without_registering(cfg))
    assert states["features"] == "Completed"
    assert states["ingest"] == states["text"] == states["shards"] == "Cached"
    assert output_problem(features_dir) is None


def test_a_shard_file_with_flipped_bytes_is_rebuilt_not_reported_cached(first_run) -> None:
    cfg, _, _ = first_run
    (shard_dir,) = (Path(cfg.work_dir) / "shards").iterdir()
    shard = shard_dir / ShardSetInfo.open(shard_dir).shards[0].file
    good = shard.read_bytes()
    flip_byte(shard)
    _, states = run_with_states(train_pipeline, without_registering(cfg))
    assert states["shards"] == "Completed" and states["train-model"] == "Completed"
    assert states["ingest"] == states["features"] == states["text"] == "Cached"
    assert shard.read_bytes() == good and output_problem(shard_dir) is None


def test_a_deterministic_training_error_fails_without_a_retry(first_run, monkeypatch) -> None:
    import alphaloom.tasks.training.train as train

    attempts = []

    def shard_error(*args, **kwargs):
        attempts.append(1)
        raise ShardSetError("shard-00000.parquet: corrupt or truncated (injected)")

    monkeypatch.setattr(train, "train_epoch", shard_error)
    cfg, _, _ = first_run
    state = train_pipeline(config=without_registering(cfg), return_state=True)
    assert state.is_failed() and len(attempts) == 1


def test_train_config_change_keeps_data_stages_cached(first_run) -> None:
    cfg, _, _ = first_run
    changed = cfg.model_copy(deep=True)
    changed.train.lr = cfg.train.lr * 2
    changed.tracking.log_model = False
    _, states = run_with_states(train_pipeline, changed)
    assert {states[name] for name in DATA_STAGES} == {"Cached"}


def test_feature_config_change_rebuilds_features_and_shards_only(first_run) -> None:
    cfg, _, _ = first_run
    changed = cfg.model_copy(deep=True)
    changed.features.windows = [5, 10]
    changed.tracking.log_model = False  # keep the module's champion on the original features
    _, states = run_with_states(train_pipeline, changed)
    assert states["ingest"] == "Cached" and states["text"] == "Cached"
    assert states["features"] == "Completed" and states["shards"] == "Completed"


def test_score_flow_writes_ranked_latest_date(first_run) -> None:
    cfg, _, _ = first_run
    result = score_latest(config=cfg)
    ranked = pd.read_parquet(result["parquet"])
    market = generate_market(cfg.data.synthetic)
    last_day = market.bars["date"].max()
    assert (ranked["date"] == last_day).all()
    assert len(ranked) == market.bars.loc[market.bars["date"] == last_day, "symbol"].nunique()
    assert ranked["score"].is_monotonic_decreasing
    assert ranked["rank"].tolist() == list(range(1, len(ranked) + 1))
    assert Path(result["csv"]).is_file()


def test_training_failure_is_retried_and_resumes(tmp_path, mlflow_store, monkeypatch) -> None:
    import alphaloom.tasks.training.train as train

    original = train.train_epoch
    failures = []

    def fail_once_in_second_epoch(parts, state, cfg, *args, **kwargs):
        if state.epoch == 1 and not failures:
            failures.append(state.epoch)  # transient: only those are retried
            raise ConnectionResetError("injected dropped connection in epoch 1")
        return original(parts, state, cfg, *args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", fail_once_in_second_epoch)
    summary, states = run_with_states(train_pipeline, smoke(tmp_path))
    assert failures == [1] and states["train-model"] == "Completed"
    client = mlflow.MlflowClient(mlflow_store)
    history = client.get_metric_history(summary["run_id"], "valid/rank_ic")
    # Resumed from the epoch-0 checkpoint: each epoch was validated once, none twice; the final
    # evaluation of the selected model follows at step 2.
    assert sorted(m.step for m in history) == [0, 1, 2]


def test_failing_flow_leaves_mlflow_run_failed(tmp_path, mlflow_store, monkeypatch) -> None:
    import alphaloom.flows.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("injected evaluation failure")

    monkeypatch.setattr(pipeline, "evaluate_task", broken)
    cfg = smoke(tmp_path)
    state = train_pipeline(config=cfg, return_state=True)
    assert state.is_failed()
    client = mlflow.MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )
    assert runs[0].info.status == "FAILED"


ROLLING = (
    "features.splits.valid_days=40",
    "features.splits.promotion_days=25",
    "features.splits.test_days=0",
    "registry.min_days=20",
)


def shifted(before: str, after: str) -> int:
    """Business days from `before` to `after` (the synthetic market's calendar)."""
    return len(pd.bdate_range(before, after)) - 1


def test_nightly_trains_on_the_new_days_and_promotes_only_past_the_margin(
    tmp_path, mlflow_store
) -> None:
    base = smoke(tmp_path / "work")
    market_dir = tmp_path / "market"
    write_market(generate_market(base.data.synthetic), market_dir, base.data.synthetic)
    cfg = smoke(
        tmp_path / "work",
        *ROLLING,
        "tracking.registered_model=alphaloom-nightly",
        "data.source=files",
        f"data.bars_path={market_dir}",
        "registry.margin=1.0",  # no model beats another by a daily Rank IC of 1
    )
    client = mlflow.MlflowClient(mlflow_store)

    def night(config: PipelineConfig) -> tuple[dict, dict[str, list[str]]]:
        summary = nightly_retrain(config=config)
        run = client.get_run(summary["run_id"])
        assert run.data.tags["alphaloom.trigger"] == "nightly"
        splits = ShardSetInfo.open(run.data.tags["alphaloom.shard_dir"]).manifest["splits"]
        return summary, splits

    first, first_splits = night(cfg)
    assert first["promoted"] is True and "test" not in first_splits  # production: no test split
    extended = extend_market(market_dir, 20)
    second, splits = night(cfg)

    # Trained on the new days: every window moved with the newest day, training took all 20.
    assert splits["promotion"][1] == f"{extended.bars['date'].max():%Y-%m-%d}"
    for name in ("train", "valid", "promotion"):
        assert shifted(first_splits[name][1], splits[name][1]) == 20, name
    # Compared where neither model selected: after the champion's and the challenger's validation.
    assert splits["promotion"][0] > max(first_splits["valid"][1], splits["valid"][1])
    assert second["promoted"] is False
    name = "alphaloom-nightly"
    version = client.get_model_version(name, second["model_version"])
    tags = version.tags
    assert tags["promotion.promoted"] == "false" and tags["promotion.margin"] == "1"
    assert tags["promotion.champion_version"] == first["model_version"]
    assert int(tags["promotion.paired_days"]) >= 20
    gain = float(tags["promotion.mean_daily_diff"])
    assert gain == pytest.approx(
        float(tags["promotion.challenger_rank_ic"]) - float(tags["promotion.champion_rank_ic"]),
        abs=1e-5,
    )
    assert client.get_model_version_by_alias(name, "challenger").version == version.version
    assert client.get_model_version_by_alias(name, "champion").run_id == first["run_id"]
    assert Path(second["scores"]["parquet"]).is_file()

    # The same night with a margin the same challenger clears: promoted.
    eager = cfg.model_copy(deep=True)
    eager.registry.margin = gain - 0.5
    third, _ = night(eager)
    assert third["promoted"] is True
    assert client.get_model_version_by_alias(name, "champion").run_id == third["run_id"]


def test_a_bad_vendor_row_is_dropped_and_said_in_prefect_mlflow_and_the_summary(
    tmp_path, mlflow_store
) -> None:
    """data.on_invalid: drop (the default): the run goes on without the row, and the report
    (a Prefect table artifact), MLflow (`data/*`) and the summary all say what was dropped."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    base = smoke(tmp_path / "work", "tracking.registered_model=alphaloom-bad-row")
    market_dir = tmp_path / "vendor"
    write_market(generate_market(base.data.synthetic), market_dir, base.data.synthetic)
    bars = pd.read_parquet(market_dir / "bars.parquet")
    bars.loc[17, ["open", "high", "low", "close"]] = 0.0  # a merger date's all-zero row
    bars.to_parquet(market_dir / "bars.parquet")
    cfg = smoke(
        tmp_path / "work",
        "tracking.registered_model=alphaloom-bad-row",
        "data.source=files",
        f"data.bars_path={market_dir}",
    )
    state = train_pipeline(config=cfg, return_state=True)
    summary = state.result()
    run = mlflow.MlflowClient(mlflow_store).get_run(summary["run_id"])
    assert run.data.metrics["data/invalid_rows"] == run.data.metrics["data/quarantined_rows"] == 1
    assert any(note.startswith("1 invalid input row(s)") for note in summary["data_notes"])
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    (report,) = [a for a in artifacts if a.key == "validation-report"]
    rows = report.data if isinstance(report.data, list) else yaml.safe_load(report.data)
    closes = [r for r in rows if r["column"] == "close" and r["severity"] == "error"]
    assert closes and closes[0]["problem"] == "non-positive price" and closes[0]["rows"] == 1


def test_pipeline_and_scoring_with_every_output_at_a_url(
    tmp_path, mlflow_store, memory_root, monkeypatch
) -> None:
    """work_dir=memory://...: stages (fanned out), checkpoints and scores all land at the URL."""
    import fsspec

    from alphaloom.tasks.common.storage import CACHE_DIR_ENV, COMPLETE_MARKER

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    overrides = ("tracking.registered_model=alphaloom-url", "runner.partitions=2")
    cfg = smoke(memory_root, *overrides)  # type: ignore[arg-type]
    memory, root = fsspec.core.url_to_fs(memory_root)
    summary, states = run_with_states(train_pipeline, cfg)
    assert states["ingest"] == states["text"] == "Completed"
    assert states["assemble-features"] == states["finish-shards"] == "Completed"
    for stage in ("market", "features", "text", "shards", "raw_factors"):
        markers = memory.glob(f"{root}/{stage}/*/{COMPLETE_MARKER}")
        assert len(markers) == (2 if stage == "raw_factors" else 1), stage
    assert memory.isfile(f"{root}/checkpoints/{summary['run_id']}/checkpoint.pt")
    run = mlflow.MlflowClient(mlflow_store).get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["alphaloom.shard_dir"].startswith(f"{memory_root}/shards/")

    scores = score_latest(config=cfg)
    assert scores["parquet"].startswith(f"{memory_root}/scores/")
    assert pd.read_parquet(scores["parquet"])["score"].is_monotonic_decreasing

    _, again = run_with_states(train_pipeline, cfg)
    assert {again[name] for name in ("ingest", "text", "assemble-features")} == {"Cached"}
    assert again["finish-shards"] == "Cached"


def test_prefect_yaml_parses_and_entrypoints_import() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {d["name"]: d for d in spec["deployments"]}
    assert {"nightly-retrain", "score-latest"} <= set(names)
    schedule = names["nightly-retrain"]["schedules"][0]
    assert schedule["cron"].split()[-1] == "1-5" and schedule["timezone"]
    for deployment in spec["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        assert flow.name == deployment["entrypoint"].split(":")[1].replace("_", "-")
        load_config(REPO / deployment["parameters"]["config_path"])
