"""Features fanned out over symbol partitions: identical output, per-partition caching, runners."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from alphaloom.tasks.common.config import ConfigError, PipelineConfig, RunnerSection, load_config
from alphaloom.tasks.data.alpha158 import compute_alpha158
from alphaloom.tasks.data.factor_names import select_factors
from alphaloom.tasks.data.features import (
    FEATURES_FILE,
    META_FILE,
    PartitionError,
    build_feature_table,
    features_location,
    stitch_raw,
)
from alphaloom.tasks.data.ingest import load_saved_market, run_ingest_stage
from alphaloom.tasks.data.partitions import RAW_FILE, group_symbols, partitions_of_bars
from alphaloom.tasks.data.synthetic import generate_market
from alphaloom.tasks.orchestration.caching import StageRef
from alphaloom.tasks.orchestration.runners import task_runner_for

REPO = Path(__file__).resolve().parent.parent


def smoke(work_dir: Path, *extra: str) -> PipelineConfig:
    return load_config(REPO / "configs" / "smoke.yaml", [f"work_dir={work_dir}", *extra])


@pytest.fixture(scope="module")
def ragged_bars() -> pd.DataFrame:
    """The smoke market with histories of different lengths (some symbols start late)."""
    cfg = smoke(Path("unused"))
    bars = generate_market(cfg.data.synthetic).bars
    late = bars["symbol"].isin(sorted(bars["symbol"].unique())[::3])
    first_days = bars["date"] < bars["date"].min() + pd.Timedelta(days=40)
    return bars[~(late & first_days)].reset_index(drop=True)


def partition_tables(bars: pd.DataFrame, n: int, names: list[str]) -> list[pd.DataFrame]:
    tables = []
    for symbols in group_symbols(bars["symbol"].tolist(), n):
        part = bars[bars["symbol"].isin(symbols)].sort_values(["symbol", "date"])
        tables.append(compute_alpha158(part.reset_index(drop=True), names))
    return tables


def test_groups_are_disjoint_cover_every_symbol_and_stay_put_when_one_is_added() -> None:
    symbols = [f"S{i:03d}" for i in range(50)]
    groups = group_symbols(symbols, 4)
    assert sorted(s for g in groups for s in g) == symbols
    grown = group_symbols([*symbols, "NEW"], 4)
    changed = [a != b for a, b in zip(groups, grown, strict=True)]
    assert sum(changed) == 1  # only the new symbol's partition differs
    with pytest.raises(ValueError, match=r"runner\.partitions"):
        group_symbols(symbols, 0)


@pytest.mark.parametrize("n_partitions", [2, 5])
def test_fanned_out_table_is_identical_to_the_single_task_one(
    ragged_bars: pd.DataFrame, n_partitions: int
) -> None:
    cfg = smoke(Path("unused")).features
    names = select_factors(cfg.factors, cfg.windows)
    single = build_feature_table(ragged_bars, cfg)
    parts = partition_tables(ragged_bars, n_partitions, names)
    assert len(parts) == n_partitions
    fanned = build_feature_table(ragged_bars, cfg, parts[::-1])  # order does not matter
    pd.testing.assert_frame_equal(fanned.frame, single.frame, check_exact=True)
    assert fanned.stats == single.stats and fanned.split_dates == single.split_dates


def test_a_partition_key_changes_only_with_its_own_bars(ragged_bars: pd.DataFrame) -> None:
    before = partitions_of_bars(ragged_bars, "m", 3)
    edited = ragged_bars.copy()
    victim = before[1].symbols[0]
    edited.loc[edited["symbol"] == victim, "close"] *= 1.01
    after = partitions_of_bars(edited, "m", 3)
    assert [p.symbols for p in before] == [p.symbols for p in after]
    assert [a.key == b.key for a, b in zip(before, after, strict=True)] == [True, False, True]


def test_stitching_rejects_a_missing_or_stale_partition(ragged_bars: pd.DataFrame) -> None:
    bars = ragged_bars.sort_values(["symbol", "date"], ignore_index=True)
    names = ["KMID", "ROC5"]
    parts = partition_tables(bars, 3, names)
    with pytest.raises(PartitionError, match="no partition holds"):
        stitch_raw(bars, parts[:2], names)
    with pytest.raises(PartitionError, match="partition 1 do not match"):
        stitch_raw(bars, [parts[0], parts[1].iloc[1:], parts[2]], names)
    with pytest.raises(PartitionError, match="repeats symbols"):
        stitch_raw(bars, [parts[0], parts[0], parts[1], parts[2]], names)


def test_runner_section_picks_prefect_task_runners() -> None:
    assert isinstance(
        task_runner_for(RunnerSection(kind="thread", workers=3)), ThreadPoolTaskRunner
    )
    assert isinstance(task_runner_for(RunnerSection(kind="process")), ProcessPoolTaskRunner)
    remote = task_runner_for(RunnerSection(kind="dask", dask_address="tcp://10.0.0.5:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    local = task_runner_for(RunnerSection(kind="dask", workers=2))
    assert (
        local.cluster_kwargs["n_workers"] == 2 and local.cluster_kwargs["dashboard_address"] is None
    )
    with pytest.raises(ConfigError, match=r"runner.*dask_address"):
        load_config(None, ["runner.dask_address=tcp://x:1"])


def feature_files(ref: StageRef) -> tuple[pd.DataFrame, dict]:
    return pd.read_parquet(ref.dir / FEATURES_FILE), json.loads((ref.dir / META_FILE).read_text())


@pytest.fixture(scope="module")
def single_task(tmp_path_factory) -> tuple[StageRef, tuple[pd.DataFrame, dict]]:
    """The features stage without fan-out (plain functions), the baseline of the flow tests."""
    from alphaloom.tasks.data.features import run_features_stage

    cfg = smoke(tmp_path_factory.mktemp("single"))
    ref = run_features_stage(run_ingest_stage(cfg), cfg)
    return ref, feature_files(ref)


def test_the_feature_stage_on_a_local_dask_cluster_matches_the_single_task(
    prefect_harness, single_task, tmp_path: Path
) -> None:
    from alphaloom.tasks.dataset.chain import features_stage

    baseline, (frame, meta) = single_task
    dask = ("runner.kind=dask", "runner.workers=2", "runner.dask_processes=false")
    cfg = smoke(tmp_path, *dask, "runner.partitions=3")
    ref = features_stage(run_ingest_stage(cfg), cfg)
    assert ref.key == baseline.key  # same content, same key: downstream caches stay valid
    got_frame, got_meta = feature_files(ref)
    pd.testing.assert_frame_equal(got_frame, frame, check_exact=True)
    assert got_meta == meta
    assert len(list((tmp_path / "raw_factors").iterdir())) == 3


def count_factor_computations(monkeypatch) -> list[list[str]]:
    """Record the symbols of every partition whose raw factors are computed from now on."""
    import alphaloom.tasks.data.partitions as partitions

    computed: list[list[str]] = []
    compute = partitions.compute_alpha158

    def counted(bars, names):
        computed.append(sorted(bars["symbol"].unique()))
        return compute(bars, names)

    monkeypatch.setattr(partitions, "compute_alpha158", counted)
    return computed


def test_thread_runner_reuses_each_partition_when_only_the_labels_change(
    prefect_harness, single_task, tmp_path: Path, monkeypatch
) -> None:
    from alphaloom.tasks.dataset.chain import features_stage

    _, (frame, _) = single_task
    cfg = smoke(tmp_path, "runner.partitions=4", "runner.workers=2")
    market = run_ingest_stage(cfg)
    first = features_stage(market, cfg)
    pd.testing.assert_frame_equal(feature_files(first)[0], frame, check_exact=True)
    raw_files = sorted((tmp_path / "raw_factors").glob(f"*/{RAW_FILE}"))
    stamps = [p.stat().st_mtime_ns for p in raw_files]
    assert len(raw_files) == 4

    relabelled = smoke(tmp_path, "runner.partitions=4", "features.label.mode=threshold")
    computed = count_factor_computations(monkeypatch)
    second = features_stage(market, relabelled)
    assert computed == []  # every partition came from the cache
    assert second.key != first.key and second.key == features_location(market, relabelled).key
    assert sorted((tmp_path / "raw_factors").glob(f"*/{RAW_FILE}")) == raw_files
    assert [p.stat().st_mtime_ns for p in raw_files] == stamps  # no partition was recomputed
    bars = load_saved_market(market.dir).bars
    expected = build_feature_table(bars, relabelled.features).frame
    pd.testing.assert_frame_equal(feature_files(second)[0], expected, check_exact=True)


def test_a_corrupt_partition_is_recomputed_and_the_others_come_from_the_cache(
    prefect_harness, single_task, tmp_path: Path, monkeypatch
) -> None:
    """Mapped stage tasks get the same check as single ones: a partition output with flipped
    bytes is rebuilt (not reported Cached), an intact one is not recomputed."""
    import shutil

    from alphaloom.tasks.common.storage import output_problem
    from alphaloom.tasks.dataset.chain import features_stage

    _, (frame, _) = single_task
    cfg = smoke(tmp_path, "runner.partitions=4", "runner.workers=2")
    market = run_ingest_stage(cfg)
    first = features_stage(market, cfg)
    victim = sorted((tmp_path / "raw_factors").glob(f"*/{RAW_FILE}"))[0]
    good = victim.read_bytes()
    victim.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    shutil.rmtree(first.path)  # so the fan-out is planned again
    computed = count_factor_computations(monkeypatch)
    again = features_stage(market, cfg)
    assert len(computed) == 1  # the corrupt partition only
    assert victim.read_bytes() == good and output_problem(victim.parent) is None
    pd.testing.assert_frame_equal(feature_files(again)[0], frame, check_exact=True)
