"""Sharded pooled loader vs. an in-memory panel: samples/s and peak RSS, then 4x the data.

Why: the loader exists so memory is bounded by the pool, not the data set. This script shows
(1) its throughput against the honest baseline, a process that holds the whole panel as one
numpy array and gathers batches of uniformly permuted windows with the same index arithmetic
(model.panels.gather_batch), and (2) that its peak RSS does not grow when the data grows 4x.

Each run is a fresh process (peak RSS = VmHWM from /proc/self/status) timing the same fixed
number of batches. Runs are interleaved and repeated; medians are reported, since the cores
are shared. Three kinds of run:

* baseline: loads (and checksums) every shard into one panel untimed, then times gathering.
* loader: the steady state of training. Untimed, like the baseline's load: checksum every
  shard once and run a few batches of epoch 0 (so its two pool buffers exist); then time
  epoch 1, which includes reading, decoding, compacting and prefetching every pool it uses.
* loader-cold: a fresh process timing epoch 0 from its first batch: first-time checksums,
  the first (un-prefetched) pool and first-touch page faults of its buffers included.

Shards are written under /tmp (page cache warm for every run) and deleted afterwards.

    .venv/bin/python benchmarks/loader.py   # quick (make bench): ~127k windows, 8 MB shards
    # the full size (~1.03M windows, T=60, F=158, 64 MB shards, then 4x; 3 GiB of /tmp, minutes):
    .venv/bin/python benchmarks/loader.py --symbols 520 --days 2000 --shard-mb 64 --batches 1500 \
        --reps 3

The quick default keeps the pool (pool shards x shard size) well below the data, as in the
full run, so the RSS growth still shows whether memory follows the pool or the data.

Last line: ratio=<loader / baseline samples/s> rss_growth=<loader peak RSS at 4x / at 1x>
(steady-state loader; the cold ratio is printed on the line before).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from alphaloom.model.dataset import ShardedWindowDataset
from alphaloom.model.panels import gather_batch, load_panel
from alphaloom.model.shard_format import Selection, ShardArrays
from alphaloom.model.shard_set import ShardSetInfo

START_DAY = int(np.datetime64("2010-01-04", "D").astype(np.int64))


def write_synthetic_set(
    out: Path, n_symbols: int, n_days: int, n_features: int, window: int, shard_mb: float
) -> None:
    """Stream a synthetic shard set shard by shard (the whole table never exists in memory)."""
    # Imported here so the measured child processes load model/ only (no Prefect, no pandas).
    import pandas as pd

    from alphaloom.tasks.common.config import ShardsSection
    from alphaloom.tasks.dataset.row_layout import InstrumentLayout
    from alphaloom.tasks.dataset.shard_writer import (
        ManifestInfo,
        plan_shards,
        write_manifest,
        write_shard,
        write_side_tables,
    )

    out.mkdir(parents=True)
    cfg = ShardsSection(window=window, target_shard_mb=shard_mb)
    rng = np.random.default_rng(0)
    rows_per_symbol = np.full(n_symbols, n_days)
    entries = []
    for number, ids in enumerate(plan_shards(rows_per_symbol, n_features, cfg)):
        rows = len(ids) * n_days
        arrays = ShardArrays(
            symbol=np.repeat(np.asarray(ids, np.int32), n_days),
            date=np.tile(START_DAY + np.arange(n_days, dtype=np.int32), len(ids)),
            split=np.zeros(rows, np.int8),
            label=rng.integers(0, 4, rows).astype(np.int8),
            fwd_return=rng.normal(0.0, 0.02, rows).astype(np.float32),
            industry=np.ones(rows, np.int32),
            index=np.zeros(rows, np.int32),
            text_row=np.repeat(np.asarray(ids, np.int32), n_days),
            bar=np.ones(rows, np.int8),
            x=rng.random((rows, n_features), dtype=np.float32),
        )
        entries.append(write_shard(out / f"shard-{number:05d}.parquet", arrays, window))
    symbols = np.asarray([f"S{i:05d}" for i in range(n_symbols)], dtype=object)
    layout = InstrumentLayout.build(
        pd.DataFrame({"symbol": symbols, "industry": "all", "index": ""}), symbols
    )
    side = write_side_tables(
        out, symbols, layout, np.zeros((n_symbols, 16), np.float32), np.zeros(n_symbols, bool)
    )
    info = ManifestInfo(
        key=out.name,
        cfg=cfg,
        feature_names=[f"f{j}" for j in range(n_features)],
        split_dates={},
        stats={},
        source_hash="synthetic-benchmark",
        label_coverage={},
    )
    write_manifest(out, info, entries, side)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _loader(shard_dir: Path, args: argparse.Namespace) -> ShardedWindowDataset:
    return ShardedWindowDataset(
        shard_dir,
        "train",
        batch_size=args.batch_size,
        pool_shards=args.pool_shards,
        min_valid_days=args.min_valid,
        seed=1,
    )


def _time_batches(batches: Iterator[dict], count: int) -> tuple[int, float]:
    samples, start = 0, time.perf_counter()
    for done, batch in enumerate(batches, start=1):
        samples += len(batch["x"])
        if done == count:
            break
    return samples, time.perf_counter() - start


def run_loader(shard_dir: Path, args: argparse.Namespace) -> dict:
    """Steady state: shards verified and pool buffers allocated (untimed), then time epoch 1."""
    dataset = _loader(shard_dir, args)
    for shard in range(len(dataset.info.shards)):
        dataset.info.read_shard(shard)
    for done, _ in enumerate(dataset, start=1):
        if done == args.warmup:
            break
    dataset.set_epoch(1)
    samples, seconds = _time_batches(iter(dataset), args.batches)
    return {"samples": samples, "seconds": seconds}


def run_loader_cold(shard_dir: Path, args: argparse.Namespace) -> dict:
    """A fresh process's first epoch from its first batch: everything first-time included."""
    dataset = _loader(shard_dir, args)
    samples, seconds = _time_batches(iter(dataset), args.batches)
    return {"samples": samples, "seconds": seconds}


def run_baseline(shard_dir: Path, args: argparse.Namespace) -> dict:
    """Hold the whole panel in memory; time gathering uniformly permuted batches from it."""
    info = ShardSetInfo.open(shard_dir)
    panel = load_panel(info, range(len(info.shards)), Selection(0, args.min_valid))
    order = np.random.default_rng(1).permutation(len(panel))
    windows = panel.windows()
    size = args.batch_size
    batches = (
        gather_batch(panel, windows, order[b * size : (b + 1) * size], info)
        for b in range(math.ceil(len(panel) / size))
    )
    samples, seconds = _time_batches(batches, args.batches)
    return {"samples": samples, "seconds": seconds}


RUNNERS = {"baseline": run_baseline, "loader": run_loader, "loader-cold": run_loader_cold}


def child(args: argparse.Namespace) -> None:
    result = RUNNERS[args.child](Path(args.shard_dir), args)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def measure(kind: str, shard_dir: Path, args: argparse.Namespace) -> dict:
    """Run one kind in a fresh process so its peak RSS is its own."""
    options = ["--batches", "--batch-size", "--pool-shards", "--min-valid", "--warmup"]
    command = [sys.executable, __file__, "--child", kind, "--shard-dir", str(shard_dir)]
    for option in options:
        command += [option, str(getattr(args, option[2:].replace("-", "_")))]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["samples_per_s"] = result["samples"] / result["seconds"]
    return result


def summarize(kind: str, scale: int, runs: list[dict]) -> dict:
    """Median throughput and max peak RSS over repeated runs, printed on one line."""
    rates = sorted(run["samples_per_s"] for run in runs)
    summary = {
        "samples_per_s": float(np.median(rates)),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
    }
    print(
        f"{kind:11s} x{scale}: {runs[0]['samples']:,d} samples per run, median "
        f"{summary['samples_per_s']:,.0f} samples/s (runs: "
        f"{', '.join(f'{r:,.0f}' for r in rates)}), peak RSS {summary['peak_rss_mb']:,.0f} MiB",
        flush=True,
    )
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=130)
    parser.add_argument("--days", type=int, default=1000)
    parser.add_argument("--features", type=int, default=158)
    parser.add_argument("--window", type=int, default=60)
    parser.add_argument("--min-valid", type=int, default=20)
    parser.add_argument("--shard-mb", type=float, default=8.0)
    parser.add_argument("--pool-shards", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="untimed loader batches")
    parser.add_argument("--reps", type=int, default=2, help="interleaved runs per kind")
    parser.add_argument("--child", choices=sorted(RUNNERS))
    parser.add_argument("--shard-dir")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.child:
        child(args)
        return
    work = Path(tempfile.mkdtemp(prefix="alphaloom-bench-loader-", dir="/tmp"))
    results = {}
    try:
        for scale, kinds in (
            (1, ("baseline", "loader", "loader-cold")),
            (4, ("baseline", "loader")),
        ):
            shard_dir = work / f"x{scale}"
            start = time.perf_counter()
            write_synthetic_set(
                shard_dir,
                args.symbols * scale,
                args.days,
                args.features,
                args.window,
                args.shard_mb,
            )
            os.sync()  # no write-back of the fresh shards during the timed runs
            size = sum(p.stat().st_size for p in shard_dir.iterdir()) / 2**20
            windows = ShardSetInfo.open(shard_dir).window_count("train", args.min_valid)
            print(
                f"x{scale}: {windows:,d} windows, {size:,.0f} MiB of shards written in "
                f"{time.perf_counter() - start:.1f}s",
                flush=True,
            )
            runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
            for _ in range(args.reps):
                for kind in kinds:
                    runs[kind].append(measure(kind, shard_dir, args))
            for kind in kinds:
                results[f"{kind}{scale}"] = summarize(kind, scale, runs[kind])
            shutil.rmtree(shard_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results["baseline1"]["samples_per_s"]
    cold = results["loader-cold1"]["samples_per_s"] / base
    ratio = results["loader1"]["samples_per_s"] / base
    growth = results["loader4"]["peak_rss_mb"] / results["loader1"]["peak_rss_mb"]
    base_growth = results["baseline4"]["peak_rss_mb"] / results["baseline1"]["peak_rss_mb"]
    ratio4 = results["loader4"]["samples_per_s"] / results["baseline4"]["samples_per_s"]
    print(f"at 4x: loader / baseline samples/s {ratio4:.2f}, baseline RSS growth {base_growth:.2f}")
    print(f"cold_ratio={cold:.2f} (first epoch of a fresh process / baseline)")
    print(f"ratio={ratio:.2f} rss_growth={growth:.2f}")


if __name__ == "__main__":
    main()
