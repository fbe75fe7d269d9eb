"""Which objective should the LightGBM baseline use? Measured on one shard set, same splits.

    # no arguments (what `make bench` runs): a small synthetic market (100 x 600) built in a
    # temporary directory; a quick check, its ratio is noisier than on the default market
    .venv/bin/python benchmarks/lightgbm_objective.py
    # the default synthetic market's shard set, built by benchmarks/train_epoch.py --build:
    .venv/bin/python benchmarks/lightgbm_objective.py --shards outputs/bench-train/<key> \
        --oracle outputs/bench-train/oracle.parquet

Fits the baseline with each objective (regression on the per-day rank-normalised forward
return = Qlib's CSRankNorm label, regression on the raw return, lambdarank per day), scores the
test split with the evaluation code every variant uses, and prints one line per objective. The
last line is the ratio of the chosen default's test Rank IC to the raw-return regression's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
from train_epoch import build

from alphaloom.tasks.common.config import load_config
from alphaloom.tasks.comparison.baselines import LightGBMParams, predict_lightgbm, train_lightgbm
from alphaloom.tasks.evaluation.evaluate import evaluate_predictions

CANDIDATES = {
    "regression/rank": {"objective": "regression", "target": "rank"},
    "regression/return": {"objective": "regression", "target": "return"},
    "lambdarank/class": {"objective": "lambdarank"},
}
# The no-argument run's market: small, no text (the baseline reads the factors only).
QUICK = ["data.synthetic.n_symbols=100", "data.synthetic.n_days=600", "model.use_text=false"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shards", default=None, help="a shard set directory (none: a small synthetic one)"
    )
    parser.add_argument("--oracle", default=None, help="oracle parquet of a synthetic market")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.shards:
        return compare(args)
    work = Path(tempfile.mkdtemp(prefix="alphaloom-bench-lightgbm-"))
    try:
        args.overrides = [*QUICK, *args.overrides]
        shard_dir, oracle = build(work, args.overrides)
        args.shards, args.oracle = str(shard_dir), str(oracle)
        return compare(args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare(args: argparse.Namespace) -> int:
    """Fit and score every candidate objective; print one line each, then the ratio."""
    cfg = load_config(None, args.overrides)
    oracle = pd.read_parquet(args.oracle) if args.oracle else None
    default = LightGBMParams()
    target = default.target if default.objective == "regression" else "class"
    chosen = f"{default.objective}/{target}"
    results: dict[str, float] = {}
    for name, params in CANDIDATES.items():
        fit = train_lightgbm(args.shards, cfg, params, seed=args.seed)
        preds = predict_lightgbm(fit, args.shards, "test", cfg)
        metrics, _ = evaluate_predictions(preds, cfg.evaluate, oracle, with_figures=False)
        results[name] = metrics["rank_ic"]
        print(
            f"{name:<18} rounds {fit.best_iteration:>4}  fit {fit.fit_seconds:6.1f}s  "
            f"valid Rank IC {fit.best_val_rank_ic:.4f}  test Rank IC {metrics['rank_ic']:.4f}  "
            f"IC {metrics['ic']:.4f}  L-S Sharpe {metrics['ls_sharpe']:.2f}  "
            f"oracle {metrics.get('oracle_rank_ic', float('nan')):.4f}",
            flush=True,
        )
    ratio = results[chosen] / results["regression/return"]
    print(f"test Rank IC of the default ({chosen}) / regression on raw return: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
