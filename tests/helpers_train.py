"""A tiny real shard set (synthetic market -> features -> shards) for the training-side tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from alphaloom.tasks.common.config import PipelineConfig, load_config

REPO = Path(__file__).resolve().parent.parent

TINY_OVERRIDES = [
    "data.synthetic.n_symbols=60",
    "data.synthetic.n_days=400",
    "shards.n_shards=4",
    "loader.batch_size=128",
    "model.use_text=false",
    "train.device=cpu",
    "train.num_threads=1",  # a shared 2-core box: more threads only spin
    "train.epochs=3",
    "train.patience=3",
    "train.max_batches_per_epoch=12",
    "train.progress_every_batches=1",
]


@dataclass
class TinyData:
    shard_dir: Path
    cfg: PipelineConfig
    oracle: pd.DataFrame


def tiny_config(*extra: str) -> PipelineConfig:
    """configs/smoke.yaml shrunk further, plus `extra` overrides."""
    return load_config(REPO / "configs" / "smoke.yaml", [*TINY_OVERRIDES, *extra])


def build_tiny_shards(root: Path, *extra: str) -> TinyData:
    """Generate the market, its features and a 4-shard set under `root` (about a second)."""
    from alphaloom.tasks.data.features import build_feature_table
    from alphaloom.tasks.data.synthetic import generate_market
    from alphaloom.tasks.dataset.shards import build_shards_from

    cfg = tiny_config(*extra)
    market = generate_market(cfg.data.synthetic)
    table = build_feature_table(market.bars, cfg.features)
    shard_dir = build_shards_from(table, market.instruments, None, cfg.shards, root, "tiny")
    return TinyData(Path(shard_dir), cfg, market.oracle)
