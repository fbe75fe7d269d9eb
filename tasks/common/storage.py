"""Atomic writes, locally or at fsspec URLs: outputs appear complete or not at all.

Locally, every stage writes into a temporary sibling and renames it into place, so a crash leaves
nothing that looks finished and two writers of the same content cannot corrupt each other.

Object stores (s3://, gs://, memory://, ...) have no atomic directory rename, so an output
directory at a URL is built in a local temporary directory, uploaded file by file, and marked
complete by a `_COMPLETE.json` written last (file names and sha256s, as Hadoop/Spark's
`_SUCCESS`). Readers treat a URL directory without that marker as absent and read a complete one
through a verified local copy (`local_copy`) or directly (pyarrow/fsspec). Single files at a URL
are uploaded in one PUT, which object stores apply atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse
from urllib.request import url2pathname

from alphaloom.model.filesystems import is_url, url_filesystem
from alphaloom.tasks.common.hashing import sha256_file


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a local temporary directory that becomes `final` only if the block succeeds.

    If `final` already exists (another writer finished the same content first), the temporary
    copy is discarded and the existing directory is kept. At a URL, "becomes" means uploaded
    with its completion marker last (see `publish_dir`).
    """
    final = local_or_url(final)
    if isinstance(final, str):
        with tempfile.TemporaryDirectory(prefix="alphaloom-upload-") as staging:
            yield Path(staging)
            publish_dir(Path(staging), final)
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        promote_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a local temporary path that replaces `final` (a path or URL) only if the block
    succeeds; at a URL the finished file is uploaded in one PUT."""
    final = local_or_url(final)
    if isinstance(final, str):
        with tempfile.TemporaryDirectory(prefix="alphaloom-upload-") as staging:
            tmp = Path(staging) / base_name(final)
            yield tmp
            fs, inner = url_filesystem(final)
            fs.makedirs(posixpath.dirname(inner), exist_ok=True)
            fs.put_file(str(tmp), inner)
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(final: str | Path, text: str) -> None:
    """Write a small text file atomically (a path or a URL)."""
    with atomic_file(final) as tmp:
        tmp.write_text(text)


# ----------------------------------------------------------------------------------------------
# Locations: local paths, file:// URLs and any fsspec URL (s3://, gs://, memory://, ...)
#
# Local paths (and file:// URLs, turned into paths) keep the plain pathlib code path; other URLs
# go through fsspec. Inputs and outputs (work_dir) may be either.

Location = Path | str
COMPLETE_MARKER = "_COMPLETE.json"
CACHE_DIR_ENV = "ALPHALOOM_CACHE_DIR"


def local_or_url(path: str | Path) -> Path | str:
    """A plain path or a file:// URL as a Path; any other URL unchanged (read through fsspec)."""
    if isinstance(path, str) and path.startswith("file://"):
        parsed = urlparse(path)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{path}: a file:// URL must name a local path (file:///...)")
        return Path(url2pathname(parsed.path))
    return path if is_url(path) else Path(path)


def child(parent: Path | str, name: str) -> Path | str:
    """`parent / name` for a path or a URL."""
    return parent / name if isinstance(parent, Path) else f"{parent.rstrip('/')}/{name}"


def base_name(path: Path | str) -> str:
    """The last component of a path or URL ('AAPL.csv')."""
    if isinstance(path, Path):
        return path.name
    return PurePosixPath(urlparse(path).path).name


def is_file(path: Path | str) -> bool:
    if isinstance(path, Path):
        return path.is_file()
    fs, inner = url_filesystem(path)
    return bool(fs.isfile(inner))


def is_dir(path: Path | str) -> bool:
    if isinstance(path, Path):
        return path.is_dir()
    fs, inner = url_filesystem(path)
    return bool(fs.isdir(inner))


def exists(path: Path | str) -> bool:
    if isinstance(path, Path):
        return path.exists()
    fs, inner = url_filesystem(path)
    return bool(fs.exists(inner))


def list_dir(path: Path | str) -> list[Path | str]:
    """A directory's entries sorted by name (URLs come back as URLs of the same scheme)."""
    if isinstance(path, Path):
        return sorted(path.iterdir())
    fs, inner = url_filesystem(path)
    return [fs.unstrip_protocol(p) for p in sorted(fs.ls(inner, detail=False))]


def sha256_of(path: Path | str) -> str:
    """Hex sha256 of a local file or of a URL's bytes (streamed either way)."""
    if isinstance(path, Path):
        return sha256_file(path)
    fs, inner = url_filesystem(path)
    with fs.open(inner, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------------
# Output directories at URLs


def location_id(location: str | Path) -> str:
    """A stable text identity of a location: the absolute path, or the URL itself."""
    location = local_or_url(location)
    return str(location.resolve()) if isinstance(location, Path) else location.rstrip("/")


class StorageError(ValueError):
    """A URL output is incomplete or corrupt; the message names the URL and the file."""


def output_complete(location: str | Path, required: str | None = None) -> bool:
    """Whether an output directory written by `atomic_dir` is there (complete) at `location`,
    and holds the file `required` if one is named (a directory someone made by hand does not)."""
    location = local_or_url(location)
    if isinstance(location, Path):
        done = location.is_dir()
    else:
        done = is_file(child(location, COMPLETE_MARKER))
    return done and (required is None or is_file(child(location, required)))


def upload_order(local: Path) -> list[Path]:
    """The files of a finished directory, data first and the JSON metadata (manifest.json,
    meta.json, ...) after: a reader that finds the metadata at a URL finds the data too."""
    files = [path for path in local.rglob("*") if path.is_file()]
    return sorted(files, key=lambda path: (path.suffix == ".json", path.as_posix()))


def publish_dir(local: Path, url: str) -> None:
    """Upload the finished directory `local` to `url`, the completion marker last.

    A directory already complete at `url` is kept (outputs are content-addressed, so it holds the
    same content); that is checked again before the metadata goes up, so a writer that loses a
    race does not overwrite the winner's metadata. If the upload fails, what was uploaded is
    removed (best effort) unless another writer completed the output meanwhile; without the
    marker it would be treated as absent anyway, and the next run overwrites it.
    """
    if output_complete(url):
        return
    fs, inner = url_filesystem(url)
    checksums: dict[str, str] = {}
    uploaded: list[str] = []
    try:
        for path in upload_order(local):
            if path.suffix == ".json" and output_complete(url):
                return  # another writer finished the same content first
            relative = path.relative_to(local).as_posix()
            target = f"{inner.rstrip('/')}/{relative}"
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
            fs.put_file(str(path), target)
            uploaded.append(target)
            checksums[relative] = sha256_file(path)
        mark_complete(url, checksums)
    except BaseException:
        if not output_complete(url):
            for target in uploaded:
                with contextlib.suppress(Exception):
                    fs.rm_file(target)
        raise


def mark_complete(url: str, checksums: dict[str, str]) -> None:
    """Write the completion marker of a URL output whose files (relative name -> sha256) are all
    uploaded: one PUT, the last write of the output."""
    fs, inner = url_filesystem(url)
    marker = json.dumps({"files": checksums}, indent=1, sort_keys=True)
    fs.pipe_file(f"{inner.rstrip('/')}/{COMPLETE_MARKER}", marker.encode())


def promote_dir(staging: Path, final: Path) -> None:
    """Rename a finished local staging directory to `final`; if another writer got there first
    (same content: outputs are content-addressed), drop the staging copy."""
    try:
        os.rename(staging, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)


def cache_root() -> Path:
    """Local scratch for copies of URL outputs and caches that must be local
    ($ALPHALOOM_CACHE_DIR, default ~/.cache/alphaloom)."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "alphaloom"


def local_work_dir(work_dir: str | Path, name: str) -> Path:
    """`<work_dir>/<name>` when work_dir is local, else `<cache_root>/<name>`: for caches that
    are read file by file and cheap to rebuild (the text-embedding cache)."""
    location = local_or_url(work_dir)
    return location / name if isinstance(location, Path) else cache_root() / name


def read_text(location: str | Path) -> str:
    """A small text file at a path or URL."""
    location = local_or_url(location)
    if isinstance(location, Path):
        return location.read_text()
    fs, inner = url_filesystem(location)
    return fs.cat_file(inner).decode()


def read_bytes(location: str | Path) -> bytes:
    """A file's bytes at a path or URL."""
    location = local_or_url(location)
    if isinstance(location, Path):
        return location.read_bytes()
    fs, inner = url_filesystem(location)
    return bytes(fs.cat_file(inner))


def remove_file(location: str | Path) -> None:
    """Delete a file at a path or URL if it is there."""
    location = local_or_url(location)
    if isinstance(location, Path):
        location.unlink(missing_ok=True)
        return
    fs, inner = url_filesystem(location)
    if fs.isfile(inner):
        fs.rm_file(inner)


def local_copy(location: str | Path) -> Path:
    """A local directory holding the complete output at `location` (itself when local).

    A URL output is downloaded once into `<cache_root>/urls/<hash of the URL>`, every file checked
    against the sha256 in its completion marker; later calls reuse that copy while the marker is
    unchanged. Errors name the URL and the file.
    """
    location = local_or_url(location)
    if isinstance(location, Path):
        return location
    marker_url = child(location, COMPLETE_MARKER)
    if not is_file(marker_url):
        raise StorageError(
            f"{location}: no complete output there (its {COMPLETE_MARKER} is missing); "
            "rerun the stage that writes it"
        )
    marker = read_text(marker_url)
    digest = hashlib.sha256(location_id(location).encode()).hexdigest()[:24]
    target = cache_root() / "urls" / digest
    copied_marker = target / COMPLETE_MARKER
    if copied_marker.is_file() and copied_marker.read_text() == marker:
        return target
    shutil.rmtree(target, ignore_errors=True)  # a copy of older content under the same URL
    fs, inner = url_filesystem(location)
    with atomic_dir(target) as tmp:
        for relative, expected in json.loads(marker)["files"].items():
            local = tmp / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(f"{inner.rstrip('/')}/{relative}", str(local))
            except FileNotFoundError:
                raise StorageError(
                    f"{child(location, relative)}: listed in {COMPLETE_MARKER} but missing"
                ) from None
            if sha256_file(local) != expected:
                raise StorageError(
                    f"{child(location, relative)}: checksum does not match {COMPLETE_MARKER} "
                    "(corrupt or partially overwritten output)"
                )
        (tmp / COMPLETE_MARKER).write_text(marker)
    return target
