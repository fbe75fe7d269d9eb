"""The real development data set (../shared/data/sp500-dev) through ingest and features with the
default data settings; skipped where the data is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alphaloom.tasks.common.config import load_config
from alphaloom.tasks.data.features import load_feature_table, run_features_stage
from alphaloom.tasks.data.ingest import load_saved_market, run_ingest_stage, saved_facts
from alphaloom.tasks.tracking.data_quality import data_notes

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sp500-dev.yaml"
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sp500-dev"

pytestmark = pytest.mark.skipif(not (DATA / "bars.parquet").is_file(), reason="no sp500-dev data")


def test_sp500_dev_ingests_with_default_policy_and_states_static_fields(tmp_path, monkeypatch):
    monkeypatch.chdir(CONFIG.parents[1])  # the config's data path is relative to the checkout
    cfg = load_config(CONFIG, [f"work_dir={tmp_path}", "features.factors=[KMID,ROC,MA]"])
    assert cfg.data.on_invalid == "drop"  # the default policy
    market = run_ingest_stage(cfg)
    saved = load_saved_market(market.path)
    facts = saved_facts(market)
    assert facts["validation"]["invalid_rows"] == 0
    assert facts["static_fields"] == ["industry", "index", "description"]
    assert not facts["instruments_point_in_time"]
    notes = data_notes(facts, market.path)
    assert any(
        n.startswith("industry, index, description: static over the whole history") for n in notes
    )
    warnings = [p for p in saved.report.problems if p.severity == "warning"]
    assert [p.problem for p in warnings] == ["high/low outside open/close (kept as is)"]
    table = load_feature_table(run_features_stage(market, cfg).location)
    frame = table.frame
    # Real gaps (halts, late listings): labels next to a missing bar are unknown, not stretched.
    calendar = np.asarray(table.calendar, dtype="datetime64[D]")
    slot = np.searchsorted(calendar, frame["date"].to_numpy().astype("datetime64[D]"))
    same = frame["symbol"].to_numpy()[1:] == frame["symbol"].to_numpy()[:-1]
    gap_before_next = np.r_[same & (np.diff(slot) > 1), False]
    assert gap_before_next.sum() > 0
    assert (frame["label"].to_numpy()[gap_before_next] == -1).all()
