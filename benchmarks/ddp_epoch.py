"""Time per training epoch: 1 process vs 2 DDP processes (gloo, CPU) on the same data.

    # quick (make bench): 40 symbols x 300 days in a temporary directory, removed after
    nice -n 10 .venv/bin/python benchmarks/ddp_epoch.py
    # the size docs/scaling.md reports (80 x 500, 8 shards), kept in --out:
    nice -n 10 .venv/bin/python benchmarks/ddp_epoch.py --symbols 80 --days 500 --shards 8 \
        --out /tmp/ddp-bench
    nice -n 10 .venv/bin/python benchmarks/ddp_epoch.py --out /tmp/ddp-bench --set train.epochs=3

Every run trains the full epoch (all training windows once; under DDP each rank takes half of
them, so a step processes 2 x batch_size windows) and reports the training seconds of its last
epoch (the first one pays one-off costs). Runs, each in fresh processes:

* 1 process, 2 torch threads (both cores; oversubscribed when the box is busy),
* 1 process, 1 thread,
* 2 DDP processes x 1 thread (gloo on 127.0.0.1).

The last line is the speed-up of 2 processes over the faster single process. On a 2-core machine
the two ranks compete for the same cores that one process can already use with 2 threads, so
expect little or no gain here; DDP pays off with a core set (or GPU) per rank.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from train_epoch import build as build_synthetic

from alphaloom.tasks.common.config import PipelineConfig, load_config
from alphaloom.tasks.training.distributed import process_group, spawn_local

DATA = [
    "model.use_text=false",
    "train.device=cpu",
    "train.epochs=2",
    "train.patience=5",
]


def build(out: Path, overrides: list[str]) -> Path:
    """Synthetic market -> features -> shards (no text: the model runs without it)."""
    return build_synthetic(out, [*DATA, *overrides])[0]


def worker(rank: int, shard_dir: str, out: str, overrides: list[str]) -> None:
    """One rank: train, then rank 0 writes its per-epoch history."""
    from alphaloom.tasks.training.train import train_model

    cfg: PipelineConfig = load_config(None, [*DATA, *overrides])
    with process_group(cfg, "gloo") as ctx:
        result = train_model(shard_dir, cfg, Path(out) / "ckpt")
        if ctx.rank == 0:
            (Path(out) / "history.json").write_text(json.dumps(result.history))


def run(shard_dir: Path, out: Path, nprocs: int, threads: int, overrides: list[str]) -> float:
    """Training seconds of the last epoch for one setting (fresh processes, fresh checkpoint)."""
    shutil.rmtree(out, ignore_errors=True)  # a finished checkpoint would skip training
    out.mkdir(parents=True)
    settings = [*overrides, f"train.num_threads={threads}"]
    started = time.perf_counter()
    spawn_local(worker, nprocs, (str(shard_dir), str(out), settings))
    history = json.loads((out / "history.json").read_text())
    seconds = history[-1]["train_seconds"]
    print(
        f"{nprocs} process(es) x {threads} thread(s): last epoch {seconds:.1f}s train "
        f"(epochs {[round(h['train_seconds'], 1) for h in history]}), "
        f"valid Rank IC {history[-1]['valid/rank_ic']:.4f}, "
        f"wall {time.perf_counter() - started:.0f}s",
        flush=True,
    )
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, help="work directory (reused; default: a temporary one, removed after)"
    )
    parser.add_argument("--symbols", type=int, default=40, help="synthetic market size")
    parser.add_argument("--days", type=int, default=300)
    parser.add_argument("--shards", type=int, default=4, help="shards of the set")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.overrides = [
        f"data.synthetic.n_symbols={args.symbols}",
        f"data.synthetic.n_days={args.days}",
        f"shards.n_shards={args.shards}",
        *args.overrides,
    ]
    if args.out is not None:
        compare(args)
        return
    args.out = Path(tempfile.mkdtemp(prefix="alphaloom-bench-ddp-"))
    try:
        compare(args)
    finally:
        shutil.rmtree(args.out, ignore_errors=True)


def compare(args: argparse.Namespace) -> None:
    """The three settings on one shard set; the speed-up on the last line."""
    shard_dir = build(args.out, args.overrides)
    single = min(
        run(shard_dir, args.out / "p1t2", 1, 2, args.overrides),
        run(shard_dir, args.out / "p1t1", 1, 1, args.overrides),
    )
    two = run(shard_dir, args.out / "p2t1", 2, 1, args.overrides)
    print(f"epoch speed-up, 2 DDP processes vs the faster single process: {single / two:.2f}x")


if __name__ == "__main__":
    main()
