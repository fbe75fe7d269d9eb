"""Champion / challenger: the alias `champion` moves only to a model that ranks better, measured
where neither model chose anything.

The challenger (the version just registered, alias `challenger`) and the champion are scored by
the same code: each is loaded from the registry through MLflow pyfunc (CPU, float32) and scored
on the promotion window (tasks/dataset/split_windows.py: the rolling layout's promotion window,
else the test split), which lies after the challenger's validation window (its early stopping
chose the epoch there) and after everything the champion trained or selected on. The challenger
wins when its daily Rank IC beats the champion's by more than `registry.margin` on average over
at least `registry.min_days` days where both are defined; the paired per-day difference, its
t-statistic, both means and the reason are written to the run and to the version (tags
`promotion.*`, the per-day table as the run artifact `registry/promotion_daily_v<N>.csv`).

A decision is made once per version: a retried task finds it recorded on the version and returns
it. Concurrent promotions are serialised by tasks/serving/promotion_lock.py, and the champion is
re-read before the alias moves. A champion that cannot be scored on the new data (another
feature set, code that no longer loads) cannot be compared; the challenger then wins and the
reason says so. A transient error (IO, network) is raised, so the task retries instead.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from alphaloom.tasks.common.config import PipelineConfig, RegistrySection
from alphaloom.tasks.dataset.split_windows import DateWindow, promotion_window
from alphaloom.tasks.evaluation.metrics import daily_ic, paired_t
from alphaloom.tasks.orchestration.retries import is_transient, retry_transient
from alphaloom.tasks.serving.promotion_lock import promotion_lock
from alphaloom.tasks.serving.registry import (
    CHAMPION,
    current_champion,
    predict_registered,
    register_once,
    version_uri,
)
from alphaloom.tasks.tracking import runs
from alphaloom.tasks.training.train import TrainResult

log = logging.getLogger(__name__)

WindowScorer = Callable[[str], pd.Series]  # model URI -> daily Rank IC on the window, by date

DECISION_TAG = "promotion.decision"  # the whole decision as JSON, written last

MAX_REREADS = 5  # decisions against a champion that keeps moving before giving up


@dataclass(frozen=True)
class PromotionDecision:
    """What the registry decided and why; scores are mean daily Rank IC on the same days."""

    promoted: bool
    new_version: str
    new_score: float
    champion_version: str | None
    champion_score: float | None
    reason: str
    window: str = ""
    mean_daily_diff: float | None = None
    t_stat: float | None = None
    days: int = 0
    margin: float = 0.0
    min_days: int = 0


@dataclass(frozen=True)
class PairedDays:
    """Both models' daily Rank IC on the days both have one, and the paired statistics."""

    daily: pd.DataFrame  # index date; columns challenger, champion, difference
    challenger: float
    champion: float
    mean_diff: float
    t_stat: float
    days: int


def pair_days(challenger: pd.Series, champion: pd.Series) -> PairedDays:
    """Align two daily Rank IC series on their common days; means and the paired difference."""
    daily = pd.concat({"challenger": challenger, "champion": champion}, axis=1, join="inner")
    daily = daily.dropna().sort_index()
    daily["difference"] = daily["challenger"] - daily["champion"]
    _, t_stat, _ = paired_t(daily["difference"])  # the same statistic as the comparison table
    means = daily.mean() if len(daily) else pd.Series(math.nan, index=daily.columns)
    return PairedDays(
        daily,
        float(means["challenger"]),
        float(means["champion"]),
        float(means["difference"]),
        t_stat,
        len(daily),
    )


def decide(
    challenger: pd.Series,
    champion_version: str | None,
    champion: pd.Series | None,
    rule: RegistrySection,
    champion_error: str | None = None,
) -> tuple[bool, str, PairedDays | None]:
    """Pure decision rule: (promote?, reason, paired days or None when there was no pairing).

    The challenger must beat the champion's mean daily Rank IC by more than `rule.margin` over
    at least `rule.min_days` paired days. With no champion yet, or one that cannot be scored on
    this data, the challenger wins (nothing to compare it with).
    """
    if champion_version is None:
        return True, "no champion yet", None
    if champion_error is not None or champion is None:
        return (
            True,
            (
                f"champion v{champion_version} could not be scored on the promotion window "
                f"({champion_error}); the challenger wins by default"
            ),
            None,
        )
    paired = pair_days(challenger, champion)
    if paired.days < rule.min_days:
        return (
            False,
            (
                f"only {paired.days} days with both Rank ICs on the promotion window, fewer than "
                f"registry.min_days={rule.min_days}; the champion stays"
            ),
            paired,
        )
    if not math.isfinite(paired.mean_diff):
        return False, "the paired daily Rank IC difference is undefined", paired
    figures = (
        f"challenger {paired.challenger:.5f} vs champion {paired.champion:.5f}: mean daily "
        f"difference {paired.mean_diff:+.5f} (t {paired.t_stat:.2f}, {paired.days} days)"
    )
    if paired.mean_diff > rule.margin:
        return True, f"{figures} > margin {rule.margin:g}", paired
    return False, f"{figures} <= margin {rule.margin:g}", paired


def window_scorer(shard_dir: str | Path, cfg: PipelineConfig) -> tuple[DateWindow, WindowScorer]:
    """The promotion window of `shard_dir`, and a scorer that loads a registered model through
    pyfunc and returns its daily Rank IC there (days with a known forward return); a seed
    ensemble is scored as one model (its members combined per day)."""
    from alphaloom.model.shard_set import read_manifest

    window = promotion_window(shard_dir)
    feature_names = list(read_manifest(shard_dir)["feature_names"])

    def score(model_uri: str) -> pd.Series:
        preds = predict_registered(model_uri, shard_dir, None, cfg, feature_names, window.dates())
        return daily_ic(preds, "spearman")

    return window, score


def recorded_decision(
    client: mlflow.MlflowClient, name: str, version: str
) -> PromotionDecision | None:
    """The decision already recorded on a version (a retried task), or None."""
    raw = client.get_model_version(name, version).tags.get(DECISION_TAG)
    return None if raw is None else PromotionDecision(**json.loads(raw))


def promote(
    cfg: PipelineConfig,
    run_id: str,
    version: str,
    window: DateWindow,
    score_window: WindowScorer,
) -> PromotionDecision:
    """Decide once whether challenger `version` takes `champion`, move the alias if so, record."""
    run = runs.TrackedRun.of(cfg, run_id)
    client = run.client
    name = cfg.tracking.registered_model
    recorded = recorded_decision(client, name, version)
    if recorded is not None:
        log.info("%s v%s was decided before (%s)", name, version, recorded.reason)
        return recorded
    challenger = score_window(version_uri(name, version))
    with promotion_lock(cfg, name):
        recorded = recorded_decision(client, name, version)
        if recorded is not None:
            return recorded
        decision, paired = _decide_and_move(client, cfg, version, window, challenger, score_window)
        _record(cfg, run, decision, paired)
    log.info("registry %s v%s: %s", name, version, decision.reason)
    return decision


def _decide_and_move(
    client: mlflow.MlflowClient,
    cfg: PipelineConfig,
    version: str,
    window: DateWindow,
    challenger: pd.Series,
    score_window: WindowScorer,
) -> tuple[PromotionDecision, PairedDays | None]:
    """Decide against the current champion; re-read it before the alias moves and decide again
    if it changed meanwhile (a concurrent promotion the lock could not exclude)."""
    name, rule = cfg.tracking.registered_model, cfg.registry
    scored: dict[str, tuple[pd.Series | None, str | None]] = {}
    for _ in range(MAX_REREADS):
        champion = current_champion(client, name)
        if champion == version:  # an earlier attempt moved the alias, then failed to record
            reason = "already the champion (moved by an earlier attempt of this decision)"
            return _decision(True, version, challenger, None, reason, window, rule, None), None
        if champion is not None and champion not in scored:
            scored[champion] = _score_champion(score_window, name, champion)
        daily, error = scored.get(champion, (None, None)) if champion else (None, None)
        promoted, reason, paired = decide(challenger, champion, daily, rule, error)
        if current_champion(client, name) != champion:
            log.warning("champion of %s moved during the decision; deciding again", name)
            continue
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version)
        decision = _decision(promoted, version, challenger, champion, reason, window, rule, paired)
        return decision, paired
    raise RuntimeError(f"the champion of {name} kept moving during {MAX_REREADS} decisions")


def _score_champion(
    score_window: WindowScorer, name: str, version: str
) -> tuple[pd.Series | None, str | None]:
    """(daily Rank IC, None), or (None, why) when the champion cannot be scored on this data."""
    try:
        return score_window(version_uri(name, version)), None
    except Exception as err:
        if is_transient(err):
            raise  # a dropped connection says nothing about the champion: retry the task
        error = f"{type(err).__name__}: {err}"
        log.warning("champion v%s of %s cannot be scored: %s", version, name, error)
        return None, error


def _decision(
    promoted: bool,
    version: str,
    challenger: pd.Series,
    champion: str | None,
    reason: str,
    window: DateWindow,
    rule: RegistrySection,
    paired: PairedDays | None,
) -> PromotionDecision:
    own = challenger.dropna()
    return PromotionDecision(
        promoted=promoted,
        new_version=str(version),
        new_score=paired.challenger if paired else (float(own.mean()) if len(own) else math.nan),
        champion_version=champion,
        champion_score=paired.champion if paired else None,
        reason=reason,
        window=window.label(),
        mean_daily_diff=paired.mean_diff if paired else None,
        t_stat=paired.t_stat if paired else None,
        days=paired.days if paired else len(own),
        margin=rule.margin,
        min_days=rule.min_days,
    )


def _record(
    cfg: PipelineConfig,
    run: runs.TrackedRun,
    decision: PromotionDecision,
    paired: PairedDays | None,
) -> None:
    """The decision on the run (metrics `registry/*`, tags `registry.*`, the per-day table) and
    on the version (tags `promotion.*`; the JSON decision last: it marks the decision made)."""
    name, version = cfg.tracking.registered_model, decision.new_version
    metrics = {
        "registry/challenger_rank_ic": decision.new_score,
        "registry/promoted": float(decision.promoted),
        "registry/champion_rank_ic": decision.champion_score,
        "registry/mean_daily_diff": decision.mean_daily_diff,
        "registry/daily_diff_t": decision.t_stat,
        "registry/paired_days": float(decision.days),
    }
    run.log_metrics({k: v for k, v in metrics.items() if v is not None})
    run.set_tags(
        {
            "registry.promoted": str(decision.promoted).lower(),
            "registry.reason": decision.reason[:5000],
            "registry.new_version": version,
            "registry.champion_version": decision.champion_version or "none",
            "registry.window": decision.window,
        },
    )
    daily_path = f"registry/promotion_daily_v{version}.csv"
    if paired is not None:
        run.log_text(paired.daily.rename_axis("date").to_csv(), daily_path)
    tags = {
        "promotion.promoted": str(decision.promoted).lower(),
        "promotion.reason": decision.reason,
        "promotion.window": decision.window,
        "promotion.challenger_rank_ic": f"{decision.new_score:.6f}",
        "promotion.champion_version": decision.champion_version or "none",
        "promotion.margin": f"{decision.margin:g}",
    }
    if paired is not None:
        tags |= {
            "promotion.champion_rank_ic": f"{paired.champion:.6f}",
            "promotion.mean_daily_diff": f"{paired.mean_diff:.6f}",
            "promotion.daily_diff_t": f"{paired.t_stat:.3f}",
            "promotion.paired_days": str(paired.days),
            "promotion.daily_table": f"runs:/{run.run_id}/{daily_path}",
        }
    tags[DECISION_TAG] = json.dumps(asdict(decision), allow_nan=True)
    for key, value in tags.items():
        run.client.set_model_version_tag(name, version, key, value[:5000])


def register_and_promote(
    cfg: PipelineConfig, run_id: str, result: TrainResult, shard_dir: str | Path
) -> PromotionDecision | None:
    """Register the trained model once (alias `challenger`) and decide whether it becomes the
    champion. Returns None when `tracking.log_model` is off (nothing is registered then)."""
    if not cfg.tracking.log_model:
        return None
    window, scorer = window_scorer(shard_dir, cfg)  # a layout without a window fails first
    version = register_once(cfg, run_id, result, shard_dir)
    return promote(cfg, run_id, version, window, scorer)


@task(
    name="register-model",
    retries=1,
    retry_condition_fn=retry_transient,
    timeout_seconds=12 * 3600,  # a hang guard: it rescores the whole promotion window (or test)
    persist_result=False,
    cache_policy=NO_CACHE,
)
def register_task(
    cfg: PipelineConfig, run_id: str, result: TrainResult, shard_dir: str
) -> PromotionDecision | None:
    """Prefect wrapper of `register_and_promote` (idempotent, so a retry is safe)."""
    return register_and_promote(cfg, run_id, result, shard_dir)
