"""The shards stage fanned out, one task per shard: the same set as the single task, anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alphaloom.model.shard_format import MANIFEST_NAME
from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common import storage
from alphaloom.tasks.common.config import PipelineConfig, load_config
from alphaloom.tasks.common.hashing import sha256_file
from alphaloom.tasks.data.features import run_features_stage
from alphaloom.tasks.data.ingest import run_ingest_stage
from alphaloom.tasks.dataset.shard_fanout import finish_shard_set, plan_shard_jobs, write_shard_job
from alphaloom.tasks.dataset.shard_writer import ShardBuildError
from alphaloom.tasks.dataset.shards import run_shards_stage
from alphaloom.tasks.dataset.text import run_text_stage
from alphaloom.tasks.orchestration.caching import StageRef

REPO = Path(__file__).resolve().parent.parent
SMALL = ["data.synthetic.n_symbols=24", "text.enabled=false"]


def smoke(work_dir: Path | str, *extra: str) -> PipelineConfig:
    return load_config(REPO / "configs" / "smoke.yaml", [f"work_dir={work_dir}", *SMALL, *extra])


@pytest.fixture(autouse=True)
def local_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(storage.CACHE_DIR_ENV, str(tmp_path / "cache"))


def upstream(cfg: PipelineConfig) -> tuple[StageRef, StageRef, StageRef]:
    market = run_ingest_stage(cfg)
    return run_features_stage(market, cfg), run_text_stage(market, cfg), market


def fan_out_by_hand(cfg: PipelineConfig) -> StageRef:
    """The fan-out's three steps as plain calls (the flow maps the middle one)."""
    features, text, market = upstream(cfg)
    jobs = plan_shard_jobs(features, text, market, cfg)
    written = [write_shard_job(job, features, market, cfg) for job in reversed(jobs)]
    return finish_shard_set(features, text, market, written, cfg)  # any completion order


def contents(ref: StageRef) -> tuple[dict[str, str], dict]:
    """(sha256 of every file, manifest without its creation time) of a shard set."""
    local = ref.dir
    files = {
        p.name: sha256_file(p)
        for p in sorted(local.iterdir())
        if p.name not in (MANIFEST_NAME, storage.COMPLETE_MARKER)
    }
    manifest = json.loads((local / MANIFEST_NAME).read_text())
    manifest.pop("created")
    return files, manifest


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[StageRef, tuple[dict[str, str], dict]]:
    cfg = smoke(tmp_path_factory.mktemp("single"))
    ref = run_shards_stage(*upstream(cfg), cfg)
    return ref, contents(ref)


def test_fanned_out_shards_are_the_single_tasks_set_file_for_file(single, tmp_path) -> None:
    baseline, (files, manifest) = single
    ref = fan_out_by_hand(smoke(tmp_path))
    assert ref.key == baseline.key
    assert len([f for f in files if f.startswith("shard-")]) >= 3
    assert contents(ref) == (files, manifest)
    assert not list((tmp_path / "shards").glob(".*"))  # the parts directory became the set


def test_fanned_out_shards_at_a_url_match_and_are_marked_complete(single, memory_root) -> None:
    baseline, expected = single
    ref = fan_out_by_hand(smoke(memory_root))
    assert ref.path == f"{memory_root}/shards/{baseline.key}"
    assert storage.output_complete(ref.path)
    assert contents(ref) == expected
    assert ShardSetInfo.open(ref.path).window_count("train", 10) > 0


def test_a_failed_shard_leaves_no_complete_set_and_a_rerun_finishes(single, tmp_path) -> None:
    cfg = smoke(tmp_path)
    features, text, market = upstream(cfg)
    jobs = plan_shard_jobs(features, text, market, cfg)
    entries = [write_shard_job(job, features, market, cfg) for job in jobs[:-1]]
    assert not storage.output_complete(tmp_path / "shards" / single[0].key)
    with pytest.raises(ShardBuildError, match="no shard was written"):
        finish_shard_set(features, text, market, [], cfg)
    assert len(entries) == len(jobs) - 1
    ref = fan_out_by_hand(cfg)  # the rerun rewrites every shard and completes the set
    assert contents(ref) == single[1]


def test_overlapping_plans_write_apart_and_stray_temp_files_are_not_promoted(tmp_path) -> None:
    cfg = smoke(tmp_path)
    features, text, market = upstream(cfg)
    first = plan_shard_jobs(features, text, market, cfg)
    second = plan_shard_jobs(features, text, market, cfg)
    assert first[0].parts != second[0].parts
    written = [write_shard_job(job, features, market, cfg) for job in second]
    stray = Path(second[0].parts) / ".shard-00000.parquet.tmp-killed"
    stray.write_bytes(b"left by a killed worker")
    ref = finish_shard_set(features, text, market, written, cfg)
    assert not (ref.dir / stray.name).exists() and not stray.parent.exists()
    mixed = [*written[:1], written[1].model_copy(update={"parts": first[0].parts})]
    with pytest.raises(ShardBuildError, match="different plans"):
        finish_shard_set(features, text, market, mixed, smoke(tmp_path / "other"))


def test_a_local_set_without_its_manifest_is_replanned_and_rebuilt(single, tmp_path) -> None:
    cfg = smoke(tmp_path)
    features, text, market = upstream(cfg)
    final = tmp_path / "shards" / run_shards_stage(features, text, market, cfg).key
    (final / MANIFEST_NAME).unlink()
    assert storage.output_complete(final)  # the marker is there, but the set is not whole
    assert storage.output_problem(final) == "incomplete (manifest.json is missing)"
    assert plan_shard_jobs(features, text, market, cfg)  # not taken for a finished set
    ref = fan_out_by_hand(cfg)
    assert Path(ref.path) == final and storage.output_problem(final) is None
    assert contents(ref) == single[1]


def test_a_shard_job_names_the_symbols_it_cannot_find(tmp_path) -> None:
    cfg = smoke(tmp_path)
    features, text, market = upstream(cfg)
    job = plan_shard_jobs(features, text, market, cfg)[0]
    ghost = job.model_copy(update={"symbols": [*job.symbols, "NOPE"]})
    with pytest.raises(ShardBuildError, match=r"no rows for symbols \['NOPE'\]"):
        write_shard_job(ghost, features, market, cfg)


def test_an_existing_set_plans_no_jobs(single) -> None:
    baseline, _ = single
    cfg = smoke(Path(baseline.path).parent.parent)
    assert plan_shard_jobs(*upstream(cfg), cfg) == []


def test_the_shards_stage_on_a_local_dask_cluster_matches_the_single_task(
    prefect_harness, single, tmp_path
) -> None:
    from alphaloom.tasks.dataset.chain import shards_stage

    baseline, expected = single
    dask = ("runner.kind=dask", "runner.workers=2", "runner.dask_processes=false")
    cfg = smoke(tmp_path, *dask, "runner.partitions=2")
    ref = shards_stage(*upstream(cfg), cfg)
    assert ref.key == baseline.key and contents(ref) == expected
    assert not list(Path(ref.path).parent.glob(".*"))  # the parts directory became the set
