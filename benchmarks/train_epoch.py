"""Epoch time and test metrics next to the oracle on a synthetic market.

    # no arguments (what `make bench` runs): a small market (100 x 600, no text) built in a
    # temporary directory, 2 epochs on the CPU; a quick check, its ratio is noisy
    .venv/bin/python benchmarks/train_epoch.py
    # build the default shard set (300 x 1500, all Alpha158 factors, MiniLM text) and train:
    .venv/bin/python benchmarks/train_epoch.py --build outputs/bench-train --epochs 2
    # reuse a built shard set, other settings, another device:
    python benchmarks/train_epoch.py --shards DIR --oracle FILE --set train.device=cuda

Prints one line per epoch, the test metrics beside the oracle's, and on its last line the ratio
of the model's test Rank IC to the oracle's (how much of the attainable ranking skill it found).
With --compare-cpu it also times the same number of batches on the CPU and prints that ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from alphaloom.tasks.common.config import load_config
from alphaloom.tasks.evaluation.evaluate import evaluate_predictions
from alphaloom.tasks.evaluation.predictions import predict
from alphaloom.tasks.training.train import train_model

# The no-argument run: a small market, no text (no sentence model to load), the CPU.
QUICK = [
    "data.synthetic.n_symbols=100",
    "data.synthetic.n_days=600",
    "model.use_text=false",
    "train.device=cpu",
]


def build(
    out: Path,
    overrides: list[str],
    text_dir: Path | None = None,
    config: str | Path | None = None,
) -> tuple[Path, Path]:
    """Synthetic market -> features -> text -> shards; returns (shard dir, oracle parquet).

    Text vectors are embedded with the configured sentence model and saved to `out/text`, or
    read from `text_dir` (where the model is not installed, e.g. a bare GPU node); with
    `model.use_text=false` the shard set has none. The other benchmarks build their shard sets
    with this function too.
    """
    from alphaloom.tasks.data.features import build_feature_table
    from alphaloom.tasks.data.synthetic import generate_market
    from alphaloom.tasks.dataset.shards import build_shards_from
    from alphaloom.tasks.dataset.text import (
        embed_descriptions,
        load_text_vectors,
        save_text_vectors,
    )

    cfg = load_config(config, overrides)
    started = time.perf_counter()
    market = generate_market(cfg.data.synthetic)
    table = build_feature_table(market.bars, cfg.features)
    if not cfg.model.use_text:
        text = None
    elif text_dir is None:
        text = embed_descriptions(market.instruments, cfg.text, out / "text-cache")
        save_text_vectors(text, out / "text")
    else:
        text = load_text_vectors(text_dir)
    shard_dir = build_shards_from(table, market.instruments, text, cfg.shards, out, "bench")
    oracle_path = out / "oracle.parquet"
    market.oracle.to_parquet(oracle_path)
    print(f"built {shard_dir} in {time.perf_counter() - started:.1f}s", flush=True)
    return Path(shard_dir), oracle_path


def time_batches(shard_dir: Path, overrides: list[str], device: str, batches: int) -> float:
    """Seconds per training batch over `batches` batches on `device` (one epoch, no resume)."""
    cfg = load_config(
        None,
        [
            *overrides,
            f"train.device={device}",
            "train.epochs=1",
            f"train.max_batches_per_epoch={batches}",
        ],
    )
    with tempfile.TemporaryDirectory() as ckpt:
        result = train_model(shard_dir, cfg, ckpt)
    return result.history[0]["train_seconds"] / batches  # validation excluded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, help="build the default shard set under this dir")
    parser.add_argument(
        "--shards", type=Path, help="an existing shard set (neither: a small one, see QUICK)"
    )
    parser.add_argument("--oracle", type=Path, help="oracle parquet for --shards")
    parser.add_argument("--text-vectors", type=Path, help="saved text vectors for --build")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--compare-cpu", type=int, default=0, metavar="BATCHES")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    work = None
    if args.build:
        shard_dir, oracle_path = build(args.build, args.overrides, args.text_vectors)
    elif args.shards:
        shard_dir, oracle_path = args.shards, args.oracle
    else:
        work = Path(tempfile.mkdtemp(prefix="alphaloom-bench-train-"))
        args.overrides = [*QUICK, *args.overrides]
        shard_dir, oracle_path = build(work, args.overrides)
    try:
        run(args, shard_dir, oracle_path)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, shard_dir: Path, oracle_path: Path | None) -> None:
    overrides = [*args.overrides, f"train.epochs={args.epochs}", f"train.patience={args.epochs}"]
    cfg = load_config(None, overrides)
    print(
        f"device={cfg.train.device} torch={torch.__version__} threads={torch.get_num_threads()}"
        f" cuda={torch.cuda.get_device_name() if torch.cuda.is_available() else None}"
    )
    with tempfile.TemporaryDirectory() as ckpt:
        started = time.perf_counter()
        result = train_model(shard_dir, cfg, ckpt)
        total = time.perf_counter() - started
    for row in result.history:
        print(json.dumps({k: round(v, 5) for k, v in row.items()}))
    print(f"train_model: {total:.1f}s for {len(result.history)} epochs on {result.device}")
    preds = predict(result.model, shard_dir, "test", cfg, device=result.device)
    oracle = pd.read_parquet(oracle_path) if oracle_path else None
    metrics, _ = evaluate_predictions(preds, cfg.evaluate, oracle=oracle, with_figures=False)
    print("test:", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    if args.compare_cpu and result.device != "cpu":
        gpu = time_batches(shard_dir, args.overrides, result.device, args.compare_cpu)
        cpu = time_batches(shard_dir, args.overrides, "cpu", args.compare_cpu)
        print(
            f"seconds/batch: {result.device} {gpu:.4f}, cpu {cpu:.4f} "
            f"({torch.get_num_threads()} threads)"
        )
        print(f"{result.device} speed-up over cpu per training batch: {cpu / gpu:.1f}x")
    print(f"test rank IC / oracle rank IC: {metrics.get('rank_ic_vs_oracle', float('nan')):.3f}")


if __name__ == "__main__":
    main()
