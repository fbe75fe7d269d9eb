"""The cost curve: wall time and peak RSS of every pipeline stage as the synthetic market grows.

Runs ingest, features, text, shards, training, evaluation and registration (the stages of
`alphaloom run`, without Prefect: each stage is the same function the pipeline's task calls) on
synthetic markets of the given sizes (symbols x days). Every stage runs in its own subprocess, so
its peak RSS is its own: the peak is the larger of the summed RSS of the stage's process tree
sampled every 0.2 s (children included) and the kernel's high-water mark of the process
(`wait4`'s ru_maxrss). `seconds` is the stage's own work, timed inside the child; `process s`
adds the child's start (Python, torch, Prefect and MLflow imports: ~10 s here); `cpu s` is the
child's CPU time (user + system, all its threads, imports included: `wait4`'s rusage), the figure
to compare on a shared, loaded machine where the wall times stretch with the load. Nothing is
asserted; the last line prints the ratio of the stages' seconds per bar at the largest size to
the smallest (1.0 = linear cost).

    .venv/bin/python benchmarks/scale.py                       # 300x1500 (quick; `make bench`)
    .venv/bin/python benchmarks/scale.py --sizes 300x1500,1500x3000,3000x5000

Training defaults to 1 epoch of at most 20 batches (`--epochs`, `--batches`): the point is the
cost of the data path and of one epoch's validation, not a trained model; every other setting is
the default config's. Each size works in its own directory under `--work-dir` (a temporary one
by default, removed at the end), with its own MLflow store there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STAGES = ("ingest", "features", "text", "shards", "train", "evaluate", "register")


# ----------------------------------------------------------------------------------------------
# one stage, in a child process


def _config(work: Path, symbols: int, days: int, epochs: int, batches: int):
    from alphaloom.tasks.common.config import load_config

    overrides = [
        f"work_dir={work}",
        f"data.synthetic.n_symbols={symbols}",
        f"data.synthetic.n_days={days}",
        f"train.epochs={epochs}",
        f"train.max_batches_per_epoch={batches}",
        f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
        f"tracking.experiment=scale-{symbols}x{days}",
    ]
    return load_config(None, overrides)


def _refs(cfg, stage: str):
    """The outputs of the stages before `stage` (None for those it does not need)."""
    from alphaloom.tasks.data.features import features_task
    from alphaloom.tasks.data.ingest import ingest_task
    from alphaloom.tasks.dataset.shards import shards_task
    from alphaloom.tasks.dataset.text import text_task

    if stage == "ingest":
        return None, None, None, None
    market, _ = ingest_task.problem(cfg)
    if stage in ("features", "text"):
        return market, None, None, None
    features, _ = features_task.problem(market, cfg)
    text, _ = text_task.problem(market, cfg)
    shards, _ = shards_task.problem(features, text, market, cfg)
    if stage != "shards":
        shards = _built(shards)
    return market, features, text, shards


def _built(ref):
    """`ref`, or the one finished output of its stage in this size's work dir: the one this
    benchmark's own stage wrote (a code edit while a long run goes on moves the key)."""
    from alphaloom.tasks.orchestration.caching import StageRef

    if ref.location.exists():
        return ref
    root = Path(ref.path).parent
    done = [
        d for d in root.iterdir() if not d.name.startswith(".") and (d / "_COMPLETE.json").exists()
    ]
    if len(done) != 1:
        return ref
    return StageRef(stage=ref.stage, key=done[0].name, path=str(done[0]))


def _trained(cfg, shard_dir: str, work: Path):
    import torch

    from alphaloom.model.shard_set import ShardSetInfo
    from alphaloom.tasks.training.train import build_model

    saved = json.loads((work / "bench-train.json").read_text())
    model = build_model(ShardSetInfo.open(shard_dir), cfg)
    model.load_state_dict(torch.load(saved["model_state_path"], map_location="cpu"))
    return model.eval(), saved


def _import_stage_modules() -> None:
    import importlib

    for name in (
        "torch",
        "mlflow",
        "alphaloom.tasks.data.features",
        "alphaloom.tasks.dataset.shards",
        "alphaloom.tasks.dataset.text",
        "alphaloom.tasks.evaluation.evaluate",
        "alphaloom.tasks.serving.promotion",
        "alphaloom.tasks.tracking.runs",
        "alphaloom.tasks.training.train",
    ):
        importlib.import_module(name)


def run_stage(stage: str, work: Path, symbols: int, days: int, epochs: int, batches: int) -> None:
    """Run one stage on the outputs the earlier stages left in `work` (child process)."""
    from alphaloom.tasks.common.logging_setup import configure_logging

    configure_logging(False)
    cfg = _config(work, symbols, days, epochs, batches)
    market, features, text, shards = _refs(cfg, stage)
    if stage == "ingest":
        from alphaloom.tasks.data.ingest import ingest_task

        ingest_task.reuse_or_build(cfg)
    elif stage == "features":
        from alphaloom.tasks.data.features import features_task

        features_task.reuse_or_build(market, cfg)
    elif stage == "text":
        from alphaloom.tasks.dataset.text import text_task

        text_task.reuse_or_build(market, cfg)
    elif stage == "shards":
        from alphaloom.tasks.dataset.shards import shards_task

        shards_task.reuse_or_build(features, text, market, cfg)
    elif stage == "train":
        import torch

        from alphaloom.tasks.tracking.runs import start_run
        from alphaloom.tasks.training.train import train_model

        run_id = start_run(cfg, run_name="scale-bench")
        result = train_model(shards.path, cfg, work / "checkpoints" / run_id, run_id)
        state = work / "bench-model.pt"
        torch.save(result.model.state_dict(), state)
        info = {
            "run_id": run_id,
            "model_state_path": str(state),
            "best_epoch": result.best_epoch,
            "best_val_rank_ic": result.best_val_rank_ic,
            "dims": result.dims,
            "feature_names": result.feature_names,
        }
        (work / "bench-train.json").write_text(json.dumps(info))
    elif stage == "evaluate":
        from alphaloom.tasks.data.ingest import load_saved_oracle
        from alphaloom.tasks.dataset.split_windows import evaluated_splits
        from alphaloom.tasks.evaluation.evaluate import evaluate_and_log
        from alphaloom.tasks.evaluation.neutral import market_exposures

        model, saved = _trained(cfg, shards.path, work)
        oracle, exposures = load_saved_oracle(market), market_exposures(market)
        splits = evaluated_splits(shards.path)
        metrics = evaluate_and_log(
            model, shards.path, cfg, saved["run_id"], oracle, splits, exposures=exposures
        )
        print(f"test/rank_ic {metrics.get('test/rank_ic', float('nan')):.4f}", file=sys.stderr)
    elif stage == "register":
        from alphaloom.tasks.serving.promotion import register_and_promote
        from alphaloom.tasks.training.train import TrainResult

        model, saved = _trained(cfg, shards.path, work)
        result = TrainResult(
            model=model,
            best_epoch=saved["best_epoch"],
            best_val_rank_ic=saved["best_val_rank_ic"],
            history=[],
            model_state_path=saved["model_state_path"],
            dims=saved["dims"],
            feature_names=saved["feature_names"],
            device="cpu",
        )
        register_and_promote(cfg, saved["run_id"], result, shards.path)
    else:
        raise SystemExit(f"unknown stage {stage!r}; one of {STAGES}")


# ----------------------------------------------------------------------------------------------
# the parent: time and peak RSS of each stage's process tree


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def measure(args: list[str], log_file: Path) -> tuple[float, int, int, float]:
    """Run a child; return (seconds, peak summed tree RSS sampled, kernel high-water mark,
    the child's CPU seconds: user + system of all its threads, from `wait4`)."""
    started = time.perf_counter()
    with log_file.open("ab") as log:
        child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss(child.pid))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"stage failed ({child.returncode}): {' '.join(args)}; see {log_file}")
    cpu = usage.ru_utime + usage.ru_stime
    return seconds, peak[0], int(usage.ru_maxrss) * 1024, cpu  # Linux: ru_maxrss is in KiB


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        symbols, _, days = part.strip().lower().partition("x")
        sizes.append((int(symbols), int(days)))
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="300x1500", help="symbols x days, comma-separated")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batches", type=int, default=20, help="max batches per epoch")
    parser.add_argument("--work-dir", default=None, help="kept when given; else a temp dir")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    if args.stage is not None:
        (symbols, days), work = parse_sizes(args.size)[0], Path(args.work_dir)
        _import_stage_modules()  # their import is process start, not the stage's work
        started = time.perf_counter()
        run_stage(args.stage, work, symbols, days, args.epochs, args.batches)
        seconds = time.perf_counter() - started
        (work / f"bench-seconds-{args.stage}.json").write_text(json.dumps({"seconds": seconds}))
        return

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="alphaloom-scale-"))
    per_bar: list[tuple[int, float]] = []
    print(f"{'size':>10} {'bars':>11} {'stage':>9} {'seconds':>9} {'process s':>9} "
          f"{'cpu s':>9} {'peak RSS GB':>12}")  # fmt: skip
    try:
        for symbols, days in parse_sizes(args.sizes):
            work = root / f"{symbols}x{days}"
            work.mkdir(parents=True, exist_ok=True)
            total, walls, cpus, peak_all = 0.0, 0.0, 0.0, 0
            bars = None
            for stage in stages:
                cmd = [sys.executable, __file__, "--stage", stage, "--size", f"{symbols}x{days}",
                       "--work-dir", str(work), "--epochs", str(args.epochs),
                       "--batches", str(args.batches)]  # fmt: skip
                wall, sampled, high_water, cpu = measure(cmd, work / "bench.log")
                seconds = json.loads((work / f"bench-seconds-{stage}.json").read_text())["seconds"]
                peak = max(sampled, high_water)
                total, peak_all = total + seconds, max(peak_all, peak)
                walls, cpus = walls + wall, cpus + cpu
                if bars is None:
                    bars = _bars_of(work)
                print(f"{symbols}x{days:<5} {bars:>11,} {stage:>9} {seconds:>9.1f} {wall:>9.1f} "
                      f"{cpu:>9.1f} {peak / 1e9:>12.2f}", flush=True)  # fmt: skip
            print(f"{symbols}x{days:<5} {bars:>11,} {'all':>9} {total:>9.1f} {walls:>9.1f} "
                  f"{cpus:>9.1f} {peak_all / 1e9:>12.2f}", flush=True)  # fmt: skip
            per_bar.append((bars or symbols * days, total / max(bars or symbols * days, 1)))
    finally:
        if args.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    (small_bars, small), (large_bars, large) = per_bar[0], per_bar[-1]
    print(f"time per bar at {large_bars:,} bars / at {small_bars:,} bars: {large / small:.2f}x")


def _bars_of(work: Path) -> int | None:
    """Rows of the ingested market (its meta.json), None before ingest ran."""
    for meta in (work / "market").glob("*/meta.json"):
        found = json.loads(meta.read_text())
        for key in ("n_rows", "rows", "n_bars"):
            if key in found:
                return int(found[key])
    return None


if __name__ == "__main__":
    main()
