"""Scoring: rank every symbol on the latest date with the registered champion.

The champion is loaded through MLflow (`models:/<name>@champion`), exactly as any other process
would load it, so what is scored here is what the registry promoted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from prefect import task

from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.common.storage import FsPath, atomic_file
from alphaloom.tasks.serving.registry import CHAMPION, champion_uri, predict_registered

log = logging.getLogger(__name__)

SCORE_COLUMNS = ["rank", "symbol", "date", "score", "p0", "p1", "p2", "p3"]


@dataclass(frozen=True)
class ScoreResult:
    """Where the ranked scores of one date were written."""

    date: str
    n_symbols: int
    parquet: str
    csv: str
    model_uri: str

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def rank_scores(preds: pd.DataFrame) -> pd.DataFrame:
    """Highest score first, with a 1-based rank column."""
    ranked = preds.sort_values(["score", "symbol"], ascending=[False, True]).reset_index(drop=True)
    ranked.insert(0, "rank", range(1, len(ranked) + 1))
    return ranked[SCORE_COLUMNS]


def score_latest_date(
    cfg: PipelineConfig, shard_dir: str | Path
) -> tuple[ScoreResult, pd.DataFrame]:
    """Score every symbol with a window ending on the shard set's last date; write parquet + CSV."""
    info = ShardSetInfo.open(shard_dir)
    latest = pd.Timestamp(info.last_date)
    model_uri = champion_uri(cfg)
    preds = predict_registered(model_uri, shard_dir, None, cfg, info.feature_names, [latest])
    ranked = rank_scores(preds)
    out_dir = FsPath.of(cfg.work_dir) / "scores"
    stem = f"scores_{latest:%Y-%m-%d}"
    parquet, csv = out_dir / f"{stem}.parquet", out_dir / f"{stem}.csv"
    with atomic_file(parquet) as tmp:
        ranked.to_parquet(tmp, index=False)
    with atomic_file(csv) as tmp:
        ranked.to_csv(tmp, index=False, date_format="%Y-%m-%d")
    log.info("scored %d symbols for %s with %s", len(ranked), f"{latest:%Y-%m-%d}", model_uri)
    result = ScoreResult(f"{latest:%Y-%m-%d}", len(ranked), str(parquet), str(csv), model_uri)
    return result, ranked


def publish_scores(result: ScoreResult, ranked: pd.DataFrame, top: int = 50) -> None:
    """A Prefect table artifact of the top of the ranking."""
    from prefect.artifacts import create_table_artifact

    head = ranked.head(top).assign(date=lambda f: f["date"].dt.strftime("%Y-%m-%d"))
    create_table_artifact(
        table=head.round(6).to_dict(orient="records"),
        key="latest-scores",
        description=f"Top {min(top, len(ranked))} of {result.n_symbols} symbols on {result.date} "
        f"({result.model_uri}, alias {CHAMPION})",
    )


@task(name="score-latest", retries=1, timeout_seconds=1800)
def score_task(cfg: PipelineConfig, shard_dir: str) -> dict[str, object]:
    """Prefect wrapper: score, write the files, publish the table artifact."""
    result, ranked = score_latest_date(cfg, shard_dir)
    publish_scores(result, ranked)
    return result.as_dict()
