"""Atomic writes: outputs appear complete or not at all.

Every stage writes into a temporary sibling and renames it into place, so a crash leaves nothing
that looks finished and two writers of the same content cannot corrupt each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import pyarrow as pa

from tasks.hashing import sha256_file


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block succeeds.

    If `final` already exists (another writer finished the same content first), the temporary
    copy is discarded and the existing directory is kept.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path that replaces `final` only if the block succeeds."""
    final = Path(final)
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
    """Write a small text file atomically."""
    with atomic_file(final) as tmp:
        tmp.write_text(text)


# ----------------------------------------------------------------------------------------------
# Input locations: local paths, file:// URLs and any fsspec URL (s3://, gs://, memory://, ...)
#
# Local paths (and file:// URLs, turned into paths) keep the plain pathlib code path; other URLs
# go through fsspec. Outputs (work_dir) are local paths: see docs/scaling.md for the scope.


def is_url(path: str | Path) -> bool:
    """True for `scheme://...` (a Path never is one: pathlib collapses the double slash)."""
    return isinstance(path, str) and "://" in path


def local_or_url(path: str | Path) -> Path | str:
    """A plain path or a file:// URL as a Path; any other URL unchanged (read through fsspec)."""
    if isinstance(path, str) and path.startswith("file://"):
        parsed = urlparse(path)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{path}: a file:// URL must name a local path (file:///...)")
        return Path(url2pathname(parsed.path))
    return path if is_url(path) else Path(path)


def url_filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a URL; an unknown scheme names the URL."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise ValueError(f"{url}: no filesystem for this URL ({err})") from None


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


def arrow_filesystem(location: str | Path) -> tuple[Any, str]:
    """(pyarrow FileSystem, path) for a path or URL, for pyarrow readers such as the loader's.

    pyarrow's own filesystems (local, s3://, gs://, hdfs://, abfs://) are used when it knows the
    scheme; any other fsspec URL (memory://, ...) is wrapped with pyarrow.fs.FSSpecHandler.
    """
    from pyarrow import fs as pafs

    if not is_url(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        fs, inner = url_filesystem(str(location))
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner
