"""A backtest period's data work: the whole features stage rebuilt (before) vs shared factors.

Before, every walk-forward period ran the features stage from the bars: all Alpha158 factors,
then labels, splits and the train-only normalisation. Now the raw factors are computed once per
market (`raw_factors/<key>`, keyed without the splits) and each period only assembles its
feature table from them (tasks/dataset/chain.py `market_factors`, `period_shards`). Both paths
write the same table under the same key (checked here on the first period). Prints the seconds
per period of each path and, last, the ratio of the new per-period cost (the one-time factors
spread over the periods included) to the old one.

    .venv/bin/python benchmarks/backtest_data.py                 # synthetic 100 x 1500 (default)
    .venv/bin/python benchmarks/backtest_data.py --data sp500-dev  # the real bars
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from alphaloom.tasks.backtest.periods import period_config, plan_periods, trading_calendar
from alphaloom.tasks.common.config import load_config
from alphaloom.tasks.data.features import features_location, run_features_stage
from alphaloom.tasks.data.ingest import ingest_task, load_saved_bars
from alphaloom.tasks.data.partitions import assemble_features, partitions_of_bars, run_raw_factors

REPO = Path(__file__).resolve().parent.parent
SP500_DEV = REPO.parent / "shared" / "data" / "sp500-dev"
SP500 = ["backtest.retrain_months=6", "backtest.train_months=24", "backtest.valid_months=3"]
SYNTHETIC = [
    "data.synthetic.n_symbols=100",
    "text.enabled=false",
    "backtest.retrain_months=6",
    "backtest.train_months=24",
    "backtest.valid_months=3",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["synthetic", "sp500-dev"], default="synthetic")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.data == "sp500-dev":
        if not SP500_DEV.is_dir():
            sys.exit(f"{SP500_DEV} is absent: nothing to measure on real data")
        config, sets = REPO / "configs" / "sp500-dev.yaml", SP500
    else:
        config, sets = REPO / "configs" / "default.yaml", SYNTHETIC
    with tempfile.TemporaryDirectory(prefix="backtest-data-") as tmp:
        cfg = load_config(config, [*sets, f"work_dir={tmp}/shared"])
        market = ingest_task.reuse_or_build(cfg)
        periods = plan_periods(trading_calendar(market), cfg)
        print(f"{args.data}: {len(periods)} periods")

        before = []
        for period in periods:
            pcfg = period_config(cfg, period).model_copy(update={"work_dir": f"{tmp}/before"})
            started = time.perf_counter()
            run_features_stage(market, pcfg)
            before.append(time.perf_counter() - started)
            print(f"period {period.number}: whole features stage {before[-1]:.1f} s", flush=True)

        started = time.perf_counter()
        bars = load_saved_bars(market.dir)
        partitions = partitions_of_bars(bars, market.path, cfg.runner.partitions)
        raw = [run_raw_factors(partition, cfg) for partition in partitions]
        once = time.perf_counter() - started
        print(f"raw factors once for the market: {once:.1f} s")
        after = []
        for period in periods:
            pcfg = period_config(cfg, period)
            started = time.perf_counter()
            ref = assemble_features(market, raw, pcfg)
            after.append(time.perf_counter() - started)
            print(f"period {period.number}: features from shared factors {after[-1]:.1f} s")
            if period.number == 1:
                old = features_location(market, period_config(cfg, period))
                assert ref.key == old.key, "the same stage key either way"
                rebuilt = pd.read_parquet(
                    Path(tmp) / "before" / "features" / old.key / "features.parquet"
                )
                assembled = pd.read_parquet(Path(ref.path) / "features.parquet")
                pd.testing.assert_frame_equal(rebuilt, assembled)
                print("period 1: the assembled table equals the rebuilt one")
    per_before = sum(before) / len(before)
    per_after = (once + sum(after)) / len(after)
    print(f"per period: {per_before:.1f} s before, {per_after:.1f} s now (factors included)")
    print(f"per-period features time, now / before: {per_after / per_before:.2f}")


if __name__ == "__main__":
    main()
