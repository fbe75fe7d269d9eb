"""What a logged model carries to score raw data on its own: the serving bundle.

A model trained on one shard set must score new bars with *that* set's preprocessing: its
factor list, its train-split normalisation statistics, its window length, its industry and
index vocabularies and the description vectors it was trained with. Re-deriving any of these
from a later shard set would silently re-score a champion with statistics it never saw. So
`write_bundle` copies them out of the shard set into three plain files the model logs as
artifacts (JSON, parquet, npy: nothing is pickled), and `load_bundle` reads them back in the
serving process without the shard set:

* `preprocess.json`: feature names, window, min_valid_days, history_bars, normalisation stats,
  vocabularies, label settings, the text model's name and identity, what it was trained on;
* `symbols.parquet`: one row per known symbol: its industry and index ids and has_text;
* `text_vectors.npy`: float32 [n_symbols, text_dim], row = the row of `symbols.parquet`.

A symbol the bundle does not know gets its industry / index from the request (id 0 when the
name is not in the vocabulary, as in training) and its text vector by embedding the request's
description with the recorded text model, if that model loads in the serving process and is the
same one (same weights fingerprint); otherwise the symbol is scored as one without a
description (zero vector, has_text 0) and a warning says so.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alphaloom.tasks.common.config import PipelineConfig

log = logging.getLogger(__name__)

BUNDLE_VERSION = 1
PREPROCESS_FILE = "preprocess.json"
SYMBOLS_FILE = "symbols.parquet"
TEXT_FILE = "text_vectors.npy"
BUNDLE_FILES = {"preprocess": PREPROCESS_FILE, "symbols": SYMBOLS_FILE, "text": TEXT_FILE}
_REQUIRED_KEYS = (
    "bundle_version",
    "feature_names",
    "window",
    "min_valid_days",
    "history_bars",
    "stats",
    "industries",
    "indices",
    "text",
)


class BundleError(ValueError):
    """A serving bundle is incomplete or inconsistent; the message names the file and key."""


@dataclass(frozen=True)
class SymbolInputs:
    """Per-symbol network inputs of one request, row i = the request's i-th symbol."""

    industry: np.ndarray  # int64
    index: np.ndarray  # int64
    text: np.ndarray  # float32 [S, text_dim]
    has_text: np.ndarray  # bool


@dataclass(frozen=True)
class ServingBundle:
    """The preprocessing of one trained model (see the module docstring)."""

    meta: dict[str, Any]
    symbols: pd.DataFrame  # symbol, industry, index (ids), has_text
    text: np.ndarray  # float32 [n_symbols, text_dim]

    @property
    def feature_names(self) -> list[str]:
        return list(self.meta["feature_names"])

    @property
    def window(self) -> int:
        return int(self.meta["window"])

    @property
    def min_valid_days(self) -> int:
        return int(self.meta["min_valid_days"])

    @property
    def history_bars(self) -> int:
        """Bars per symbol that make every factor of a scored window exact."""
        return int(self.meta["history_bars"])

    @property
    def stats(self) -> dict[str, Any]:
        return self.meta["stats"]

    def vocabulary_ids(self, kind: str, names: pd.Series) -> np.ndarray:
        """Ids of industry / index names ("" or unknown -> 0, as the shard writer does)."""
        vocabulary = self.meta["industries" if kind == "industry" else "indices"]
        lookup = {name: i for i, name in enumerate(vocabulary) if name}
        return names.map(lambda value: lookup.get(value, 0)).to_numpy(np.int64)

    def symbol_inputs(
        self, symbols: list[str], instruments: pd.DataFrame, use_text: bool
    ) -> SymbolInputs:
        """Industry / index ids and text vectors of the request's symbols.

        `instruments` has one row per symbol (in `symbols`' order) with industry, index and
        description as strings ("" = not sent). A field sent wins over the bundle's; a known
        symbol keeps the description vector it was trained with; an unknown one with a
        description is embedded when `use_text` (see the module docstring).
        """
        known = self.symbols.set_index("symbol")
        rows = known.index.get_indexer(symbols)
        found = rows >= 0
        ids = {}
        for kind in ("industry", "index"):
            sent = instruments[kind].to_numpy(dtype=object) != ""
            from_bundle = np.zeros(len(symbols), np.int64)
            from_bundle[found] = known[kind].to_numpy(np.int64)[rows[found]]
            ids[kind] = np.where(sent, self.vocabulary_ids(kind, instruments[kind]), from_bundle)
        text = np.zeros((len(symbols), self.text.shape[1]), np.float32)
        has_text = np.zeros(len(symbols), bool)
        text[found] = self.text[rows[found]]
        has_text[found] = known["has_text"].to_numpy(bool)[rows[found]]
        new = ~found & (instruments["description"].to_numpy(dtype=object) != "")
        if use_text and new.any():
            vectors, flags = self.embed(
                [s for s, n in zip(symbols, new, strict=True) if n],
                instruments["description"][new].tolist(),
            )
            text[new], has_text[new] = vectors, flags
        return SymbolInputs(ids["industry"], ids["index"], text, has_text)

    def embed(self, symbols: list[str], descriptions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of new symbols' descriptions by the bundle's text model, or zeros (and a
        warning) when that model is not available here or is not the one trained with."""
        zeros = np.zeros((len(symbols), self.text.shape[1]), np.float32)
        none = np.zeros(len(symbols), bool)
        spec = self.meta["text"]
        fallback = f"{len(symbols)} new symbol(s) are scored without text"
        if not spec.get("model") or not spec.get("identity"):
            log.warning("the model was trained without a text model: %s", fallback)
            return zeros, none
        try:
            from alphaloom.tasks.common.config import TextSection
            from alphaloom.tasks.dataset.text import embed_descriptions

            frame = pd.DataFrame({"symbol": symbols, "description": descriptions})
            with tempfile.TemporaryDirectory(prefix="alphaloom-text-") as cache:
                vectors = embed_descriptions(frame, TextSection(model=spec["model"]), cache)
        except Exception as err:  # the text model is an optional part of a serving env
            why = f"{type(err).__name__}: {err}"
            log.warning("text model %s is not usable here (%s): %s", spec["model"], why, fallback)
            return zeros, none
        if vectors.model != spec["identity"] or vectors.dim != self.text.shape[1]:
            log.warning(
                "text model here is %s, the model was trained with %s: %s",
                vectors.model, spec["identity"], fallback,
            )  # fmt: skip
            return zeros, none
        return vectors.vectors, vectors.has_text


def history_bars(feature_names: list[str], window: int) -> int:
    """Bars a symbol needs before a scored date for every factor of its window to be exact:
    the window plus the longest factor window (a factor at t reads bars t - w .. t)."""
    from alphaloom.tasks.data.factor_names import parse_name

    longest = max([0, *(parse_name(name)[1] or 0 for name in feature_names)])
    return window + longest


def _text_spec(cfg: PipelineConfig, text_dim: int) -> dict[str, Any]:
    """The text model's name and weights identity (None when text was off or it is absent)."""
    if not cfg.text.enabled or text_dim == 0:
        return {"model": None, "identity": None, "dim": text_dim}
    from alphaloom.tasks.dataset.text import TextModelError, resolve_model

    try:
        identity = resolve_model(cfg.text.model).identity
    except TextModelError as err:
        log.warning("text model %s not resolvable while logging (%s)", cfg.text.model, err)
        identity = None
    return {"model": cfg.text.model, "identity": identity, "dim": text_dim}


def write_bundle(shard_dir: str | Path, cfg: PipelineConfig, out_dir: Path) -> dict[str, str]:
    """Copy a shard set's preprocessing into `out_dir`; return {artifact name: file path}."""
    from alphaloom.model.shard_set import ShardSetInfo

    info = ShardSetInfo.open(shard_dir)
    names = info.feature_names
    meta = {
        "bundle_version": BUNDLE_VERSION,
        "feature_names": names,
        "window": info.window,
        "min_valid_days": cfg.loader.min_valid_days,
        "history_bars": history_bars(names, info.window),
        "stats": info.manifest["stats"],
        "industries": list(info.industries),
        "indices": list(info.indices),
        "label": cfg.features.label.model_dump(mode="json"),
        "text": _text_spec(cfg, info.text_dim),
        "trained_on": {
            "shard_key": info.manifest.get("key"),
            "source_hash": info.manifest.get("source_hash"),
            "last_date": info.manifest["last_date"],
            "splits": info.manifest["splits"],
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PREPROCESS_FILE).write_text(json.dumps(meta, indent=1, allow_nan=False))
    symbols = pd.DataFrame(
        {
            "symbol": [str(s) for s in info.symbols],
            "industry": info.symbol_industry.astype(np.int32),
            "index": info.symbol_index.astype(np.int32),
            "has_text": info.has_text.astype(bool),
        }
    )
    symbols.to_parquet(out_dir / SYMBOLS_FILE, index=False)
    np.save(out_dir / TEXT_FILE, np.ascontiguousarray(info.text, np.float32), allow_pickle=False)
    return {name: str(out_dir / file) for name, file in BUNDLE_FILES.items()}


def load_bundle(paths: Mapping[str, str]) -> ServingBundle:
    """Read the bundle from its artifact paths ({"preprocess": ..., "symbols": ..., "text": ...},
    e.g. a pyfunc context's `artifacts`), checking that its parts fit together."""
    missing = [name for name in BUNDLE_FILES if name not in paths]
    if missing:
        raise BundleError(f"serving bundle lacks artifact(s) {missing}; got {sorted(paths)}")
    source = paths["preprocess"]
    meta = json.loads(Path(source).read_text())
    problems = [f"{source}: missing key {key!r}" for key in _REQUIRED_KEYS if key not in meta]
    if not problems and meta["bundle_version"] != BUNDLE_VERSION:
        problems.append(f"{source}: bundle_version {meta['bundle_version']} != {BUNDLE_VERSION}")
    if not problems:
        lacking = [n for n in meta["feature_names"] if n not in meta["stats"].get("median", {})]
        if lacking:
            problems.append(f"{source}: stats have no entry for feature(s) {lacking[:5]}")
    symbols = pd.read_parquet(paths["symbols"])
    absent = [c for c in ("symbol", "industry", "index", "has_text") if c not in symbols]
    if absent:
        problems.append(f"{paths['symbols']}: missing column(s) {absent}")
    text = np.load(paths["text"], allow_pickle=False)
    if text.ndim != 2 or len(text) != len(symbols):
        problems.append(
            f"{paths['text']}: shape {text.shape} does not match {len(symbols)} symbols"
        )
    if problems:
        raise BundleError("; ".join(problems))
    return ServingBundle(meta, symbols, np.ascontiguousarray(text, np.float32))
