"""Which filesystem a path or URL lives on, for fsspec and for pyarrow readers.

The lowest layer of storage, below all three layers (it imports none of them): the loader
(model/shard_set.py) opens shard sets at URLs with it, and tasks/common/storage.py resolves every
location through `resolve` once, so the code above it reads files without asking whether they are
local. It sits at the package's root, not in model/, because model/ is the PyTorch layer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
from pyarrow import fs as pafs


def is_url(path: str | Path) -> bool:
    """True for `scheme://...` (a Path never is one: pathlib collapses the double slash)."""
    return isinstance(path, str) and "://" in path


def resolve(location: str | Path) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a local path, a file:// URL or any fsspec URL.

    Local paths and file:// URLs resolve to fsspec's LocalFileSystem with an absolute path; an
    unknown scheme, or a file:// URL naming another host, is an error that names the location.
    """
    if not is_url(location):
        return LocalFileSystem(), Path(os.path.abspath(location)).as_posix()
    url = str(location)
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{url}: a file:// URL must name a local path (file:///...)")
        return LocalFileSystem(), Path(os.path.abspath(url2pathname(parsed.path))).as_posix()
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
        fs, inner = resolve(location)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner
