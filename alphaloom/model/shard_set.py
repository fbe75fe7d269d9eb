"""Opening a shard set: verified reads, the manifest, and what it says per shard and split."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from alphaloom.filesystems import arrow_filesystem
from alphaloom.model.shard_format import (
    ALL_KEY,
    MANIFEST_KEYS,
    MANIFEST_NAME,
    NAMES_NAME,
    SCHEMA_VERSION,
    SHARD_COLUMNS,
    SPLIT_CODES,
    SYMBOLS_NAME,
    TEXT_NAME,
    TEXTS_NAME,
    WINDOW_KEYS,
    X_LAYOUT,
    ShardArrays,
    ShardSetError,
    decode_x,
    rebuild_hint,
)

_VERIFIED: dict[tuple[str, int, int], str] = {}


_VERIFIED_LOCK = threading.Lock()


def _verified_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _read_remote(path: Path, filesystem: pafs.FileSystem) -> tuple[tuple[str, int, int], pa.Buffer]:
    """(verification key, bytes) of a file on a pyarrow filesystem (s3, gcs, fsspec-wrapped)."""
    info = filesystem.get_file_info(str(path))
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(str(path))
    mtime = info.mtime_ns if info.mtime_ns is not None else -1
    key = (f"{filesystem.type_name}:{path}", int(info.size or 0), int(mtime))
    with filesystem.open_input_file(str(path)) as handle:
        return key, handle.read_buffer()


def read_verified(
    path: Path, sha256: str, shard_dir: Path, filesystem: pafs.FileSystem | None = None
) -> pa.Buffer:
    """Read a file into an Arrow buffer; check its sha256 unless this process already did.

    The hash covers exactly the bytes that are parsed next, so a truncated or altered shard can
    never be decoded silently. Success is cached per (path, size, mtime) for this process, so
    later epochs pay only the read. hashlib reads the buffer in place (no bytes copy).
    `filesystem` (a pyarrow FileSystem) reads from object stores; None is the local disk.
    """
    try:
        if filesystem is not None:
            key, data = _read_remote(path, filesystem)
        else:
            key = _verified_key(path)
            with pa.OSFile(str(path)) as handle:
                data = handle.read_buffer()
    except FileNotFoundError:
        raise ShardSetError(
            f"shard-set file {path} is missing; {rebuild_hint(shard_dir)}"
        ) from None
    with _VERIFIED_LOCK:
        if _VERIFIED.get(key) == sha256:
            return data
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ShardSetError(
            f"shard-set file {path} is corrupt or truncated ({data.size} bytes, sha256 "
            f"{actual[:16]}... but the manifest says {sha256[:16]}...); {rebuild_hint(shard_dir)}"
        )
    with _VERIFIED_LOCK:
        _VERIFIED[key] = sha256
    return data


def _read_parquet(
    path: Path, sha256: str, shard_dir: Path, filesystem: pafs.FileSystem | None = None
) -> pa.Table:
    """Read a parquet file of the shard set, verifying its checksum once per process."""
    data = read_verified(path, sha256, shard_dir, filesystem)
    try:
        return pq.read_table(data)
    except (pa.ArrowInvalid, OSError) as err:
        raise ShardSetError(
            f"shard-set file {path} cannot be read ({err}); {rebuild_hint(shard_dir)}"
        ) from None


def resolve_location(
    shard_dir: str | Path, filesystem: pafs.FileSystem | None = None
) -> tuple[Path, pafs.FileSystem | None]:
    """(path, filesystem) of a shard set: a URL gets pyarrow's filesystem (file://, s3://, gs://,
    hdfs://) or, for other fsspec schemes (memory://, ...), fsspec's wrapped for pyarrow; a plain
    path with no `filesystem` is the local disk."""
    text = str(shard_dir)
    if filesystem is None and isinstance(shard_dir, str) and "://" in text:
        try:
            filesystem, text = arrow_filesystem(text)
        except ValueError as err:
            raise ShardSetError(f"{err}; pass ShardSetInfo.open(path, filesystem=...)") from None
        if isinstance(filesystem, pafs.LocalFileSystem):
            filesystem = None
    return Path(text), filesystem


def read_manifest(
    shard_dir: str | Path, filesystem: pafs.FileSystem | None = None
) -> dict[str, Any]:
    """Read and sanity-check a shard set's manifest (its presence is what marks completeness)."""
    shard_dir, filesystem = resolve_location(shard_dir, filesystem)
    path = shard_dir / MANIFEST_NAME
    try:
        raw = _read_text(path, filesystem)
    except FileNotFoundError:
        raise ShardSetError(
            f"{shard_dir} is not a complete shard set (no {MANIFEST_NAME}); "
            f"{rebuild_hint(shard_dir)}"
        ) from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardSetError(
            f"{path} is not valid JSON ({err}); {rebuild_hint(shard_dir)}"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        found = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise ShardSetError(
            f"{path} has schema version {found!r}, this code reads {SCHEMA_VERSION}; "
            f"{rebuild_hint(shard_dir)}"
        )
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ShardSetError(f"{path} lacks keys {missing}; {rebuild_hint(shard_dir)}")
    return manifest


def _read_text(path: Path, filesystem: pafs.FileSystem | None) -> str:
    """A small text file from the local disk or a pyarrow filesystem; FileNotFoundError if none."""
    if filesystem is None:
        if not path.is_file():
            raise FileNotFoundError(str(path))
        return path.read_text()
    if filesystem.get_file_info(str(path)).type != pafs.FileType.File:
        raise FileNotFoundError(str(path))
    with filesystem.open_input_stream(str(path)) as handle:
        return handle.read().decode()


@dataclass(frozen=True)
class ShardInfo:
    """One shard's manifest entry."""

    file: str
    rows: int
    sha256: str
    symbols: tuple[int, ...]
    windows: dict[str, tuple[int, ...]]

    def window_count(self, key: str, min_valid: int) -> int:
        """Emit-able windows of this shard for a window key and minimum history."""
        return int(sum(self.windows[key][min_valid - 1 :]))


@dataclass
class ShardSetInfo:
    """A verified shard set's manifest, side tables and the sizes the network needs."""

    directory: Path
    manifest: dict[str, Any]
    symbols: np.ndarray  # str, row = symbol id
    symbol_industry: np.ndarray  # int64 per symbol id (its latest instrument row's)
    symbol_index: np.ndarray  # int64 per symbol id (its latest instrument row's)
    has_text: np.ndarray  # bool per symbol id (its latest description)
    text: np.ndarray  # float32 [n_text_rows, text_dim], a shard row's `text_row` picks one
    text_flags: np.ndarray  # bool per text row: the row holds a description
    industries: list[str]  # id -> name, 0 = unknown ("")
    indices: list[str]  # id -> name, 0 = none ("")
    shards: list[ShardInfo] = field(default_factory=list)
    filesystem: pafs.FileSystem | None = None  # None: the local disk

    @classmethod
    def open(cls, shard_dir: str | Path, filesystem: pafs.FileSystem | None = None) -> ShardSetInfo:
        """Read the manifest and the (checksummed) side tables of a shard set.

        `shard_dir` may be a path or any fsspec URL (pyarrow's own filesystem where it has one,
        else fsspec's wrapped for pyarrow: alphaloom.filesystems.arrow_filesystem); or pass its path
        and a pyarrow `filesystem`.
        """
        shard_dir, filesystem = resolve_location(shard_dir, filesystem)
        manifest = read_manifest(shard_dir, filesystem)
        side = manifest["side_tables"]
        fs = filesystem
        symbols = _read_parquet(shard_dir / SYMBOLS_NAME, side[SYMBOLS_NAME], shard_dir, fs)
        names = _read_parquet(shard_dir / NAMES_NAME, side[NAMES_NAME], shard_dir, fs)
        text_bytes = read_verified(shard_dir / TEXT_NAME, side[TEXT_NAME], shard_dir, fs)
        text = np.load(io.BytesIO(text_bytes.to_pybytes()), allow_pickle=False)
        texts = _read_parquet(shard_dir / TEXTS_NAME, side[TEXTS_NAME], shard_dir, fs)
        shards = [
            ShardInfo(
                file=entry["file"],
                rows=int(entry["rows"]),
                sha256=entry["sha256"],
                symbols=tuple(entry["symbols"]),
                windows={key: tuple(entry["windows"][key]) for key in WINDOW_KEYS},
            )
            for entry in manifest["shards"]
        ]
        kinds = names.column("kind").to_pylist()
        name_list = names.column("name").to_pylist()
        return cls(
            directory=shard_dir,
            manifest=manifest,
            symbols=np.asarray(symbols.column("symbol").to_pylist(), dtype=object),
            symbol_industry=symbols.column("industry").to_numpy().astype(np.int64),
            symbol_index=symbols.column("index").to_numpy().astype(np.int64),
            has_text=symbols.column("has_text").to_numpy(zero_copy_only=False).astype(bool),
            text=np.ascontiguousarray(text, dtype=np.float32),
            text_flags=texts.column("has_text").to_numpy(zero_copy_only=False).astype(bool),
            industries=[n for k, n in zip(kinds, name_list, strict=True) if k == "industry"],
            indices=[n for k, n in zip(kinds, name_list, strict=True) if k == "index"],
            shards=shards,
            filesystem=filesystem,
        )

    @property
    def n_features(self) -> int:
        return int(self.manifest["n_features"])

    @property
    def window(self) -> int:
        return int(self.manifest["window"])

    @property
    def text_dim(self) -> int:
        return int(self.manifest["text_dim"])

    @property
    def n_industries(self) -> int:
        return int(self.manifest["n_industries"])

    @property
    def n_indices(self) -> int:
        return int(self.manifest["n_indices"])

    @property
    def n_symbols(self) -> int:
        return int(self.manifest["n_symbols"])

    @property
    def feature_names(self) -> list[str]:
        return list(self.manifest["feature_names"])

    @property
    def last_date(self) -> np.datetime64:
        return np.datetime64(self.manifest["last_date"], "D")

    def sizes(self) -> dict[str, int]:
        """What the network is built from: n_features, text_dim, n_industries, n_indices, window."""
        return {
            "n_features": self.n_features,
            "text_dim": self.text_dim,
            "n_industries": self.n_industries,
            "n_indices": self.n_indices,
            "window": self.window,
        }

    def text_of(self, text_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Description vectors [B, D] and has-text flags [B] of shard rows' `text_row`s (-1, a
        date no instrument row covers, gives zeros and False)."""
        rows = np.asarray(text_rows, dtype=np.int64)
        known = rows >= 0
        safe = np.where(known, rows, 0)
        vectors = self.text[safe]
        if not known.all():
            vectors[~known] = 0.0
        return vectors, self.text_flags[safe] & known

    def label_coverage(self, split: str) -> dict[str, int]:
        """Bars of a split and how many of them have no forward return although the calendar
        has its days (the symbol had no bar on the entry or exit day), from the manifest."""
        coverage = self.manifest.get("label_coverage", {}).get(split, {})
        return {key: int(value) for key, value in coverage.items()}

    def symbol_names(self, ids: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
        """Symbol ids (a batch's `symbol`) -> symbol names."""
        if isinstance(ids, torch.Tensor):
            ids = ids.cpu().numpy()
        return self.symbols[np.asarray(ids, dtype=np.int64)]

    def window_count(
        self, split: str | int | None, min_valid: int, shards: Iterable[int] | None = None
    ) -> int:
        """Emit-able windows of a split (None: every window, labelled or not) in some shards."""
        key = window_key(split)
        chosen = range(len(self.shards)) if shards is None else shards
        return sum(self.shards[s].window_count(key, min_valid) for s in chosen)

    def read_shard(self, shard: int) -> ShardArrays:
        """Read one shard (checksum verified once per process) as numpy arrays."""
        meta = self.shards[shard]
        path = self.directory / meta.file
        table = _read_parquet(path, meta.sha256, self.directory, self.filesystem)
        if table.num_rows != meta.rows or table.column_names != list(SHARD_COLUMNS):
            raise ShardSetError(
                f"shard {path} has {table.num_rows} rows and columns {table.column_names}, the "
                f"manifest expects {meta.rows} rows of {list(SHARD_COLUMNS)}; "
                f"{rebuild_hint(self.directory)}"
            )
        x_type = table.schema.field("x").type
        if x_type != pa.binary(4 * self.n_features) or sys.byteorder != "little":
            raise ShardSetError(
                f"shard {path}: column x is {x_type}, expected {X_LAYOUT} with "
                f"n_features={self.n_features} on a little-endian machine"
            )
        return ShardArrays(
            **{name: table.column(name).to_numpy() for name in SHARD_COLUMNS if name != "x"},
            x=decode_x(table.column("x"), self.n_features),
        )


def window_key(split: str | int | None) -> str:
    if split is None:
        return ALL_KEY
    if isinstance(split, str) and split in SPLIT_CODES:
        return split
    for name, code in SPLIT_CODES.items():
        if split == code:
            return name
    raise ValueError(f"split must be one of {list(SPLIT_CODES)} or None, got {split!r}")
