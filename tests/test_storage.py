"""Storage resolved once (FsPath) and outputs that prove themselves (checksum record, last)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pytest

from alphaloom.tasks.common.hashing import sha256_file
from alphaloom.tasks.common.storage import (
    COMPLETE_MARKER,
    FsPath,
    atomic_dir,
    output_problem,
)


def flip_byte(data: bytes) -> bytes:
    """The same bytes with one in the middle inverted (same size, different content)."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


def write_output(where: str | Path, files: dict[str, bytes]) -> None:
    with atomic_dir(where) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)


FILES = {"data.parquet": b"0123456789" * 100, "meta.json": b'{"rows": 10}'}


def test_a_local_path_a_file_url_and_a_memory_url_read_alike(tmp_path, memory_root) -> None:
    (tmp_path / "a.csv").write_text("x\n1\n")
    memory, root = fsspec.core.url_to_fs(memory_root)
    memory.pipe_file(f"{root}/a.csv", b"x\n1\n")
    for parent in (tmp_path, tmp_path.as_uri(), memory_root):
        where = FsPath.of(parent)
        assert [entry.name for entry in where.iterdir()] == ["a.csv"]
        csv = where / "a.csv"
        assert csv.is_file() and not csv.is_dir() and csv.name == "a.csv"
        assert csv.read_text() == "x\n1\n" and csv.sha256() == sha256_file(tmp_path / "a.csv")
    assert FsPath.of(tmp_path.as_uri()).local == tmp_path  # file:// is local
    assert str(FsPath.of(memory_root) / "a.csv") == f"{memory_root}/a.csv"  # spelling kept
    assert FsPath.of(memory_root).local is None
    assert FsPath.of(f"{memory_root}/").local_or_url == memory_root


def test_a_relative_path_resolves_to_an_absolute_one(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    where = FsPath.of("work") / "market"
    assert where.local == tmp_path / "work" / "market" and str(where) == str(where.local)


def test_a_file_url_on_another_host_is_an_error_that_names_it() -> None:
    with pytest.raises(ValueError, match="file://server/share"):
        FsPath.of("file://server/share/bars.csv")


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_an_output_carries_its_checksums_and_every_break_is_named(
    kind, tmp_path, memory_root
) -> None:
    out = str(tmp_path / "out") if kind == "local" else f"{memory_root}/out"
    assert output_problem(out) == "missing"
    write_output(out, FILES)
    where = FsPath.of(out)
    marker = json.loads((where / COMPLETE_MARKER).read_text())
    assert marker["files"] == {
        name: sha256_file(path) for name, path in _local_files(tmp_path, FILES).items()
    }
    assert output_problem(out) is None
    data = where / "data.parquet"
    data.fs.pipe_file(data.path, flip_byte(FILES["data.parquet"]))
    assert (
        output_problem(out)
        == f"corrupt (data.parquet does not match its sha256 in {COMPLETE_MARKER})"
    )
    data.remove()
    assert output_problem(out) == "incomplete (data.parquet is missing)"
    (where / COMPLETE_MARKER).remove()
    assert output_problem(out) == f"incomplete (no {COMPLETE_MARKER})"


def _local_files(tmp_path: Path, files: dict[str, bytes]) -> dict[str, Path]:
    folder = tmp_path / "expected"
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_rewriting_keeps_an_intact_output_and_replaces_a_broken_one(
    kind, tmp_path, memory_root
) -> None:
    out = str(tmp_path / "out") if kind == "local" else f"{memory_root}/out"
    write_output(out, FILES)
    data = FsPath.of(out) / "data.parquet"
    before = written_at(data)
    write_output(out, FILES)  # same content: the existing output is kept as it is
    assert written_at(data) == before
    data.fs.pipe_file(data.path, flip_byte(FILES["data.parquet"]))
    write_output(out, FILES)  # a broken output is replaced
    assert output_problem(out) is None and data.read_bytes() == FILES["data.parquet"]
    if kind == "local":
        assert os.listdir(tmp_path) == ["out"]  # no staging or set-aside copy left behind


def written_at(path: FsPath) -> object:
    """When the file was last written (local mtime, the memory filesystem's creation time)."""
    info = path.fs.info(path.path)
    return info.get("mtime", info.get("created"))


def test_a_local_directory_not_written_here_is_never_overwritten(tmp_path) -> None:
    foreign = tmp_path / "out"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"not written by alphaloom.*{COMPLETE_MARKER}"):
        write_output(foreign, FILES)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the staging copy is gone too
