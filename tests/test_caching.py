"""One caching mechanism: a stage output is verified before it is reused (with Prefect or
without), broken ones are rebuilt, and only transient errors are retried."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from prefect import flow
from prefect.states import Failed

import alphaloom.tasks.data.features as features_module
import alphaloom.tasks.data.ingest as ingest_module
import alphaloom.tasks.dataset.shards as shards_module
import alphaloom.tasks.dataset.text as text_module
from alphaloom.model.shard_format import ShardSetError
from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common import storage
from alphaloom.tasks.common.config import ConfigError, PipelineConfig
from alphaloom.tasks.common.storage import StorageError, output_problem
from alphaloom.tasks.data.checks import DataValidationError
from alphaloom.tasks.data.features import features_task
from alphaloom.tasks.data.ingest import ingest_task
from alphaloom.tasks.dataset.shards import shards_task
from alphaloom.tasks.dataset.text import text_task
from alphaloom.tasks.orchestration.caching import StageRef
from alphaloom.tasks.orchestration.retries import is_transient, retry_transient
from tests.helpers_train import tiny_config

SMALL = ["data.synthetic.n_symbols=16", "data.synthetic.n_days=300", "text.enabled=false"]
BUILDERS = [
    (ingest_module, "run_ingest_stage"),
    (features_module, "run_features_stage"),
    (text_module, "run_text_stage"),
    (shards_module, "run_shards_stage"),
]


@pytest.fixture(autouse=True)
def local_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(storage.CACHE_DIR_ENV, str(tmp_path / "cache"))


def stages(cfg: PipelineConfig) -> tuple[StageRef, StageRef, StageRef, StageRef]:
    """The data stages as the CLI and torchrun workers run them: reuse or build, no Prefect."""
    market = ingest_task.reuse_or_build(cfg)
    features = features_task.reuse_or_build(market, cfg)
    text = text_task.reuse_or_build(market, cfg)
    return market, features, text, shards_task.reuse_or_build(features, text, market, cfg)


def flip_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


def refuse_builds(monkeypatch) -> None:
    def rebuilt(*args, **kwargs):
        raise AssertionError("an intact output was rebuilt")

    for module, name in BUILDERS:
        monkeypatch.setattr(module, name, rebuilt)


# ----------------------------------------------------------------------------------------------
# without Prefect


def test_intact_outputs_are_reused_without_running_a_builder(tmp_path, monkeypatch) -> None:
    cfg = tiny_config(f"work_dir={tmp_path / 'work'}", *SMALL)
    first = stages(cfg)
    refuse_builds(monkeypatch)
    assert stages(cfg) == first


def test_a_deleted_output_is_rebuilt(tmp_path, caplog) -> None:
    cfg = tiny_config(f"work_dir={tmp_path / 'work'}", *SMALL)
    market, features, _, _ = stages(cfg)
    shutil.rmtree(features.path)
    assert features_task.problem(market, cfg)[1] == "missing"
    with caplog.at_level(logging.INFO, logger="alphaloom.tasks.orchestration.caching"):
        assert features_task.reuse_or_build(market, cfg) == features
    assert f"output {features.path} is missing: building it" in caplog.text
    assert output_problem(features.path) is None


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_a_shard_file_with_flipped_bytes_is_rebuilt(kind, tmp_path, memory_root, caplog) -> None:
    work = tmp_path / "work" if kind == "local" else memory_root
    cfg = tiny_config(f"work_dir={work}", *SMALL)
    market, features, text, shards = stages(cfg)
    shard = shards.file(ShardSetInfo.open(shards.path).shards[0].file)
    good = shard.read_bytes()
    shard.fs.pipe_file(shard.path, flip_byte(good))
    problem = shards_task.problem(features, text, market, cfg)[1]
    assert problem == f"corrupt ({shard.name} does not match its sha256 in _COMPLETE.json)"
    with caplog.at_level(logging.INFO, logger="alphaloom.tasks.orchestration.caching"):
        assert shards_task.reuse_or_build(features, text, market, cfg) == shards
    assert f"output {shards.path} is {problem}: rebuilding it" in caplog.text
    assert shard.read_bytes() == good and output_problem(shards.path) is None
    assert ShardSetInfo.open(shards.path).window_count("train", 10) > 0


def test_the_cli_features_command_reuses_then_rebuilds_a_corrupt_table(
    tmp_path, monkeypatch, capsys
) -> None:
    from alphaloom.flows.cli import main

    smoke = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"
    sets = [f"work_dir={tmp_path / 'work'}", *SMALL]
    args = ["features", "--config", str(smoke), *(f"--set={value}" for value in sets)]
    assert main(args) == 0
    table = Path(capsys.readouterr().out.split("features:")[1].split()[0]) / "features.parquet"
    good = table.read_bytes()
    with monkeypatch.context() as patch:
        refuse_builds(patch)
        assert main(args) == 0  # intact: reused, no builder runs
    table.write_bytes(flip_byte(good))
    assert main(args) == 0  # corrupt: rebuilt
    assert table.read_bytes() == good


# ----------------------------------------------------------------------------------------------
# retries: transient errors only


@pytest.mark.parametrize(
    "error",
    [
        OSError(5, "Input/output error"),
        ConnectionResetError("connection reset by peer"),
        TimeoutError("read timed out"),
    ],
)
def test_io_network_and_timeout_errors_are_transient(error) -> None:
    assert is_transient(error)
    assert retry_transient(None, None, Failed(data=error)) is True


@pytest.mark.parametrize(
    "error",
    [
        DataValidationError("bars.csv: column 'close' has 3 negative values"),
        ShardSetError("shard-00000.parquet: corrupt or truncated"),
        StorageError("s3://b/x/bars.parquet: checksum does not match _COMPLETE.json"),
        ConfigError("train.epocs: unknown key"),
        FileNotFoundError("bars.csv"),
        PermissionError("s3://b/x: access denied"),
        ValueError("bad value"),
    ],
)
def test_data_config_and_code_errors_are_not(error) -> None:
    assert not is_transient(error)
    assert retry_transient(None, None, Failed(data=error)) is False


def test_an_error_raised_from_a_dropped_connection_is_transient() -> None:
    try:
        try:
            raise ConnectionResetError("connection reset by peer")
        except OSError as err:
            raise DataValidationError("s3://b/bars.csv: cannot be read as CSV/parquet") from err
    except DataValidationError as wrapped:
        assert is_transient(wrapped)


@flow
def ingest_only(cfg: PipelineConfig) -> StageRef:
    return ingest_task(cfg)


def test_a_deterministic_stage_error_fails_at_the_first_attempt(
    prefect_harness, tmp_path, monkeypatch
) -> None:
    attempts = []

    def bad_data(*args, **kwargs):
        attempts.append(1)
        raise DataValidationError("bars.csv: column 'close' has 3 negative values")

    monkeypatch.setattr(ingest_module, "load_market", bad_data)
    state = ingest_only(tiny_config(f"work_dir={tmp_path}", *SMALL), return_state=True)
    assert state.is_failed() and len(attempts) == 1
    with pytest.raises(DataValidationError, match="3 negative values"):
        state.result()


def test_a_transient_stage_error_is_retried(prefect_harness, tmp_path, monkeypatch) -> None:
    attempts = []
    load_market = ingest_module.load_market

    def flaky(*args, **kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionResetError("connection reset by peer")
        return load_market(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "load_market", flaky)
    ref = ingest_only(tiny_config(f"work_dir={tmp_path}", *SMALL))
    assert len(attempts) == 2 and output_problem(ref.path) is None


def test_every_stage_and_training_task_retries_only_transient_errors() -> None:
    from alphaloom.tasks.data.partitions import plan_partitions_task, raw_factors_task
    from alphaloom.tasks.dataset.shard_fanout import (
        finish_shards_task,
        plan_shards_task,
        write_shard_task,
    )
    from alphaloom.tasks.training.distributed import train_ddp_task
    from alphaloom.tasks.training.train import train_task

    stage_tasks = [ingest_task, features_task, text_task, shards_task]
    stage_tasks += [raw_factors_task, finish_shards_task]
    plain = [plan_partitions_task, plan_shards_task, write_shard_task, train_task, train_ddp_task]
    for prefect_task in [stage.task for stage in stage_tasks] + plain:
        assert prefect_task.retries >= 1, prefect_task.name
        assert prefect_task.retry_condition_fn is retry_transient, prefect_task.name


def test_a_stage_key_covers_the_helper_modules_its_stage_imports(tmp_path, monkeypatch) -> None:
    """Editing a module that a stage module imports (not only the stage's own file) changes
    the stage key, so the output is rebuilt."""
    import importlib
    import sys

    from alphaloom.tasks.common.hashing import package_closure
    from alphaloom.tasks.data import features
    from alphaloom.tasks.orchestration.caching import stage_key

    closure = {m.__name__.rsplit(".", 1)[1] for m in package_closure(features)}
    assert {"features", "labels", "splits", "alpha158", "factor_names", "rolling"} <= closure

    package = tmp_path / "keypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text("def later():\n    from keypkg import helper\n")
    (package / "helper.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    stage = importlib.import_module("keypkg.stage")
    before = stage_key("demo", [], {}, (stage,))
    (package / "helper.py").write_text("VALUE = 2\n")
    sys.modules.pop("keypkg.helper", None)
    importlib.invalidate_caches()
    assert stage_key("demo", [], {}, (stage,)) != before
    for name in ("keypkg.stage", "keypkg.helper", "keypkg"):
        sys.modules.pop(name, None)


# ----------------------------------------------------------------------------------------------
# temporaries a killed writer left


def _temp(parent: Path, name: str, age: float = 0.0) -> Path:
    """A temporary directory `name` with a file in it, last touched `age` seconds ago."""
    import os
    import time

    path = parent / name
    path.mkdir(parents=True)
    (path / "part.parquet").write_bytes(b"half written")
    touched = time.time() - age
    os.utime(path, (touched, touched))
    return path


def test_a_stage_removes_the_stale_temporaries_of_its_own_key_only(tmp_path, caplog) -> None:
    """A kill during a data stage leaves `.<key>.tmp-*` (or the fan-out's `.<key>.parts-*`);
    the next build of that key removes those whose writer is gone, and nothing else: a live
    writer's (another process building the same key now), another host's, another key's."""
    import subprocess
    import sys

    from alphaloom.tasks.common.storage import HOST_TAG

    cfg = tiny_config(f"work_dir={tmp_path / 'work'}", *SMALL)
    ref, problem = ingest_task.problem(cfg)
    assert problem == "missing"
    market, key = Path(ref.path).parent, Path(ref.path).name
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = [
            _temp(market, f".{key}.tmp-{HOST_TAG}-{exited.pid}-a1b2c3"),  # its writer exited
            _temp(market, f".{key}.parts-{HOST_TAG}-{exited.pid}-d4e5f6"),
            _temp(market, f".{key}.tmp-{HOST_TAG}-{live.pid}-reused", age=600),  # pid reused since
            _temp(market, f".{key}.tmp-0lderna", age=3 * 86400),  # untagged, untouched for days
        ]
        kept = [
            _temp(market, f".{key}.tmp-{HOST_TAG}-{live.pid}-g7h8i9"),  # its writer is alive
            _temp(market, f".{key}.tmp-deadbeef-{exited.pid}-j0k1l2"),  # another host's
            _temp(market, f".{key}.tmp-recent"),  # untagged, touched just now
            _temp(market, f".otherkey.tmp-{HOST_TAG}-{exited.pid}-m3n4o5"),  # another key's
        ]
        with caplog.at_level(logging.INFO, logger="alphaloom.tasks.orchestration.caching"):
            built = ingest_task.reuse_or_build(cfg)
    finally:
        live.kill()
        live.wait()
    assert output_problem(built.path) is None
    assert [path for path in stale if path.exists()] == []
    assert [path for path in kept if not path.exists()] == []
    assert all(str(path) in caplog.text for path in stale)
    leftovers = {p.name for p in market.iterdir()} - {key} - {p.name for p in kept}
    assert not any(".tmp-" in name for name in leftovers), leftovers  # the build's own is gone


def test_after_a_stop_the_dead_writers_temporaries_anywhere_in_the_work_dir_are_removed(
    tmp_path,
) -> None:
    """A fit worker killed by a stop cannot remove its temporaries: the command removes those of
    gone writers at any depth of the work dir, and leaves a live writer's and finished outputs."""
    import subprocess
    import sys

    from alphaloom.tasks.common.storage import HOST_TAG
    from alphaloom.tasks.orchestration.caching import remove_dead_writers_temps

    work = tmp_path / "work"
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead = [
            _temp(work / "backtest", f".abc.tmp-{HOST_TAG}-{exited.pid}-x1"),
            _temp(work / "checkpoints" / "p2", f".checkpoint.pt.tmp-{HOST_TAG}-{exited.pid}-x2"),
            _temp(work / "shards", f".key.parts-{HOST_TAG}-{exited.pid}-x3"),
        ]
        kept = [
            _temp(work / "backtest", f".def.tmp-{HOST_TAG}-{live.pid}-y1"),
            _temp(work / "shards", "finished"),
        ]
        removed = remove_dead_writers_temps(work)
    finally:
        live.kill()
        live.wait()
    assert sorted(removed) == sorted(dead)
    assert [path for path in dead if path.exists()] == []
    assert [path for path in kept if not path.exists()] == []
