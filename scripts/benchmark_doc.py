"""Generate docs/benchmark.md from real `alphaloom compare` runs (never edit that page by hand).

    # run every section of docs/benchmark_plan.yaml (one comparison each) and write the page:
    nice -n 5 .venv/bin/python scripts/benchmark_doc.py
    # run one section, take the others from finished comparisons (their parent run ids):
    nice -n 5 .venv/bin/python scripts/benchmark_doc.py --only synthetic \\
        --from-run sp500_2018=<id> --from-run sp500_2017h2=<id>
    # re-render the page from finished comparisons only (no training):
    .venv/bin/python scripts/benchmark_doc.py --from-run synthetic=<id> --from-run ...

Each section is one `alphaloom compare` (the command users type) on one data set and split: the
page shows that command's comparison table, its oracle where there is one, the machine, the
settings that size the run, the wall time and the exact command. The headline compares the
reference variant (the default model) with the variants the plan names, per section and pooled
over the sections of a group (e.g. two test periods of the same universe): the mean per-seed
paired difference of test Rank IC with its spread, and a per-day paired t-statistic (daily test
Rank IC differences, averaged over seeds, over their standard error). A section whose `requires`
path is absent (sp500-dev outside this workplace) is left out and the page says so.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field

from alphaloom.tasks.common.config import PipelineConfig, config_from_dict, load_config
from alphaloom.tasks.common.doc_sections import keep_sections
from alphaloom.tasks.common.storage import write_text_atomic
from alphaloom.tasks.evaluation.metrics import paired_t

REPO = Path(__file__).resolve().parent.parent
TAG_COMMAND = "alphaloom.command"
TAG_WALL = "alphaloom.wall_seconds"
TAG_SECTION = "alphaloom.benchmark_section"


class Section(BaseModel):
    """One comparison: a config plus overrides (a data set and a split)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    title: str
    config: str
    overrides: list[str] = Field(default_factory=list)
    requires: str | None = None  # a path the section needs (its data); absent: left out
    variants: str | None = None  # a variants YAML for this section; None: the plan's
    seeds: int | None = Field(None, ge=1)  # None: the plan's
    note: str = ""


class Group(BaseModel):
    """Sections pooled in the headline (the same universe over non-overlapping periods)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    title: str
    sections: list[str]


class Plan(BaseModel):
    """What the page holds: docs/benchmark_plan.yaml."""

    model_config = ConfigDict(extra="forbid")

    seeds: int = Field(3, ge=1)
    variants: str | None = None  # a variants YAML; None: the built-in grid
    reference: str = "full"
    headline: list[str] = Field(default_factory=lambda: ["cross_entropy", "lightgbm"])
    sections: list[Section]
    groups: list[Group] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# running a section


def compare_argv(plan: Plan, section: Section) -> list[str]:
    """The `alphaloom compare` arguments of a section."""
    seeds = section.seeds or plan.seeds
    argv = ["compare", "--config", section.config, "--seeds", str(seeds)]
    variants = section.variants or plan.variants
    if variants:
        argv += ["--variants", variants]
    for item in section.overrides:
        argv += ["--set", item]
    return argv


def run_section(plan: Plan, section: Section, command: str) -> str:
    """Run the section's comparison in this process; return its parent run id."""
    from alphaloom.flows.cli import main
    from alphaloom.tasks.tracking import runs, store

    cfg = section_config(section)
    started_ms = int(time.time() * 1000)
    started = time.perf_counter()
    code = main(compare_argv(plan, section))
    wall = time.perf_counter() - started
    if code not in (0, 1):  # 1 = some variant failed: its row says so, the page still renders
        raise SystemExit(f"alphaloom compare exited with {code} in section {section.name}")
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
        raise SystemExit(f"section {section.name}: the comparison's parent run was not found")
    run_id = found[0].info.run_id
    tags = {TAG_COMMAND: command, TAG_WALL: f"{wall:.0f}", TAG_SECTION: section.name}
    runs.TrackedRun(client, run_id).set_tags(tags)
    print(f"section {section.name}: finished in {wall:.0f} s, parent run {run_id}", flush=True)
    return run_id


def section_config(section: Section) -> PipelineConfig:
    return load_config(section.config, section.overrides)


def shell_command(raw_argv: list[str]) -> str:
    """This script's command line as it was started (its niceness included)."""
    niceness = os.nice(0)
    prefix = f"nice -n {niceness} " if niceness else ""
    return f"{prefix}.venv/bin/python scripts/benchmark_doc.py " + shlex.join(raw_argv)


# ----------------------------------------------------------------------------------------------
# reading a finished section back from MLflow


@dataclass
class Child:
    """One (variant, seed) child run: its metrics and its daily test Rank IC."""

    variant: str
    seed: int
    status: str
    metrics: dict[str, float]
    daily: pd.Series  # test Rank IC by date


@dataclass
class SectionResult:
    section: Section
    run: Any
    table: str
    cfg: PipelineConfig
    children: list[Child] = field(default_factory=list)


def load_section(section: Section, run_id: str) -> SectionResult:
    """The parent run, its comparison table, the config it ran with, and its child runs."""
    from alphaloom.tasks.tracking import store

    client = store.client_for(section_config(section))
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(client.download_artifacts(run_id, "comparison.md", tmp)).read_text()
        logged = Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text()
        cfg = config_from_dict(yaml.safe_load(logged), source=f"run {run_id}")
        found = client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
            max_results=1000,
        )
        children = []
        for child in found:
            tags = child.data.tags
            daily = pd.Series(dtype=float)
            if child.info.status == "FINISHED":
                path = client.download_artifacts(
                    child.info.run_id, "plots/test/daily_rank_ic.csv", tmp
                )
                frame = pd.read_csv(path)
                daily = pd.Series(frame["rank_ic"].to_numpy(), index=frame["date"].to_numpy())
            children.append(
                Child(
                    variant=tags.get("alphaloom.variant", "?"),
                    seed=int(tags.get("alphaloom.seed", -1)),
                    status=child.info.status,
                    metrics=dict(child.data.metrics),
                    daily=daily,
                )
            )
    return SectionResult(section, run, table, cfg, children)


# ----------------------------------------------------------------------------------------------
# the headline: paired per-seed differences and per-day t, per section and pooled


@dataclass
class Paired:
    reference: float  # mean test Rank IC of the reference over its finished seeds
    other: float
    diff_mean: float  # mean of the per-(section, seed) paired differences
    diff_std: float
    n: int
    daily_mean: float
    daily_t: float
    days: int
    ref_vol: float  # mean test score_vol_corr
    other_vol: float


def _finished(result: SectionResult, variant: str) -> dict[int, Child]:
    return {c.seed: c for c in result.children if c.variant == variant and c.status == "FINISHED"}


def paired(results: list[SectionResult], reference: str, other: str) -> Paired:
    """reference - other over every (section, seed) where both finished; days pooled."""
    diffs, day_diffs, refs, others, ref_vol, other_vol = [], [], [], [], [], []
    for result in results:
        ref, oth = _finished(result, reference), _finished(result, other)
        seeds = sorted(set(ref) & set(oth))
        for seed in seeds:
            a, b = ref[seed].metrics, oth[seed].metrics
            diffs.append(a.get("test/rank_ic", math.nan) - b.get("test/rank_ic", math.nan))
        refs += [c.metrics.get("test/rank_ic", math.nan) for c in ref.values()]
        others += [c.metrics.get("test/rank_ic", math.nan) for c in oth.values()]
        ref_vol += [c.metrics.get("test/score_vol_corr", math.nan) for c in ref.values()]
        other_vol += [c.metrics.get("test/score_vol_corr", math.nan) for c in oth.values()]
        if seeds:
            per_seed = pd.concat([ref[s].daily - oth[s].daily for s in seeds], axis=1, join="inner")
            day_diffs.append(per_seed.mean(axis=1))
    pooled = pd.concat(day_diffs) if day_diffs else pd.Series(dtype=float)
    _, daily_t, days = paired_t(pooled.dropna())  # a day only one of them scored is not paired
    finite = [d for d in diffs if math.isfinite(d)]
    return Paired(
        reference=_nanmean(refs),
        other=_nanmean(others),
        diff_mean=_nanmean(finite),
        diff_std=float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan,
        n=len(finite),
        daily_mean=float(pooled.mean()),  # the mean of a single day too
        daily_t=daily_t,
        days=days,
        ref_vol=_nanmean(ref_vol),
        other_vol=_nanmean(other_vol),
    )


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _fmt(value: float, decimals: int = 4, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def headline_table(plan: Plan, scopes: list[tuple[str, list[SectionResult]]]) -> list[str]:
    """One row per (scope, headline variant)."""
    ref = plan.reference
    header = [
        "data", f"`{ref}` test Rank IC", "variant", "its test Rank IC",
        f"`{ref}` − variant (per seed)", "per-day t (days)", f"score~vol: `{ref}` / variant",
    ]  # fmt: skip
    rows = []
    for title, results in scopes:
        for other in plan.headline:
            if not any(_finished(result, other) for result in results):
                continue  # a variant this scope's sections do not run
            p = paired(results, ref, other)
            spread = f" ± {_fmt(p.diff_std)}" if math.isfinite(p.diff_std) else ""
            rows.append(
                [
                    title,
                    _fmt(p.reference),
                    f"`{other}`",
                    _fmt(p.other),
                    f"{_fmt(p.diff_mean, signed=True)}{spread} (n={p.n})",
                    f"{_fmt(p.daily_t, 2)} ({p.days})",
                    f"{_fmt(p.ref_vol, 3)} / {_fmt(p.other_vol, 3)}",
                ]
            )
    table = pd.DataFrame(rows, columns=header)
    return table.to_markdown(index=False, tablefmt="pipe", disable_numparse=True).splitlines()


# ----------------------------------------------------------------------------------------------
# the page


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
    data = (
        f"synthetic ({syn.n_symbols} symbols x {syn.n_days} days)"
        if cfg.data.source == "synthetic"
        else f"files `{cfg.data.bars_path}`"
    )
    splits = cfg.features.splits
    split_text = (
        f"train to {splits.train_end}, valid to {splits.valid_end}, test to "
        f"{splits.test_end or 'the end'}"
        if splits.train_end
        else f"fractions {splits.train_fraction}/{splits.valid_fraction}"
    )
    factors = "all Alpha158" if cfg.features.factors == "all" else ", ".join(cfg.features.factors)
    return (
        f"data: {data}; splits: {split_text}; factors: {factors} over windows "
        f"{cfg.features.windows}; T={cfg.shards.window}; train: epochs={cfg.train.epochs}, "
        f"patience={cfg.train.patience}, max_batches_per_epoch={cfg.train.max_batches_per_epoch}, "
        f"batch={cfg.loader.batch_size}"
    )


def section_lines(result: SectionResult) -> list[str]:
    run, tags = result.run, result.run.data.tags
    started = datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M")
    oracle = run.data.metrics.get("test/oracle_rank_ic")
    lines = [
        f"## {result.section.title}",
        "",
        f"- Comparison: `alphaloom {shlex.join(compare_argv_from(result))}`",
        f"- Size: {sizing(result.cfg)}",
        f"- Seeds: {tags.get('alphaloom.seeds', '?')}; wall time {tags.get(TAG_WALL, '?')} s; "
        f"started {started} UTC; git commit `{tags.get('mlflow.source.git.commit', 'unknown')}`",
        f"- MLflow parent run: `{run.info.run_id}` (experiment `{result.cfg.tracking.experiment}`)",
    ]
    if oracle is not None:
        lines.append(
            f"- Oracle (the generator's true expected return) test Rank IC: {oracle:.4f}, "
            "the ceiling any model can reach on these rows"
        )
    if result.section.note:
        lines.append(f"- {result.section.note}")
    return [*lines, "", result.table.rstrip(), ""]


def compare_argv_from(result: SectionResult) -> list[str]:
    seeds = result.run.data.tags.get("alphaloom.seeds", "[]")
    n_seeds = len(yaml.safe_load(seeds) or [])
    argv = ["compare", "--config", result.section.config, "--seeds", str(n_seeds)]
    if result.section.variants:
        argv += ["--variants", result.section.variants]
    for item in result.section.overrides:
        argv += ["--set", item]
    return argv


def render(plan: Plan, results: list[SectionResult], missing: list[Section], command: str) -> str:
    by_name = {r.section.name: r for r in results}
    scopes = [(r.section.title, [r]) for r in results]
    for group in plan.groups:
        members = [by_name[name] for name in group.sections if name in by_name]
        if len(members) > 1:
            scopes.append((f"**{group.title}** (pooled)", members))
    lines = [
        "# Benchmark: the default model, its ablations and LightGBM on the same shards",
        "",
        "<!-- generated by scripts/benchmark_doc.py from real runs; do not edit by hand -->",
        "",
        f"- Command: `{command}` (plan: `docs/benchmark_plan.yaml`)",
        f"- Machine: {machine()}",
        f"- Reference: `{plan.reference}` = the model `configs/default.yaml` trains "
        "(`alphaloom run`); every other variant changes one thing (its overrides are in the "
        "tables' source and in tasks/comparison/variants.py)",
        "",
        "## Headline",
        "",
        *headline_table(plan, scopes),
        "",
        f"Per seed: the mean ± std of `{plan.reference}` − variant in test Rank IC over the n "
        "(section, seed) pairs where both finished. Per-day t: each test day's Rank IC difference "
        "averaged over those seeds, then mean / standard error over the days (pooled over the "
        "group's periods); |t| > 2 is a difference that holds day by day, not a lucky seed. "
        "score~vol: the mean daily Spearman correlation of the score with 20-day volatility.",
        "",
    ]
    if plan.notes:
        lines += ["\n>\n".join(f"> {note}" for note in plan.notes), ""]
    if missing:
        names = ", ".join(f"{s.title} (needs `{s.requires}`)" for s in missing)
        lines += [f"Left out here because their data is absent: {names}.", ""]
    for result in results:
        lines += section_lines(result)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=str(REPO / "docs" / "benchmark_plan.yaml"))
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmark.md"))
    parser.add_argument(
        "--from-run", action="append", default=[], metavar="SECTION=RUN_ID",
        help="take a section from a finished comparison's parent run",
    )  # fmt: skip
    parser.add_argument("--only", action="append", default=[], help="run only these sections")
    return parser


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    plan = Plan.model_validate(yaml.safe_load(Path(args.plan).read_text()))
    given = dict(item.split("=", 1) for item in args.from_run)
    unknown = set(given) - {s.name for s in plan.sections}
    if unknown:
        raise SystemExit(f"--from-run names no section of the plan: {sorted(unknown)}")
    command = shell_command(raw)
    results, missing = [], []
    for section in plan.sections:
        if section.requires and not Path(section.requires).exists():
            print(f"section {section.name}: {section.requires} is absent, left out")
            missing.append(section)
            continue
        if section.name in given:
            run_id = given[section.name]
        elif args.only and section.name not in args.only:
            print(f"section {section.name}: not run (--only) and no --from-run, left out")
            continue
        else:
            run_id = run_section(plan, section, command)
        results.append(load_section(section, run_id))
    page = render(plan, results, missing, command)
    if Path(args.out).is_file():  # the walk-forward section is benchmarks/walk_forward.py's
        page = keep_sections(Path(args.out).read_text(), page)
    write_text_atomic(args.out, page)
    Path(args.out).chmod(0o644)  # a page in the repo, not a private temp file
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
