"""Where outputs live and how they are written: one type for local paths and fsspec URLs.

`FsPath.of(location)` resolves a path or URL (local, file://, s3://, gs://, memory://, ...) once
into an fsspec filesystem and a path on it; code below that reads and writes through it and
never asks whether a location is a URL.

Every stage output is a directory written by `atomic_dir` and sealed by `_COMPLETE.json`, its
checksum record (every file's sha256, Hadoop/Spark's `_SUCCESS` with content hashes), written
last. Locally the directory is built in a temporary sibling and renamed into place. Object
stores have no atomic rename, so there it is built in a local temporary directory and uploaded
file by file, data before metadata and the marker last; a URL directory without its marker
counts as absent. `output_problem` re-checks an output against its record, and `local_copy`
gives a verified local copy of a URL output. Single files (`atomic_file`) are renamed into
place locally and uploaded in one PUT, which object stores apply atomically. A local temporary
names its writer (`temp_tag`: host, pid), so a stage removes the ones its killed writers left
(tasks/orchestration/caching.py); one stopped by a signal removes its own (`remove_live_temps`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from alphaloom.filesystems import resolve
from alphaloom.tasks.common.hashing import sha256_file

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE.json"
CACHE_DIR_ENV = "ALPHALOOM_CACHE_DIR"


class StorageError(ValueError):
    """An output is incomplete or corrupt; the message names the location and the file."""


@dataclass(frozen=True)
class FsPath:
    """A file or directory on some filesystem: the fsspec filesystem, its path there, and the
    name users, pandas and pyarrow know it by (the local path, or the URL as given)."""

    fs: Any
    path: str
    url: str

    @classmethod
    def of(cls, location: Location) -> FsPath:
        """Resolve a path, a file:// URL or any fsspec URL (an FsPath is returned as is)."""
        if isinstance(location, FsPath):
            return location
        fs, path = resolve(location)
        local = isinstance(fs, LocalFileSystem)
        return cls(fs, path, path if local else str(location).rstrip("/"))

    def __truediv__(self, name: str) -> FsPath:
        return FsPath(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.url.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.url

    @property
    def local(self) -> Path | None:
        """The local path, or None for a location on another filesystem."""
        return Path(self.path) if isinstance(self.fs, LocalFileSystem) else None

    @property
    def local_or_url(self) -> Path | str:
        """The local path as a Path, or the URL as given: for code that takes `str | Path`."""
        return self.local if self.local is not None else self.url

    @property
    def name(self) -> str:
        """The last component ('AAPL.csv')."""
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def id(self) -> str:
        """A stable text identity: the resolved local path, or the URL."""
        return str(self.local.resolve()) if self.local is not None else self.url

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def iterdir(self) -> list[FsPath]:
        """A directory's entries, sorted by name."""
        names = sorted(
            posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False)
        )
        return [self / name for name in names]

    def open(self, mode: str = "rb") -> Any:
        return self.fs.open(self.path, mode)

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.path))

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def sha256(self) -> str:
        """Hex sha256 of the file's bytes, streamed."""
        with self.open() as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def remove(self) -> None:
        """Delete the file if it is there."""
        if self.fs.isfile(self.path):
            self.fs.rm_file(self.path)


Location = str | Path | FsPath  # anything that names a place: a path, a URL or an FsPath


# ----------------------------------------------------------------------------------------------
# Atomic writes


HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_LIVE_TEMPS: set[Path] = set()  # this process's temporaries being written


def temp_tag() -> str:
    """`<host>-<pid>`: whose a temporary is (tasks/orchestration/caching.remove_stale_temps)."""
    return f"{HOST_TAG}-{os.getpid()}"


def remove_temp(temp: Path) -> None:
    shutil.rmtree(temp, ignore_errors=True) if temp.is_dir() else temp.unlink(missing_ok=True)


def remove_live_temps() -> list[Path]:
    """Remove the temporaries this process is writing (it is being stopped by a signal)."""
    live = list(_LIVE_TEMPS)
    for temp in live:
        remove_temp(temp)
    return live


@contextlib.contextmanager
def _live(temp: Path) -> Iterator[Path]:
    """Track `temp` while it is written; remove it if the block fails."""
    _LIVE_TEMPS.add(temp)
    try:
        yield temp
    except BaseException:
        remove_temp(temp)
        raise
    finally:
        _LIVE_TEMPS.discard(temp)


@contextlib.contextmanager
def atomic_dir(final: Location) -> Iterator[Path]:
    """Yield a local temporary directory that becomes `final`, sealed with its checksum record,
    only if the block succeeds.

    An intact output already at `final` (another writer finished the same content first) is
    kept; a broken one (missing files, a checksum that does not match) is replaced; a local
    directory this code did not write (no marker) is an error, never overwritten.
    """
    out = FsPath.of(final)
    target = out.local
    if target is None:
        with tempfile.TemporaryDirectory(prefix="alphaloom-upload-") as staging:
            yield Path(staging)
            publish_dir(Path(staging), out)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-{temp_tag()}-"
    with _live(Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))) as tmp:
        yield tmp
        mark_complete(tmp, checksums(tmp))
        promote_dir(tmp, target)


@contextlib.contextmanager
def atomic_file(final: Location) -> Iterator[Path]:
    """Yield a local temporary path that replaces `final` only if the block succeeds; at a URL
    the finished file is uploaded in one PUT."""
    out = FsPath.of(final)
    target = out.local
    if target is None:
        with tempfile.TemporaryDirectory(prefix="alphaloom-upload-") as staging:
            tmp = Path(staging) / out.name
            yield tmp
            out.fs.makedirs(posixpath.dirname(out.path), exist_ok=True)
            out.fs.put_file(str(tmp), out.path)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{temp_tag()}-", dir=target.parent)
    os.close(fd)
    with _live(Path(name)) as tmp:
        yield tmp
        os.replace(tmp, target)


def write_text_atomic(final: Location, text: str) -> None:
    """Write a small text file atomically (a path or a URL)."""
    with atomic_file(final) as tmp:
        tmp.write_text(text)


def upload_order(local: Path) -> list[Path]:
    """The files of a finished directory, data first and the JSON metadata (manifest.json,
    meta.json, ...) after: a reader that finds the metadata at a URL finds the data too."""
    files = [path for path in local.rglob("*") if path.is_file()]
    return sorted(files, key=lambda path: (path.suffix == ".json", path.as_posix()))


def checksums(local: Path) -> dict[str, str]:
    """sha256 of every file of a local directory by relative name (its marker excluded)."""
    return {
        path.relative_to(local).as_posix(): sha256_file(path)
        for path in upload_order(local)
        if path.name != COMPLETE_MARKER
    }


def mark_complete(where: Location, files: dict[str, str]) -> None:
    """Write the completion marker of a directory whose files (relative name -> sha256) are all
    in place: one write, the last of the output."""
    marker = FsPath.of(where) / COMPLETE_MARKER
    marker.fs.pipe_file(
        marker.path, json.dumps({"files": files}, indent=1, sort_keys=True).encode()
    )


def withdraw(where: Location) -> None:
    """Remove an output's marker, so the output counts as absent while it is rebuilt."""
    (FsPath.of(where) / COMPLETE_MARKER).remove()


def promote_dir(staging: Path, final: Path) -> None:
    """Rename a finished, sealed local directory to `final`.

    If `final` is there already: kept when intact (another writer of the same content got there
    first: outputs are content-addressed), replaced when it is a broken output, refused when it
    has no marker (not written by this code).
    """
    try:
        os.rename(staging, final)
        return
    except OSError:
        if not final.is_dir():
            raise
    problem = output_problem(final)
    if problem is None:
        shutil.rmtree(staging, ignore_errors=True)
        return
    if not (final / COMPLETE_MARKER).is_file():
        raise FileExistsError(
            f"{final}: exists but was not written by alphaloom (no {COMPLETE_MARKER}); "
            "delete it or choose another directory"
        )
    log.warning("%s is %s: replacing it", final, problem)
    aside = final.with_name(f".{final.name}.broken-{uuid.uuid4().hex[:8]}")
    os.rename(final, aside)
    try:
        os.rename(staging, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)  # a concurrent writer replaced it first
    shutil.rmtree(aside, ignore_errors=True)


def publish_dir(local: Path, url: FsPath) -> None:
    """Upload the finished directory `local` to `url`, the completion marker last.

    An intact output already at `url` is kept; a broken one is withdrawn first (its marker
    removed) and overwritten. Before the metadata goes up the marker is checked again, so a
    writer that loses a race does not overwrite the winner's metadata. If the upload fails, what
    was uploaded is removed (best effort) unless another writer completed the output meanwhile.
    """
    if output_problem(url) is None:
        return
    withdraw(url)
    files: dict[str, str] = {}
    uploaded: list[FsPath] = []
    try:
        for path in upload_order(local):
            if path.suffix == ".json" and output_complete(url):
                return  # another writer finished the same content first
            relative = path.relative_to(local).as_posix()
            target = url / relative
            url.fs.makedirs(posixpath.dirname(target.path), exist_ok=True)
            url.fs.put_file(str(path), target.path)
            uploaded.append(target)
            files[relative] = sha256_file(path)
        mark_complete(url, files)
    except BaseException:
        if not output_complete(url):
            for target in uploaded:
                with contextlib.suppress(Exception):
                    url.fs.rm_file(target.path)
        raise


def parts_dir(final: Location) -> FsPath:
    """Where the files of an output that several workers write go until it is complete.

    Locally a fresh hidden sibling directory (one per call, so overlapping runs cannot mix their
    files; workers must share the filesystem), renamed into place by `complete_parts`; at a URL
    the output's own location, withdrawn so that it counts as absent until it is marked complete.
    """
    out = FsPath.of(final)
    if out.local is None:
        withdraw(out)
        return out
    parts = out.local.parent / f".{out.local.name}.parts-{temp_tag()}-{uuid.uuid4().hex[:8]}"
    parts.mkdir(parents=True, exist_ok=True)
    where = FsPath.of(parts)
    _LIVE_TEMPS.add(Path(where.path))  # until `complete_parts` renames it
    return where


def complete_parts(parts: Location, final: Location, files: dict[str, str]) -> None:
    """Make the finished `parts_dir` the output at `final`: every file in `files` (relative name
    -> sha256) must be there; others (temp files of a worker killed mid-write) are dropped; then
    the marker is written and, locally, the directory renamed into place."""
    parts, out = FsPath.of(parts), FsPath.of(final)
    present = {entry.name for entry in parts.iterdir()} - {COMPLETE_MARKER}
    absent = sorted(set(files) - present)
    if absent:
        raise StorageError(f"{out}: files missing before completion: {absent[:5]}")
    for stray in sorted(present - set(files)):
        (parts / stray).remove()
    mark_complete(parts, files)
    if parts.local is not None and out.local is not None and parts.local != out.local:
        promote_dir(parts.local, out.local)
        _LIVE_TEMPS.discard(parts.local)


# ----------------------------------------------------------------------------------------------
# Reading outputs back


def output_complete(where: Location) -> bool:
    """Whether the output at `where` carries its completion marker (cheap: nothing is hashed)."""
    return (FsPath.of(where) / COMPLETE_MARKER).is_file()


def _marker_files(out: FsPath) -> dict[str, str]:
    """The files (relative name -> sha256) an output's marker lists; errors name the marker."""
    marker = out / COMPLETE_MARKER
    try:
        files = json.loads(marker.read_text())["files"]
    except FileNotFoundError:
        raise StorageError(
            f"{out}: no complete output there (its {COMPLETE_MARKER} is missing); "
            "rerun the stage that writes it"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise StorageError(f"{marker}: not a completion record ({err})") from None
    if not isinstance(files, dict):
        raise StorageError(f"{marker}: 'files' is not a mapping of file names to sha256s")
    return files


def output_problem(where: Location) -> str | None:
    """Why the output at `where` cannot be used as it is ("missing", "incomplete: ...",
    "corrupt: ..."), or None when every file its marker lists is there with that sha256."""
    out = FsPath.of(where)
    if not output_complete(out):
        return f"incomplete (no {COMPLETE_MARKER})" if out.exists() else "missing"
    try:
        files = _marker_files(out)
    except StorageError as err:
        return f"corrupt ({err})"
    for relative, expected in files.items():
        path = out / relative
        if not path.is_file():
            return f"incomplete ({relative} is missing)"
        if path.sha256() != expected:
            return f"corrupt ({relative} does not match its sha256 in {COMPLETE_MARKER})"
    return None


def cache_root() -> Path:
    """Local scratch for copies of URL outputs and caches that must be local
    ($ALPHALOOM_CACHE_DIR, default ~/.cache/alphaloom)."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "alphaloom"


def local_work_dir(work_dir: Location, name: str) -> Path:
    """`<work_dir>/<name>` when work_dir is local, else `<cache_root>/<name>`: for caches that
    are read file by file and cheap to rebuild (the text-embedding cache)."""
    local = FsPath.of(work_dir).local
    return local / name if local is not None else cache_root() / name


def local_copy(where: Location) -> Path:
    """A local directory holding the complete output at `where` (itself when local).

    A URL output is downloaded once into `<cache_root>/urls/<hash of the URL>`, every file checked
    against the sha256 in its completion marker; later calls reuse that copy while the marker is
    unchanged. Errors name the URL and the file.
    """
    out = FsPath.of(where)
    if out.local is not None:
        return out.local
    files = _marker_files(out)  # a clear error when the marker is missing or malformed
    target = cache_root() / "urls" / hashlib.sha256(out.id.encode()).hexdigest()[:24]
    if output_complete(target) and _marker_files(FsPath.of(target)) == files:
        return target
    shutil.rmtree(target, ignore_errors=True)  # a copy of older content under the same URL
    with atomic_dir(target) as tmp:
        for relative, expected in files.items():
            local = tmp / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                out.fs.get_file((out / relative).path, str(local))
            except FileNotFoundError:
                raise StorageError(
                    f"{out / relative}: listed in {COMPLETE_MARKER} but missing"
                ) from None
            if sha256_file(local) != expected:
                raise StorageError(
                    f"{out / relative}: checksum does not match {COMPLETE_MARKER} "
                    "(corrupt or partially overwritten output)"
                )
    return target
