"""Date-grouped batches (for the per-day ranking loss) vs the pooled loader's flat shuffle.

Why: `group_by_date` reorders each pool's windows day by day before cutting batches, so a batch
holds whole days. The honest baseline is the same loader without it (same shard set, pools,
batch size, prefetching): the reordering costs one extra sort per pool, and gathering a day's
rows touches other panel rows than a uniform permutation does. Both run in fresh processes,
interleaved and repeated (the cores are shared); each times epoch 1 of the steady state (shards
verified and pool buffers allocated untimed, as in benchmarks/loader.py). The batches are also
checked: grouped ones hold far fewer distinct days.

    .venv/bin/python benchmarks/grouped_loader.py     # the default market's size: 300 x 1500, F=158

Last line: ratio=<grouped / flat samples per second> (1.00 = no cost).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loader import peak_rss_mb, write_synthetic_set

from alphaloom.model.dataset import ShardedWindowDataset


def run(shard_dir: Path, args: argparse.Namespace, grouped: bool) -> dict:
    dataset = ShardedWindowDataset(
        shard_dir,
        "train",
        batch_size=args.batch_size,
        pool_shards=args.pool_shards,
        min_valid_days=args.min_valid,
        seed=1,
        group_by_date=grouped,
    )
    for shard in range(len(dataset.info.shards)):
        dataset.info.read_shard(shard)
    for done, _ in enumerate(dataset, start=1):
        if done == args.warmup:
            break
    dataset.set_epoch(1)
    samples, days, start = 0, [], time.perf_counter()
    for done, batch in enumerate(dataset, start=1):
        samples += len(batch["x"])
        days.append(len(set(batch["date"].tolist())))
        if done == args.batches:
            break
    seconds = time.perf_counter() - start
    return {
        "samples": samples,
        "seconds": seconds,
        "days_per_batch": statistics.mean(days),
        "peak_rss_mb": peak_rss_mb(),
    }


def measure(kind: str, shard_dir: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--shard-dir", str(shard_dir)]
    for key in ("batch_size", "pool_shards", "min_valid", "batches", "warmup"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=300)
    parser.add_argument("--days", type=int, default=1500)
    parser.add_argument("--features", type=int, default=158)
    parser.add_argument("--window", type=int, default=30)
    parser.add_argument("--shard-mb", type=float, default=64.0)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--pool-shards", type=int, default=4)
    parser.add_argument("--min-valid", type=int, default=20)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["flat", "grouped"])
    parser.add_argument("--shard-dir")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(run(Path(args.shard_dir), args, args.child == "grouped")))
        return
    root = Path(tempfile.mkdtemp(prefix="alphaloom-grouped-bench-"))
    try:
        shard_dir = root / "shards"
        write_synthetic_set(
            shard_dir, args.symbols, args.days, args.features, args.window, args.shard_mb
        )
        results: dict[str, list[dict]] = {"flat": [], "grouped": []}
        for _ in range(args.repeats):
            for kind in results:
                results[kind].append(measure(kind, shard_dir, args))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rates = {}
    for kind, runs in results.items():
        rates[kind] = statistics.median(r["samples"] / r["seconds"] for r in runs)
        print(
            f"{kind:8s} {rates[kind]:10.0f} samples/s (median of {len(runs)}), "
            f"{statistics.mean(r['days_per_batch'] for r in runs):6.1f} distinct days per batch, "
            f"peak RSS {max(r['peak_rss_mb'] for r in runs):.0f} MiB"
        )
    print(f"ratio={rates['grouped'] / rates['flat']:.2f}")


if __name__ == "__main__":
    main()
