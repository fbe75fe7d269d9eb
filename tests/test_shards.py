"""Shard writing: layout, identity, atomicity, checksums and input validation
(tasks/dataset/shards.py, shard_writer.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import alphaloom.tasks.dataset.shards as shards_module
from alphaloom.model.dataset import ShardedWindowDataset
from alphaloom.model.shard_format import MANIFEST_NAME, ShardSetError, days_to_dates
from alphaloom.model.shard_set import ShardSetInfo, read_manifest
from alphaloom.tasks.common.config import ShardsSection
from alphaloom.tasks.common.hashing import sha256_file
from alphaloom.tasks.dataset import shard_writer
from alphaloom.tasks.dataset.shard_writer import ShardBuildError, plan_shards
from alphaloom.tasks.dataset.shards import build_shards, build_shards_from
from tests.shards_testdata import Table, expected_windows, make_table

WINDOW = 12


def _build(table: Table, root: Path, **cfg) -> Path:
    section = ShardsSection(window=WINDOW, n_shards=cfg.pop("n_shards", 5), **cfg)
    return build_shards(
        table.frame,
        table.feature_names,
        table.stats,
        table.split_dates,
        table.instruments,
        table.text,
        section,
        root,
        source_hash="source-123",
    )


@pytest.fixture(scope="module")
def table() -> Table:
    return make_table(n_symbols=20, n_days=120)


@pytest.fixture(scope="module")
def shard_dir(table: Table, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(table, tmp_path_factory.mktemp("shards"))


def _read_all(info: ShardSetInfo) -> pd.DataFrame:
    parts = []
    for number in range(len(info.shards)):
        arrays = info.read_shard(number)
        part = pd.DataFrame(arrays.x, columns=info.feature_names)
        part.insert(0, "symbol", info.symbol_names(arrays.symbol))
        part.insert(1, "date", days_to_dates(arrays.date).astype("datetime64[ns]"))
        for name in ("label", "fwd_return", "split", "industry", "index", "bar", "text_row"):
            part[name] = getattr(arrays, name)
        part["shard"] = number
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def test_manifest_lists_everything_the_network_and_loader_need(shard_dir: Path, table: Table):
    manifest = read_manifest(shard_dir)
    assert manifest["feature_names"] == table.feature_names
    assert manifest["n_features"] == len(table.feature_names)
    assert manifest["window"] == WINDOW
    assert manifest["text_dim"] == table.text.vectors.shape[1]
    assert manifest["n_industries"] == 4  # "", Banks, Energy, Tech
    assert manifest["n_indices"] == 3  # "", CSI300, CSI500
    assert manifest["last_date"] == str(table.frame["date"].max().date())
    assert manifest["splits"] == table.split_dates
    assert manifest["stats"] == table.stats
    assert manifest["source_hash"] == "source-123"
    assert len(manifest["code_version"]) == 16
    assert sum(entry["bars"] for entry in manifest["shards"]) == len(table.frame)
    spans = table.frame.groupby("symbol")["date"].agg(["min", "max"])
    calendar = np.unique(table.frame["date"])
    days = np.searchsorted(calendar, spans["max"]) - np.searchsorted(calendar, spans["min"]) + 1
    assert sum(entry["rows"] for entry in manifest["shards"]) == days.sum() > len(table.frame)
    for entry in manifest["shards"]:
        assert sha256_file(shard_dir / entry["file"]) == entry["sha256"]
    for name, digest in manifest["side_tables"].items():
        assert sha256_file(shard_dir / name) == digest


def test_shards_hold_whole_sorted_symbol_histories_and_round_trip(shard_dir: Path, table: Table):
    info = ShardSetInfo.open(shard_dir)
    back = _read_all(info)
    assert back.groupby("symbol")["shard"].nunique().max() == 1  # whole histories per shard
    for _, part in back.groupby("shard"):
        keys = list(zip(part["symbol"], part["date"], strict=True))
        assert keys == sorted(keys)
    gaps = back[back["bar"] == 0]
    assert len(gaps) > 0 and not gaps[table.feature_names].to_numpy().any()
    assert (gaps["label"] == -1).all() and gaps["fwd_return"].isna().all()
    back = back[back["bar"] == 1].sort_values(["symbol", "date"], ignore_index=True)
    expected = table.frame.sort_values(["symbol", "date"], ignore_index=True)
    assert back["symbol"].tolist() == expected["symbol"].tolist()
    assert (back["date"].to_numpy() == expected["date"].to_numpy()).all()
    np.testing.assert_array_equal(
        back[table.feature_names].to_numpy(), expected[table.feature_names].to_numpy()
    )
    np.testing.assert_array_equal(back["label"], expected["label"])
    np.testing.assert_array_equal(back["split"], expected["split"])
    np.testing.assert_array_equal(back["fwd_return"], expected["fwd_return"])  # NaN == NaN here


def test_side_tables_map_ids_to_names_text_and_categories(shard_dir: Path, table: Table):
    info = ShardSetInfo.open(shard_dir)
    assert list(info.symbols) == sorted(table.instruments["symbol"])
    by_symbol = table.instruments.set_index("symbol")
    text_row = {s: i for i, s in enumerate(table.text.symbols)}
    for symbol_id, symbol in enumerate(info.symbols):
        industry = by_symbol.loc[symbol, "industry"]
        index = by_symbol.loc[symbol, "index"]
        assert info.industries[info.symbol_industry[symbol_id]] == industry
        assert info.indices[info.symbol_index[symbol_id]] == index
        assert (info.symbol_industry[symbol_id] == 0) == (industry == "")
        assert (info.symbol_index[symbol_id] == 0) == (index == "")
        np.testing.assert_array_equal(info.text[symbol_id], table.text.vectors[text_row[symbol]])
        assert info.has_text[symbol_id] == table.text.has_text[text_row[symbol]]
    back = _read_all(info)
    assert (
        back["industry"] == info.symbol_industry[info.symbols.searchsorted(back["symbol"])]
    ).all()


def test_manifest_window_counts_match_an_independent_count(shard_dir: Path, table: Table):
    info = ShardSetInfo.open(shard_dir)
    for split in ("train", "valid", "test", None):
        for min_valid in (1, 5, WINDOW):
            expected = expected_windows(table.frame, WINDOW, split, min_valid)
            assert info.window_count(split, min_valid) == len(expected)


def test_complete_set_is_reused_and_any_input_change_makes_a_new_one(tmp_path: Path, table: Table):
    first = _build(table, tmp_path)
    manifest_mtime = (first / MANIFEST_NAME).stat().st_mtime_ns
    assert _build(table, tmp_path) == first
    assert (first / MANIFEST_NAME).stat().st_mtime_ns == manifest_mtime
    assert _build(table, tmp_path, seed=1) != first
    changed = make_table(n_symbols=20, n_days=120)
    changed.frame.loc[7, "f3"] += 1.0
    assert _build(changed, tmp_path) != first
    changed = make_table(n_symbols=20, n_days=120)
    changed.text.vectors[3, 0] += 1.0
    assert _build(changed, tmp_path) != first


def test_object_with_feature_table_attributes_is_accepted(tmp_path: Path, table: Table):
    section = ShardsSection(window=WINDOW, n_shards=5)
    built = build_shards_from(table, table.instruments, table.text, section, tmp_path, "source-123")
    assert built == _build(table, tmp_path)


def test_assignment_is_seeded_random_and_size_balanced():
    rows = np.random.default_rng(3).integers(50, 150, size=60)
    cfg = ShardsSection(n_shards=6, seed=4)
    plan = plan_shards(rows, 8, cfg)
    assert plan == plan_shards(rows, 8, cfg)
    assert plan != plan_shards(rows, 8, ShardsSection(n_shards=6, seed=5))
    assert sorted(s for shard in plan for s in shard) == list(range(60))
    sizes = [rows[shard].sum() for shard in plan]
    assert max(sizes) - min(sizes) <= rows.max()
    assert plan != [list(range(i, i + 10)) for i in range(0, 60, 10)]  # not in symbol order


def test_target_size_sets_the_shard_count():
    rows = np.full(40, 1000)
    row_bytes = 4 * 100 + shard_writer.ROW_OVERHEAD_BYTES
    target_mb = 10 * 1000 * row_bytes / shard_writer.MIB  # ten symbols per shard
    assert len(plan_shards(rows, 100, ShardsSection(target_shard_mb=target_mb))) == 4
    assert len(plan_shards(rows, 100, ShardsSection(target_shard_mb=1e6))) == 1


def test_unsorted_input_is_sorted_before_writing(tmp_path: Path, table: Table):
    shuffled = make_table(n_symbols=20, n_days=120)
    shuffled.frame = shuffled.frame.sample(frac=1.0, random_state=1)
    info = ShardSetInfo.open(_build(shuffled, tmp_path))
    reference = ShardSetInfo.open(_build(table, tmp_path / "sorted"))
    for number in range(len(info.shards)):
        np.testing.assert_array_equal(info.read_shard(number).x, reference.read_shard(number).x)


def test_interrupted_write_leaves_no_manifest_and_no_directory(
    tmp_path: Path, table: Table, monkeypatch: pytest.MonkeyPatch
):
    real_write = shards_module.write_feature_shard
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (injected)")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(shards_module, "write_feature_shard", failing_write)
    with pytest.raises(OSError, match="injected"):
        _build(table, tmp_path)
    assert list(tmp_path.rglob(MANIFEST_NAME)) == []
    assert list(tmp_path.iterdir()) == []  # not even the temporary directory
    monkeypatch.setattr(shards_module, "write_feature_shard", real_write)
    assert (_build(table, tmp_path) / MANIFEST_NAME).is_file()


def _corrupt_copy(shard_dir: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    import shutil

    copy = tmp_path / shard_dir.name
    shutil.copytree(shard_dir, copy)
    victim = read_manifest(copy)["shards"][1]["file"]
    path = copy / victim
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) - 100]
    path.write_bytes(bytes(data))
    os.utime(path, ns=(1, 1))  # a fresh (size, mtime) key: never served from the verified cache
    return copy, victim


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupted_shard_is_reported_by_name_with_the_rebuild_recipe(
    shard_dir: Path, tmp_path: Path, how: str
):
    copy, victim = _corrupt_copy(shard_dir, tmp_path, how)
    info = ShardSetInfo.open(copy)
    with pytest.raises(ShardSetError, match=victim) as err:
        info.read_shard(1)
    assert "delete the shard-set directory" in str(err.value)
    assert "alphaloom run" in str(err.value)
    dataset = ShardedWindowDataset(info, "train", batch_size=64, pool_shards=5, min_valid_days=3)
    with pytest.raises(ShardSetError, match=victim):
        list(dataset)


def test_missing_or_foreign_manifest_is_an_error_naming_the_directory(
    shard_dir: Path, tmp_path: Path
):
    with pytest.raises(ShardSetError, match="not a complete shard set"):
        read_manifest(tmp_path)
    manifest = json.loads((shard_dir / MANIFEST_NAME).read_text())
    manifest["schema_version"] = 999
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardSetError, match="schema version 999"):
        read_manifest(tmp_path)


def test_directory_without_manifest_is_not_silently_reused(tmp_path: Path, table: Table):
    built = _build(table, tmp_path)
    manifest = (built / MANIFEST_NAME).read_bytes()
    (built / MANIFEST_NAME).unlink()
    assert _build(table, tmp_path) == built  # the broken set is replaced by a rebuilt one
    assert (
        json.loads((built / MANIFEST_NAME).read_bytes())["shards"] == json.loads(manifest)["shards"]
    )
    assert ShardSetInfo.open(built).window_count("train", 10) > 0
    (built / MANIFEST_NAME).unlink()
    (built / "_COMPLETE.json").unlink()  # now nothing says alphaloom wrote this directory
    with pytest.raises(FileExistsError, match=r"not written by alphaloom"):
        _build(table, tmp_path)
    assert not (built / MANIFEST_NAME).exists()  # a foreign directory is never overwritten


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.frame.drop(columns=["f2"]), r"missing column\(s\) \['f2'\]"),
        (lambda t: t.frame.drop(columns=["label"]), r"missing column\(s\) \['label'\]"),
        (lambda t: t.frame.assign(f4=t.frame["f4"].where(t.frame.index != 30)), "'f4'.*NaN"),
        (lambda t: t.frame.assign(label=t.frame["label"].replace(3, 7)), "'label'.*outside"),
        (lambda t: t.frame.assign(split=t.frame["split"].astype(float)), "'split' must be integer"),
        (lambda t: t.frame.assign(date=t.frame["date"].astype(str)), "'date' must be datetime64"),
        (lambda t: pd.concat([t.frame, t.frame.iloc[[5]]]), "duplicate.*SYM000"),
    ],
)
def test_bad_feature_table_is_rejected_naming_the_column(
    tmp_path: Path, table: Table, edit, message
):
    bad = make_table(n_symbols=20, n_days=120)
    bad.frame = edit(bad)
    with pytest.raises(ShardBuildError, match=message):
        _build(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_instruments_and_text_are_rejected(tmp_path: Path):
    bad = make_table(n_symbols=20, n_days=120)
    bad.instruments = bad.instruments.drop(columns=["industry"])
    with pytest.raises(ShardBuildError, match=r"instruments.*\['industry'\]"):
        _build(bad, tmp_path)
    bad = make_table(n_symbols=20, n_days=120)
    bad.text.vectors = bad.text.vectors[:-1]
    with pytest.raises(ShardBuildError, match="text vectors"):
        _build(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_text_and_instruments_mean_zero_ids_and_no_text(tmp_path: Path):
    table = make_table(n_symbols=20, n_days=120)
    table.instruments, table.text = None, None
    info = ShardSetInfo.open(_build(table, tmp_path))
    assert info.sizes()["text_dim"] == 0
    assert info.n_industries == 1 and info.n_indices == 1
    assert not info.has_text.any() and (info.symbol_industry == 0).all()
