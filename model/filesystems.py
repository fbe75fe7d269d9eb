"""Which filesystem a path or URL lives on, for fsspec and for pyarrow readers.

The lowest layer of storage: the loader (model/data.py) opens shard sets at URLs with it, and
tasks/storage.py builds its atomic writes and verified copies on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from pyarrow import fs as pafs


def is_url(path: str | Path) -> bool:
    """True for `scheme://...` (a Path never is one: pathlib collapses the double slash)."""
    return isinstance(path, str) and "://" in path


def url_filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a URL; an unknown scheme names the URL."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise ValueError(f"{url}: no filesystem for this URL ({err})") from None


def arrow_filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(pyarrow FileSystem, path) for a path or URL, for pyarrow readers such as the loader's.

    pyarrow's own filesystems (local, s3://, gs://, hdfs://, abfs://) are used when it knows the
    scheme; any other fsspec URL (memory://, ...) is wrapped with pyarrow.fs.FSSpecHandler.
    """
    if not is_url(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        fs, inner = url_filesystem(str(location))
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner
