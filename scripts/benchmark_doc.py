"""Generate docs/benchmark.md from a real `alphaloom compare` run (never edit that file by hand).

    # run the comparison on the default synthetic market and write the page:
    nice -n 10 .venv/bin/python scripts/benchmark_doc.py --config configs/default.yaml --seeds 2
    # re-render the page from a finished comparison's parent run (no training):
    .venv/bin/python scripts/benchmark_doc.py --from-run <parent run id> --config <same config>

The comparison runs through the CLI (`alphaloom compare ...`, the command users type), so the page
shows exactly what that command produced: the parent run's comparison table, the oracle, the
machine, the settings that size the run, the wall time and the exact command. The command and
wall time are also tagged on the parent run, so `--from-run` renders the same page later.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

import yaml  # noqa: E402

from alphaloom.tasks.common.config import PipelineConfig, config_from_dict, load_config  # noqa: E402
from alphaloom.tasks.common.storage import write_text_atomic  # noqa: E402

TAG_COMMAND = "alphaloom.command"
TAG_WALL = "alphaloom.wall_seconds"


def cli_argv(args: argparse.Namespace) -> list[str]:
    """The `alphaloom compare` arguments this page documents."""
    argv = ["compare", "--config", args.config, "--seeds", str(args.seeds)]
    for item in args.overrides:
        argv += ["--set", item]
    return argv


def run_comparison(args: argparse.Namespace, cfg: PipelineConfig) -> tuple[str, float]:
    """Run `alphaloom compare` in this process; return (parent run id, wall seconds)."""
    from alphaloom.flows.cli import main
    from alphaloom.tasks.tracking import runs, store

    started_ms = int(time.time() * 1000)
    started = time.perf_counter()
    code = main(cli_argv(args))
    wall = time.perf_counter() - started
    if code not in (0, 1):  # 1 = some variant failed: its row says so, the page still renders
        raise SystemExit(f"alphaloom compare exited with {code}")
    client = store.client_for(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`alphaloom.kind` = 'compare' "
        f"and attributes.start_time >= {started_ms}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        raise SystemExit("the comparison finished but its parent run was not found")
    run_id = found[0].info.run_id
    runs.set_tags(cfg, run_id, {TAG_COMMAND: shell_command(args), TAG_WALL: f"{wall:.0f}"})
    return run_id, wall


def shell_command(args: argparse.Namespace) -> str:
    """The command line that ran the comparison (this script's invocation, minus `--note`s,
    which only add text to the page)."""
    argv, skip = [], False
    for item in args.raw_argv:
        if skip:
            skip = False
        elif item == "--note":
            skip = True
        elif not item.startswith("--note="):
            argv.append(item)
    niceness = os.nice(0)  # how this process was started, so the page repeats it exactly
    prefix = f"nice -n {niceness} " if niceness else ""
    return f"{prefix}.venv/bin/python scripts/benchmark_doc.py " + shlex.join(argv)


def machine() -> str:
    """CPU model, cores, OS, Python, torch and LightGBM versions, GPU if any."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    try:
        import lightgbm

        lgbm = lightgbm.__version__
    except ImportError:
        lgbm = "not installed"
    return (
        f"{cpu}, {os.cpu_count()} cores visible (shared with other work while this ran); "
        f"GPU: {gpu}; {platform.system()} {platform.release()}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, LightGBM {lgbm}"
    )


def sizing(cfg: PipelineConfig) -> str:
    """The settings that decide how big and how long the run is."""
    syn = cfg.data.synthetic
    factors = "all Alpha158" if cfg.features.factors == "all" else ", ".join(cfg.features.factors)
    return (
        f"data: {cfg.data.source}"
        + (
            f" ({syn.n_symbols} symbols x {syn.n_days} days)"
            if cfg.data.source == "synthetic"
            else ""
        )
        + f"; factors: {factors} over windows {cfg.features.windows}; T={cfg.shards.window}; "
        f"train: epochs={cfg.train.epochs}, patience={cfg.train.patience}, "
        f"max_batches_per_epoch={cfg.train.max_batches_per_epoch}, "
        f"batch={cfg.loader.batch_size}, device={cfg.train.device}"
    )


def parent_run(cfg: PipelineConfig, run_id: str) -> tuple[Any, str, PipelineConfig]:
    """The parent run, its comparison table and the config it ran with (both artifacts)."""
    from alphaloom.tasks.tracking import store

    client = store.client_for(cfg)
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(client.download_artifacts(run_id, "comparison.md", tmp)).read_text()
        logged = Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text()
    return run, table, config_from_dict(yaml.safe_load(logged), source=f"run {run_id}")


def render(cfg: PipelineConfig, run: Any, table: str, notes: list[str]) -> str:
    """The page; `cfg` is the config the run logged."""
    tags = run.data.tags
    command = tags.get(TAG_COMMAND, "(not recorded)")
    seeds = tags.get("alphaloom.seeds", "?")
    cli = _cli_from_command(command)
    config_path = cli[cli.index("--config") + 1] if "--config" in cli else "?"
    is_default = Path(config_path).name == "default.yaml" and not cli.count("--set")
    oracle = run.data.metrics.get("test/oracle_rank_ic")
    started = datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M")
    lines = [
        "# Benchmark: the full model, its ablations and LightGBM on the same shards",
        "",
        "<!-- generated by scripts/benchmark_doc.py from a real run; do not edit by hand -->",
        "",
        f"- Command: `{command}`",
        f"  (the comparison itself is `alphaloom {shlex.join(cli)}`)",
        f"- Config: `{config_path}`"
        + ("" if is_default else " — **not the unmodified configs/default.yaml**"),
        f"- Size: {sizing(cfg)}",
        f"- Seeds: {seeds}; wall time {tags.get(TAG_WALL, '?')} s; started {started} UTC",
        f"- Machine: {machine()}",
        f"- MLflow parent run: `{run.info.run_id}` (experiment `{cfg.tracking.experiment}`); "
        "its artifacts hold `comparison.csv` and the bar chart `rank_ic.png`",
        f"- Git commit: `{tags.get('mlflow.source.git.commit', 'unknown')}`",
    ]
    if oracle is not None:
        lines.append(
            f"- Oracle (the generator's true expected return) test Rank IC: {oracle:.4f}, "
            "the ceiling any model can reach on these rows"
        )
    lines += ["", "\n>\n".join(f"> {note}" for note in notes)] if notes else []
    lines += ["", "## Comparison", "", table.rstrip(), ""]
    return "\n".join(lines) + "\n"


def _cli_from_command(command: str) -> list[str]:
    """`alphaloom compare ...` arguments from this script's recorded command line."""
    try:
        parts = shlex.split(command)
    except ValueError:
        return ["compare"]
    if "scripts/benchmark_doc.py" not in parts:
        return ["compare"]
    parsed = build_parser().parse_args(parts[parts.index("scripts/benchmark_doc.py") + 1 :])
    return cli_argv(parsed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmark.md"))
    parser.add_argument("--from-run", default=None, help="render an existing parent run")
    parser.add_argument("--note", action="append", default=[], help="a line for the page")
    return parser


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    args.raw_argv = raw
    cfg = load_config(args.config, args.overrides)
    if args.from_run:
        run_id = args.from_run
    else:
        run_id, wall = run_comparison(args, cfg)
        print(f"comparison finished in {wall:.0f} s: parent run {run_id}")
    run, table, run_cfg = parent_run(cfg, run_id)
    write_text_atomic(args.out, render(run_cfg, run, table, args.note))
    Path(args.out).chmod(0o644)  # a page in the repo, not a private temp file
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
