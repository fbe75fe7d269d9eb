"""Baselines and ablations side by side: every variant on the same shards, one MLflow parent run.

Composition only: the data stages are the pipeline's (cached), each (variant, seed) is one
`variant_task` inside its own child run, submitted to the fit pool (tasks/orchestration/fits.py:
inline with one worker, else local worker processes or a Dask cluster), and the table is built
and logged by tasks/comparison/summary.py from the outcomes in submission order. A failed
variant fails its task and child run; the others go on and its row says failed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from prefect import flow

from alphaloom.flows.pipeline import resolve_config
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.comparison.compare import REFERENCE, Progress, outcome_from_state, variant_task
from alphaloom.tasks.comparison.summary import (
    log_comparison,
    log_plan,
    outcome_line,
    parent_tags,
    publish_comparison,
)
from alphaloom.tasks.comparison.variants import (
    DEFAULT_VARIANTS,
    Variant,
    check_variants,
    seed_list,
    skipped_variants,
)
from alphaloom.tasks.data.ingest import load_saved_oracle
from alphaloom.tasks.dataset.chain import data_stages
from alphaloom.tasks.evaluation.neutral import market_exposures
from alphaloom.tasks.orchestration.fits import fit_pool
from alphaloom.tasks.tracking.resume import marking_orphaned_runs
from alphaloom.tasks.tracking.runs import TrackedRun, run_tags, tracked_run
from alphaloom.tasks.training.progress import elapsed_text

# what a fit's worker imports when it starts, while this process builds the data
WARM_MODULES = ("alphaloom.tasks.comparison.compare", "alphaloom.tasks.training.train",
                "alphaloom.tasks.evaluation.predictions")  # fmt: skip


@flow(name="compare-models", log_prints=True)
def compare_models(
    config: PipelineConfig | None = None,
    config_path: str | None = None,
    seeds: int = 3,
    variants: Sequence[Variant] | None = None,
    reference: str = REFERENCE,
    figures: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every variant with `seeds` seeds; log the comparison to one parent run.

    `figures=False` skips each child's evaluation plots (the parent's chart is always drawn).
    """
    cfg = resolve_config(config, config_path)
    chosen = check_variants(variants or DEFAULT_VARIANTS)
    seed_values = seed_list(cfg, seeds)
    skipped = skipped_variants(chosen)
    runnable = [v for v in chosen if v.name not in skipped]
    jobs = [(variant, seed) for variant in runnable for seed in seed_values]
    # workers start during the data stages
    with marking_orphaned_runs(cfg), fit_pool(cfg, len(jobs), WARM_MODULES) as pool:
        data = data_stages(cfg)
        market, shards = data.market, data.shards
        oracle = load_saved_oracle(market)
        exposures = market_exposures(market)
        shard_tags = run_tags(shards)
        with tracked_run(cfg, parent_tags(shard_tags, seed_values), "compare") as parent_id:
            parent = TrackedRun.of(cfg, parent_id)
            parent.log_shard_dataset(shards.path)
            log_plan(parent, chosen, seed_values)
            for name, reason in skipped.items():
                print(f"skipping {name}: {reason}")
            started = time.time()
            if pool.workers > 1:
                print(f"{len(jobs)} fits on {pool.workers} workers")
            submitted = []
            for number, (variant, seed) in enumerate(jobs, 1):
                label = f"variant {number}/{len(jobs)} {variant.name} seed {seed}"
                print(f"{label} ({elapsed_text(time.time() - started)})")
                fit = pool.submit(
                    variant_task, cfg=cfg, variant=variant, seed=seed, parent_run_id=parent_id,
                    shard_dir=shards.path, oracle=oracle, tags=shard_tags, figures=figures,
                    exposures=exposures, progress=Progress(label, started),
                )  # fmt: skip
                submitted.append((label, variant, seed, fit))
            outcomes = []
            for label, variant, seed, fit in submitted:
                outcome = outcome_from_state(fit.state(), variant, seed)
                outcomes.append(outcome)
                print(f"{label}: {outcome_line(outcome)}")
            summary = log_comparison(cfg, parent, chosen, outcomes, seed_values, skipped, reference)
    publish_comparison(summary)
    print(summary["markdown"])
    return summary
