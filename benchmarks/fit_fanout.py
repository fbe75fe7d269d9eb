"""Wall time of `backtest` and `compare` with their fits on 1 worker and on N, same numbers.

Each run is its own process, as `alphaloom backtest` / `alphaloom compare` would be, in a fresh
work dir and MLflow store (so both do the same data work; nothing is cached between them), with
`runner.fit_workers` the only difference. Prints per run the wall time, then whether the per-period
(backtest) and per-variant (compare) test metrics are identical, and on its last line the ratio of
the N-worker wall time to the 1-worker one (backtest, the larger job; compare's is printed above).
`compare` runs the `full` and `cross_entropy` variants with `--seeds` seeds each (default 3, as
`alphaloom compare`); `--logs DIR` keeps every run's output (its epoch lines are timestamped).

    # no arguments (what `make bench` runs): a small synthetic market, 1-epoch fits, 2 workers
    .venv/bin/python benchmarks/fit_fanout.py
    # the real data, as the issue measures it (walk-forward every 6 months, default 8 epochs):
    .venv/bin/python benchmarks/fit_fanout.py --data sp500-dev
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SP500_DEV = REPO.parent / "shared" / "data" / "sp500-dev"

QUICK = [  # a small market: the whole benchmark takes a few minutes on 2 cores
    "data.synthetic.n_symbols=60",
    "data.synthetic.n_days=420",
    "text.enabled=false",
    "model.use_text=false",
    "train.epochs=1",
    "train.max_batches_per_epoch=30",
    "backtest.retrain_months=3",
    "backtest.train_months=8",
    "backtest.valid_months=2",
]
SP500 = ["backtest.retrain_months=6", "backtest.train_months=24", "backtest.valid_months=3"]
COMMON = ["train.device=cpu", "train.num_threads=1"]

RUNNER = """
import json, sys
from alphaloom.tasks.common.config import load_config
config_path, kind, out, seeds, *overrides = sys.argv[1:]
cfg = load_config(config_path, overrides)
if kind == "backtest":
    from alphaloom.flows.backtest import backtest
    table = backtest(config=cfg)["table"]
    rows = {str(row["period"]): row for row in table}
else:
    from alphaloom.flows.compare import compare_models
    from alphaloom.tasks.comparison.variants import DEFAULT_VARIANTS
    chosen = [v for v in DEFAULT_VARIANTS if v.name in ("full", "cross_entropy")]
    summary = compare_models(cfg, seeds=int(seeds), variants=chosen, figures=False)
    rows = {row["variant"]: row for row in summary["rows"]}
json.dump(rows, open(out, "w"), default=str)
"""


def run(
    kind: str,
    config: Path,
    overrides: list[str],
    work: Path,
    workers: int,
    seeds: int,
    logs: Path | None = None,
) -> tuple[float, dict]:
    """One command in its own process and work dir; (wall seconds, its rows)."""
    work.mkdir(parents=True)
    store = f"sqlite:///{work / 'mlflow.db'}"
    sets = [*overrides, f"work_dir={work / 'outputs'}", f"tracking.tracking_uri={store}",
            f"runner.fit_workers={workers}"]  # fmt: skip
    out = work / "rows.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    create = f"import mlflow; mlflow.MlflowClient({store!r}).search_experiments()"
    subprocess.run([sys.executable, "-c", create], check=True, env=env)  # once, before sharing
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(config), kind, str(out), str(seeds), *sets],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{work.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(
            f"{kind} with {workers} worker(s) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return wall, json.loads(out.read_text())


def numbers(rows: dict) -> dict:
    """The metric cells of each row (wall-clock columns left out)."""
    return {
        name: {k: v for k, v in row.items() if isinstance(v, float) and "second" not in k}
        for name, row in rows.items()
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["synthetic", "sp500-dev"], default="synthetic")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=["backtest", "compare"], default=None)
    parser.add_argument(
        "--seeds", type=int, default=3, help="compare's seeds per variant (default 3, as the CLI)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--logs", type=Path, default=None, help="keep each run's output in this folder"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.data == "sp500-dev":
        if not SP500_DEV.is_dir():
            sys.exit(f"{SP500_DEV} is absent: nothing to measure on real data")
        config, overrides = REPO / "configs" / "sp500-dev.yaml", [*SP500, *COMMON, *args.set]
    else:
        config, overrides = REPO / "configs" / "default.yaml", [*QUICK, *COMMON, *args.set]
    kinds = [args.only] if args.only else ["compare", "backtest"]
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="fit-fanout-") as tmp:
        for kind in kinds:
            walls = {}
            results = {}
            for workers in (1, args.workers):
                wall, rows = run(
                    kind,
                    config,
                    overrides,
                    Path(tmp) / f"{kind}-{workers}",
                    workers,
                    args.seeds,
                    args.logs,
                )
                walls[workers], results[workers] = wall, numbers(rows)
                print(f"{kind} ({args.data}), {workers} worker(s): {wall:.0f} s, {len(rows)} rows",
                      flush=True)  # fmt: skip
            same = results[1] == results[args.workers]
            print(f"{kind}: metrics identical across worker counts: {same}")
            if not same:
                for name in results[1]:
                    print(f"  {name}: {results[1][name]} vs {results[args.workers].get(name)}")
            ratios[kind] = walls[args.workers] / walls[1]
            print(f"{kind}: {args.workers} workers / 1 worker wall time = {ratios[kind]:.2f}")
    last = "backtest" if "backtest" in ratios else kinds[-1]
    print(f"{last} wall time ratio, {args.workers} workers / 1 worker: {ratios[last]:.2f}")


if __name__ == "__main__":
    main()
