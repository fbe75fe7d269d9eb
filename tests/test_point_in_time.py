"""Point-in-time static fields: dated instrument rows give each date the row valid on it;
without dates the run says the fields are static over the history (a look-ahead on real data)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from alphaloom.model.dataset import ShardedWindowDataset
from alphaloom.model.shard_format import days_to_dates
from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.config import DataSection, PipelineConfig, ShardsSection
from alphaloom.tasks.data.ingest import ingest_location, load_market, market_facts
from alphaloom.tasks.data.instruments import read_instruments, static_fields, valid_rows
from alphaloom.tasks.dataset.shards import build_shards
from alphaloom.tasks.tracking.data_quality import (
    TAG_POINT_IN_TIME,
    TAG_STATIC_FIELDS,
    data_notes,
    log_data_quality,
)
from alphaloom.tasks.tracking.report import summary_markdown
from alphaloom.tasks.tracking.runs import TrackedRun, start_run
from alphaloom.tasks.tracking.store import client_for
from tests.shards_testdata import make_table

DATED = pd.DataFrame(
    {
        "Ticker": ["AAA", "AAA", "BBB", "CCC"],
        "start_date": ["2021-01-04", "2021-03-01", "", "2021-02-01"],
        "end_date": ["2021-02-26", "", "", ""],
        "Sector": ["Energy", "Tech", "Banks", "Tech"],
        "index": ["", "SP500", "SP500", ""],
        "description": ["Oil and gas.", "Software now.", "A bank.", ""],
    }
)


def test_dated_rows_are_read_and_resolved_per_date(tmp_path: Path):
    DATED.to_csv(tmp_path / "inst.csv", index=False)
    table, report = read_instruments(tmp_path / "inst.csv", ["AAA", "BBB", "CCC", "DDD"])
    assert not report.errors
    assert table.groupby("symbol").size().to_dict() == {"AAA": 2, "BBB": 1, "CCC": 1, "DDD": 1}
    assert static_fields(table) == []  # dated: nothing is static
    days = pd.to_datetime(["2021-01-15", "2021-02-26", "2021-03-01", "2021-01-15", "2021-06-01"])
    rows = valid_rows(table, np.array(["AAA", "AAA", "AAA", "CCC", "DDD"]), days.to_numpy())
    industry = [table["industry"].iloc[r] if r >= 0 else None for r in rows]
    assert industry == ["Energy", "Energy", "Tech", None, ""]  # CCC starts in February


def test_overlapping_or_crossed_periods_are_errors_listed_together(tmp_path: Path):
    bad = pd.DataFrame(
        {
            "symbol": ["AAA", "AAA", "BBB", "CCC"],
            "start_date": ["2021-01-04", "2021-02-01", "2021-05-01", "2021-13-01"],
            "end_date": ["2021-03-01", "", "2021-04-01", ""],
        }
    )
    bad.to_csv(tmp_path / "inst.csv", index=False)
    _, report = read_instruments(tmp_path / "inst.csv", ["AAA", "BBB", "CCC"])
    found = {(p.column, p.problem) for p in report.errors}
    assert found == {
        ("symbol", "periods of one symbol overlap"),
        ("end_date", "end_date before start_date"),
        ("start_date", "unparseable date"),
    }


def test_instrument_errors_stop_even_the_drop_policy(tmp_path: Path):
    bars = make_bars_file(tmp_path)
    pd.DataFrame({"symbol": ["AAA", "AAA"], "sector": ["a", "b"]}).to_csv(
        tmp_path / "inst.csv", index=False
    )
    data = DataSection(
        source="files", bars_path=str(bars), instruments_path=str(tmp_path / "inst.csv")
    )
    with pytest.raises(ValueError, match="the instruments file has errors"):
        load_market(data, 5)


def make_bars_file(tmp_path: Path) -> Path:
    dates = pd.bdate_range("2021-01-04", periods=30)
    frame = pd.DataFrame({"Date": dates, "Name": "AAA", "Open": 10.0, "High": 11.0, "Low": 9.0,
                          "Close": 10.0, "Volume": 100.0})  # fmt: skip
    frame.to_csv(tmp_path / "bars.csv", index=False)
    return tmp_path / "bars.csv"


def test_shards_carry_the_industry_index_and_text_valid_on_each_date(tmp_path: Path):
    table = make_table(n_symbols=6, n_days=80, gaps=False, late_every=0)
    switch = table.frame["date"].iloc[40]
    first = table.frame["date"].min()
    instruments = pd.DataFrame(
        {
            "symbol": ["SYM000", "SYM000", *[f"SYM00{i}" for i in range(1, 6)]],
            "start_date": [first, switch, *[pd.NaT] * 5],
            "end_date": [switch - pd.Timedelta(days=1), pd.NaT, *[pd.NaT] * 5],
            "industry": ["Energy", "Tech", "Banks", "Tech", "", "Banks", "Tech"],
            "index": ["", "CSI300", "", "", "", "", ""],
            "description": ["old", "new", "b", "c", "", "e", "f"],
        }
    )
    keys = [("SYM000", first), ("SYM000", switch)] + [(f"SYM00{i}", None) for i in range(1, 6)]
    vectors = np.arange(len(keys) * 3, dtype=np.float32).reshape(len(keys), 3) + 1.0
    text = SimpleNamespace(
        symbols=[k[0] for k in keys],
        starts=[f"{k[1]:%Y-%m-%d}" if k[1] is not None else "" for k in keys],
        vectors=vectors,
        has_text=np.array([True, True, True, True, False, True, True]),
    )
    vectors[4] = 0.0
    shards = ShardsSection(window=5, n_shards=2)
    frame, names, stats, splits = table.frame, table.feature_names, table.stats, table.split_dates
    path = build_shards(frame, names, stats, splits, instruments, text, shards, tmp_path, "h")
    info = ShardSetInfo.open(path)
    dataset = ShardedWindowDataset(
        info, None, batch_size=1000, min_valid_days=1, dates=table.frame["date"].unique()
    )
    seen = {}
    for batch in dataset:
        names = info.symbol_names(batch["symbol"])
        for i in np.flatnonzero(names == "SYM000"):
            day = days_to_dates(batch["date"][i : i + 1])[0]
            seen[day] = (
                info.industries[int(batch["industry"][i])],
                info.indices[int(batch["index"][i])],
                batch["text"][i].numpy().copy(),
            )
    switch_day = np.datetime64(switch.date(), "D")
    before = [v for d, v in seen.items() if d < switch_day]
    after = [v for d, v in seen.items() if d >= switch_day]
    assert before and after
    assert {(v[0], v[1]) for v in before} == {("Energy", "")}
    assert {(v[0], v[1]) for v in after} == {("Tech", "CSI300")}
    assert all(np.array_equal(v[2], vectors[0]) for v in before)
    assert all(np.array_equal(v[2], vectors[1]) for v in after)
    assert info.industries[info.symbol_industry[0]] == "Tech"  # the side table shows the latest


def test_undated_fields_are_reported_as_static_in_notes_tags_and_summary(
    tmp_path: Path, mlflow_uri
):
    bars = make_bars_file(tmp_path)
    pd.DataFrame({"symbol": ["AAA"], "sector": ["Tech"], "description": ["Chips."]}).to_csv(
        tmp_path / "inst.csv", index=False
    )
    cfg = PipelineConfig(
        work_dir=str(tmp_path / "work"),
        data={
            "source": "files",
            "bars_path": str(bars),
            "instruments_path": str(tmp_path / "inst.csv"),
        },
        shards={"window": 10},
        loader={"min_valid_days": 5},
        tracking={"tracking_uri": mlflow_uri, "experiment": "pit"},
    )
    market = load_market(cfg.data, 11)
    facts = market_facts(market, cfg.data)
    assert facts["static_fields"] == ["industry", "description"]
    (note,) = [n for n in data_notes(facts) if "point-in-time" in n]
    assert note.startswith(
        "industry, description: static over the whole history, not point-in-time"
    )
    from alphaloom.tasks.data.ingest import run_ingest_stage

    ref = run_ingest_stage(cfg)
    assert ref == ingest_location(cfg)
    run_id = start_run(cfg)
    notes = log_data_quality(TrackedRun.of(cfg, run_id), ref)
    run = client_for(cfg).get_run(run_id)
    assert run.data.tags[TAG_POINT_IN_TIME] == "false"
    assert run.data.tags[TAG_STATIC_FIELDS] == "industry, description"
    assert run.data.metrics["data/invalid_rows"] == 0.0
    assert run.data.metrics["data/rows_read"] == 30.0
    artifacts = [a.path for a in client_for(cfg).list_artifacts(run_id, "data")]
    assert artifacts == ["data/validation_report.csv"]
    markdown = summary_markdown(
        {"run_id": run_id, "run_url": "u", "metrics": {}, "data_notes": notes}
    )
    assert "## Input data" in markdown and "not point-in-time" in markdown
