"""Content hashes used for cache keys, shard-set names and MLflow tags.

A stage's identity is the hash of (its inputs' content, its config section, its code version), so
reruns with identical inputs reuse outputs and any change rebuilds exactly what depends on it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
from pydantic import BaseModel

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, streamed so large shards need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_json(value: Any) -> str:
    """Hex sha256 of a JSON-serialisable value (pydantic models allowed), key order ignored."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def hash_frame(frame: pd.DataFrame) -> str:
    """Hex sha256 of a DataFrame's columns, dtypes and values (index ignored)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([(str(c), str(t)) for c, t in frame.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def code_version(*modules: ModuleType) -> str:
    """Short hash of the source of the given modules: a code change invalidates cached outputs."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


def combine(*parts: str) -> str:
    """Hash several hex digests (or strings) into one, order-sensitive."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()
