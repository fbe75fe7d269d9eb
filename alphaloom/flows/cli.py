"""The `alphaloom` command line: one entry point for every flow and tool.

Imports are deferred into each command so `alphaloom --help` and `alphaloom synth` stay fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from alphaloom.tasks.common.config import (
    DEFAULT_CONFIG_NAME,
    ConfigError,
    PipelineConfig,
    load_config,
    packaged_config,
)
from alphaloom.tasks.common.logging_setup import configure_logging

# Prefect's temporary server needs longer than its default 20 s to start on small machines.
_ENV_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _set_env_defaults() -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


NIGHTLY_CONFIG_NAME = "nightly.yaml"  # rolling splits and a promotion margin


def _config(args: argparse.Namespace, default: str = DEFAULT_CONFIG_NAME) -> PipelineConfig:
    """--config, else the packaged config `default` (default.yaml: the same file as the
    repository's configs/default.yaml), with the --set overrides applied."""
    return load_config(args.config or packaged_config(default), args.overrides)


def _add_config_arguments(
    parser: argparse.ArgumentParser, default: str | None = DEFAULT_CONFIG_NAME, use: str = ""
) -> None:
    """--config and --set; `default` is the packaged config the command reads without --config
    (the name `_config` is given), None for the built-in defaults; `use` says what of it is used."""
    what = f" {use}" if use else ""
    if default is None:
        help_text = f"YAML config{what} (default: none, the built-in defaults)"
    else:
        help_text = f"YAML config{what} (default: {default}, the packaged configs/{default})"
    parser.add_argument("--config", default=None, help=help_text)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set train.epochs=3",
    )


def cmd_synth(args: argparse.Namespace) -> int:
    """Write (or extend) the synthetic market as files in the format real data uses."""
    from alphaloom.tasks.data.synthetic import extend_market, generate_market, write_market
    from alphaloom.tasks.evaluation.metrics import oracle_rank_ic

    out = Path(args.out)
    if args.extend_days:
        market = extend_market(out, args.extend_days)
        print(f"extended {out} by {args.extend_days} days -> {market.bars['date'].nunique()} days")
        return 0
    cfg = load_config(args.config, args.overrides)  # the generator's defaults without --config
    market = generate_market(cfg.data.synthetic)
    write_market(market, out, cfg.data.synthetic)
    print(
        f"wrote {market.bars['symbol'].nunique()} symbols x {market.bars['date'].nunique()} days "
        f"to {out} (oracle daily Rank IC {oracle_rank_ic(market):.3f})"
    )
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    """Ingest the configured data and build the factor table (no Prefect server needed); an
    intact output of the same inputs is reused, as the pipeline's cache would."""
    from alphaloom.tasks.dataset.chain import data_stages

    data = data_stages(_config(args), until="features", prefect=False)
    print(f"market:   {data.market.path}")
    print(f"features: {data.features.path}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check the configured input data in one pass and print every problem, without starting
    Prefect or writing a market; exit status 1 when a run would stop on it."""
    from alphaloom.tasks.data.checks import DataValidationError
    from alphaloom.tasks.data.ingest import load_market, market_facts, min_history_for
    from alphaloom.tasks.tracking.data_quality import data_notes

    cfg = _config(args)
    notes: list[str] = []
    try:
        market = load_market(cfg.data, min_history_for(cfg))
        report, verdict, status = market.report, "A run would go ahead.", 0
        notes = data_notes(market_facts(market, cfg.data), "<market>")
    except DataValidationError as err:
        if err.report is None:
            raise
        # the error's first line says why, and may end in a colon that introduced the report
        reason = str(err).strip().splitlines()[0].rstrip(" :.")
        report, verdict, status = err.report, f"A run would stop: {reason}.", 1
    print(report.render())
    for note in notes:
        print(f"note: {note}")
    if args.report:
        report.frame().to_csv(args.report, index=False)
        print(f"report written to {args.report}")
    print(verdict)
    return status


def cmd_run(args: argparse.Namespace) -> int:
    """Run the whole training pipeline as a Prefect flow."""
    from alphaloom.flows.pipeline import train_pipeline

    cfg = _config(args)
    summary = train_pipeline(cfg, resume_run_id=args.resume)
    _print_summary(summary)
    return 0


def cmd_train_ddp(args: argparse.Namespace) -> int:
    """Run the training pipeline with training under DDP (torchrun on this machine)."""
    from alphaloom.flows.pipeline import train_pipeline_ddp

    cfg = _config(args)
    summary = train_pipeline_ddp(
        cfg, nproc_per_node=args.nproc_per_node, backend=args.backend, resume_run_id=args.resume
    )
    _print_summary(summary)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Score every symbol on the latest date with the champion model."""
    from alphaloom.flows.score import score_latest

    cfg = _config(args)
    result = score_latest(cfg)
    print(f"scored {result['n_symbols']} symbols for {result['date']}")
    print(f"ranked scores: {result['parquet']}")
    print(f"               {result['csv']}")
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    """Run the nightly retrain once, now (default config: the packaged nightly.yaml)."""
    from alphaloom.flows.nightly import nightly_retrain

    cfg = _config(args, NIGHTLY_CONFIG_NAME)
    _print_summary(nightly_retrain(cfg))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Train the full model, its ablations and the LightGBM baseline; compare them in MLflow."""
    from alphaloom.flows.compare import compare_models
    from alphaloom.tasks.comparison.baselines import INSTALL_HINT, lightgbm_available
    from alphaloom.tasks.comparison.variants import (
        DEFAULT_VARIANTS,
        CompareError,
        load_variants,
        seed_list,
    )

    cfg = _config(args)
    try:
        variants = load_variants(args.variants) if args.variants else list(DEFAULT_VARIANTS)
        seed_list(cfg, args.seeds)
    except CompareError as err:
        print(f"alphaloom: {err}", file=sys.stderr)
        return 2
    if not lightgbm_available() and any(v.kind in ("lightgbm", "blend") for v in variants):
        print(f"LightGBM is not installed, so its baseline is skipped; install: {INSTALL_HINT}")
    summary = compare_models(cfg, seeds=args.seeds, variants=variants)
    print(f"\nMLflow parent run: {summary['parent_run_id']} ({summary['experiment']})")
    if summary["failed"]:
        print(f"failed variants: {', '.join(summary['failed'])}", file=sys.stderr)
        return 1
    return 0


def cmd_backtest(args: argparse.Namespace) -> int:
    """Walk-forward backtest of the network and LightGBM; or print a finished one's table."""
    from alphaloom.tasks.backtest.periods import BacktestError

    cfg = _config(args)
    if args.table:
        from alphaloom.tasks.backtest.report import markdown_of_run

        try:
            print(markdown_of_run(cfg, args.table), end="")
        except LookupError as err:
            print(f"alphaloom: {err}", file=sys.stderr)
            return 2
        return 0
    from alphaloom.flows.backtest import backtest

    try:
        summary = backtest(cfg)
    except BacktestError as err:
        print(f"alphaloom: {err}", file=sys.stderr)
        return 2
    print(f"\nMLflow parent run: {summary['parent_run_id']} ({summary['experiment']})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the config a command would run with (every key, defaults filled in), as YAML."""
    print(_config(args).to_yaml(), end="")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the MLflow UI on 127.0.0.1 against the tracking store; needs no pipeline config
    (a --config only supplies its tracking section)."""
    from alphaloom.tasks.tracking.store import resolve_tracking_uri, ui_command

    cfg = load_config(args.config, args.overrides)
    uri = args.backend_store_uri or resolve_tracking_uri(cfg)
    command = ui_command(uri, port=args.port or cfg.tracking.ui_port)
    print("starting:", " ".join(command))
    os.execvp(command[0], command)
    return 0  # pragma: no cover - execvp does not return


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the nightly-retrain and score-latest deployments from this one process."""
    from alphaloom.flows.serve import serve_deployments

    config = args.config or packaged_config(NIGHTLY_CONFIG_NAME)
    serve_deployments(config, cron=args.cron, timezone=args.timezone)
    return 0


def _print_summary(summary: dict) -> None:
    print()
    print(f"MLflow run:      {summary.get('run_id')}  (experiment '{summary.get('experiment')}')")
    if summary.get("run_url"):
        print(f"                 {summary['run_url']}")
    print("Open the UI:     alphaloom ui   (serves http://127.0.0.1:5000 by default)")
    for key, value in summary.get("metrics", {}).items():  # tracking/report.py's HEADLINE_METRICS
        print(f"{key:<24}{value: .4f}")
    if "promoted" in summary:
        print(f"champion moved:  {summary['promoted']}  ({summary.get('registry_reason', '')})")
    for note in summary.get("data_notes", []):
        print(f"input data:      {note}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="alphaloom", description="Rank stocks with a deep sequence model."
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, the libraries' request logs included (or: ALPHALOOM_LOG_LEVEL=DEBUG)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write the synthetic market as files")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--extend-days", type=int, default=0, help="append N days to --out")
    _add_config_arguments(synth, None, "for data.synthetic")
    synth.set_defaults(func=cmd_synth)

    commands: list[tuple[str, str, Callable[[argparse.Namespace], int], str]] = [
        ("features", "ingest data and build the factor table", cmd_features, DEFAULT_CONFIG_NAME),
        ("run", "run the training pipeline", cmd_run, DEFAULT_CONFIG_NAME),
        ("score", "score the latest date with the champion", cmd_score, DEFAULT_CONFIG_NAME),
        ("nightly", "run the nightly retrain once, now", cmd_nightly, NIGHTLY_CONFIG_NAME),
    ]
    for name, help_text, func, default_config in commands:
        command = sub.add_parser(name, help=help_text)
        _add_config_arguments(command, default_config)
        command.set_defaults(func=func)
        if name == "run":
            _add_resume_argument(command)

    validate = sub.add_parser("validate", help="check the input data, list every problem")
    _add_config_arguments(validate)
    validate.add_argument("--report", default=None, help="also write the report as CSV here")
    validate.set_defaults(func=cmd_validate)

    compare = sub.add_parser("compare", help="compare the model, its ablations and LightGBM")
    _add_config_arguments(compare)
    compare.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    compare.add_argument("--variants", default=None, help="YAML list of variants")
    compare.set_defaults(func=cmd_compare)

    backtest = sub.add_parser(
        "backtest", help="walk-forward backtest: retrain every K months, score the next period"
    )
    _add_config_arguments(backtest)
    backtest.add_argument(
        "--table", metavar="RUN_ID", default=None, help="print a finished backtest's table"
    )
    backtest.set_defaults(func=cmd_backtest)

    ddp = sub.add_parser("train-ddp", help="run the training pipeline with DDP training")
    _add_config_arguments(ddp)
    ddp.add_argument(
        "--nproc-per-node", type=int, default=2, help="training processes (one per GPU on CUDA)"
    )
    ddp.add_argument(
        "--backend", choices=["auto", "gloo", "nccl"], default="auto", help="auto: NCCL on CUDA"
    )
    ddp.set_defaults(func=cmd_train_ddp)
    _add_resume_argument(ddp)

    show = sub.add_parser("config", help="print the resolved config (every key) as YAML")
    _add_config_arguments(show)
    show.set_defaults(func=cmd_config)

    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    _add_config_arguments(ui, None, "for its tracking section")
    ui.add_argument("--port", type=int, default=None, help="default: tracking.ui_port (5000)")
    ui.add_argument(
        "--backend-store-uri",
        default=None,
        help="tracking store (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)",
    )
    ui.set_defaults(func=cmd_ui)

    serve = sub.add_parser("serve", help="serve the scheduled deployments in this process")
    serve.add_argument(
        "--config",
        default=None,
        help=f"YAML config (default: {NIGHTLY_CONFIG_NAME}, the packaged "
        f"configs/{NIGHTLY_CONFIG_NAME})",
    )
    serve.add_argument("--cron", default="0 22 * * 1-5", help="nightly retrain schedule")
    serve.add_argument("--timezone", default="America/New_York")
    serve.set_defaults(func=cmd_serve, overrides=[])
    return parser


def _add_resume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume",
        default=None,
        metavar="RUN_ID",
        help="continue this unfinished MLflow run from its checkpoint (without it, an unfinished "
        "run of the same data, config and code is continued when there is one)",
    )


# Commands that run Prefect flows, and so may start Prefect's temporary server.
FLOW_COMMANDS = ("run", "score", "nightly", "compare", "train-ddp", "serve")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `alphaloom` console script."""
    _set_env_defaults()  # before anything imports Prefect, which reads its settings then
    from alphaloom.tasks.common.storage import StorageError
    from alphaloom.tasks.data.checks import DataValidationError
    from alphaloom.tasks.tracking.resume import ResumeError

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)  # also before Prefect and MLflow: they read its settings
    if args.command in FLOW_COMMANDS:
        from alphaloom.tasks.orchestration.reaper import start_reaper

        start_reaper()  # a kill -9 of this process must not orphan Prefect's temporary server
    from alphaloom.tasks.orchestration.shutdown import stoppable

    args.func = stoppable(args.command, args.func)  # SIGTERM/SIGINT: runs KILLED, exit 128+N
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"alphaloom: config error:\n{err}", file=sys.stderr)
        return 2
    except DataValidationError as err:
        print(f"alphaloom: bad input data:\n{err}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"alphaloom: bad stored output:\n{err}", file=sys.stderr)
        return 2
    except ResumeError as err:
        print(f"alphaloom: cannot resume:\n{err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
