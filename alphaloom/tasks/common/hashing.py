"""Content hashes used for cache keys, shard-set names and MLflow tags.

A stage's identity is the hash of (its inputs' content, its config section, its code version), so
reruns with identical inputs reuse outputs and any change rebuilds exactly what depends on it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import sys
import threading
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


_AST_LOCK = threading.Lock()  # ast.parse is not thread-safe on CPython 3.11 (gh-106905)
_IMPORTS: dict[str, frozenset[str]] = {}


def _imported_names(module: ModuleType) -> frozenset[str]:
    """Modules named by `module`'s imports (anywhere in it: deferred imports count too),
    parsed once per process (stage keys are computed for every task call, in many threads)."""
    with _AST_LOCK:
        if module.__name__ not in _IMPORTS:
            _IMPORTS[module.__name__] = frozenset(_parse_imports(inspect.getsource(module)))
        return _IMPORTS[module.__name__]


def _parse_imports(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def package_closure(*modules: ModuleType) -> tuple[ModuleType, ...]:
    """The modules plus every module of their own package that they import, transitively.

    A stage's code is more than its own file (features.py builds on labels, splits, factor_names,
    rolling and alpha158); hashing the closure means a change to any of them rebuilds the stage,
    with no hand-kept list to forget a module in. Only the modules' own packages are followed
    (a stage's upstream stages are in its key already), sorted by name for a stable hash.
    """
    found: dict[str, ModuleType] = {}
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module.__name__ in found:
            continue
        found[module.__name__] = module
        package = module.__name__.rpartition(".")[0]
        for name in _imported_names(module):
            if name.rpartition(".")[0] == package and name not in found:
                imported = sys.modules.get(name) or _try_import(name)
                if imported is not None:
                    todo.append(imported)
    return tuple(found[name] for name in sorted(found))


def _try_import(name: str) -> ModuleType | None:
    """The module `name`, or None when it is not a module (a class imported from a package)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def combine(*parts: str) -> str:
    """Hash several hex digests (or strings) into one, order-sensitive."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()
