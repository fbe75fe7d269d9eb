"""Walk-forward backtest: periods that tile the history with purge gaps, the period table from
the concatenated out-of-sample predictions, and the flow end to end with a crash and a resume."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from alphaloom.tasks.backtest import report
from alphaloom.tasks.backtest.periods import BacktestError, period_config, plan_periods
from alphaloom.tasks.common.config import EvaluateSection, SplitSection, load_config
from alphaloom.tasks.data.splits import assign_splits
from alphaloom.tasks.evaluation.metrics import ic_metrics, long_short_returns
from alphaloom.tasks.evaluation.neutral import neutral_daily_rank_ic
from alphaloom.tasks.evaluation.portfolio import topk_dropout_metrics, topk_dropout_returns
from alphaloom.tasks.evaluation.smoothing import smooth_scores

REPO = Path(__file__).resolve().parent.parent
CALENDAR = pd.bdate_range("2019-01-01", periods=700)


def config(*extra: str):
    return load_config(REPO / "configs" / "smoke.yaml", list(extra))


def _index(day) -> int:
    return int(CALENDAR.get_loc(pd.Timestamp(day)))


def test_train_start_leaves_earlier_days_in_no_split() -> None:
    dates = pd.Series(CALENDAR[:100])
    splits = SplitSection(train_start="2019-02-01", train_end="2019-03-29", valid_end="2019-04-30")
    codes, bounds = assign_splits(dates, splits, horizon=1)
    assert bounds["train"] == ["2019-02-01", "2019-03-29"]
    early = (dates < pd.Timestamp("2019-02-01")).to_numpy()
    assert early.any() and (codes[early] == -1).all()
    assert (codes[~early & (dates <= pd.Timestamp("2019-03-29")).to_numpy()] == 0).all()
    with pytest.raises(ValueError, match="train_start"):
        SplitSection(train_start="2019-03-01", train_end="2019-02-01")


@pytest.mark.parametrize("window", ["expanding", "rolling"])
def test_periods_tile_the_history_with_purge_gaps(window: str) -> None:
    cfg = config(
        f"backtest.window={window}",
        "backtest.retrain_months=3",
        "backtest.train_months=12",
        "backtest.valid_months=2",
        "backtest.min_test_days=1",
    )
    periods = plan_periods(CALENDAR, cfg)
    purge = cfg.features.label.horizon + 1
    assert periods[0].test_start == pd.Timestamp("2020-03-02").date()  # 1st trading day >= +14 m
    assert periods[-1].test_end == CALENDAR[-3].date()  # the last day with a known return
    for before, after in itertools.pairwise(periods):
        assert _index(after.test_start) == _index(before.test_end) + 1  # contiguous, disjoint
    for period in periods:
        assert period.test_start.month in (3, 6, 9, 12) and period.test_start.day <= 3
        assert _index(period.test_start) - _index(period.valid_end) - 1 == purge
        assert _index(period.valid_start) - _index(period.train_end) - 1 == purge
        months_before = (period.test_start.year - period.valid_start.year) * 12 + (
            period.test_start.month - period.valid_start.month
        )
        assert months_before == 2
        if window == "expanding":
            assert period.train_start == CALENDAR[0].date()
        else:
            span = pd.Timestamp(period.valid_start) - pd.Timestamp(period.train_start)
            assert abs(span.days - 365) <= 4  # 12 months before the validation span
        # the period's config gives the pipeline's split machinery exactly these days
        pcfg = period_config(cfg, period)
        _, bounds = assign_splits(pd.Series(CALENDAR), pcfg.features.splits, 1)
        assert bounds["train"] == [str(period.train_start), str(period.train_end)]
        assert bounds["valid"] == [str(period.valid_start), str(period.valid_end)]
        assert bounds["test"] == [str(period.test_start), str(period.test_end)]


def test_a_short_last_period_joins_the_previous_and_impossible_plans_are_named() -> None:
    # periods start 2020-04-01, 07-01, ... (12 + 3 months after 2019-01-01); 2021-07 has
    # 5 trading days up to the 7th (kept at min_test_days=5) and 4 up to the 6th (too short)
    kept = plan_periods(CALENDAR, config("backtest.end=2021-07-07", "backtest.min_test_days=5"))
    assert kept[-1].test_start == pd.Timestamp("2021-07-01").date()
    assert kept[-1].test_end == pd.Timestamp("2021-07-07").date()
    joined = plan_periods(CALENDAR, config("backtest.end=2021-07-06", "backtest.min_test_days=5"))
    assert len(joined) == len(kept) - 1  # no retrain of its own ...
    assert joined[-1].test_start == kept[-2].test_start
    assert joined[-1].test_end == pd.Timestamp("2021-07-06").date()  # ... but its days are scored
    assert joined[:-1] == kept[:-2]
    short = ("backtest.end=2021-07-06", "backtest.min_test_days=5")
    dropped = plan_periods(CALENDAR, config(*short, "backtest.short_last_period=drop"))
    assert [p.test_end for p in dropped][-1] == pd.Timestamp("2021-06-30").date()
    assert len(dropped) == len(joined)
    # by default (21 days) the 5 days of July join June's period too
    by_default = plan_periods(CALENDAR, config("backtest.end=2021-07-07"))
    assert by_default[-1].test_end == kept[-1].test_end and len(by_default) == len(kept) - 1
    too_early = config("backtest.start=2019-02-01")
    with pytest.raises(BacktestError, match=r"backtest.start=2019-02-01.*valid_months"):
        plan_periods(CALENDAR, too_early)
    with pytest.raises(BacktestError, match="no period to score"):
        plan_periods(CALENDAR, config("backtest.start=2030-01-01"))


# ----------------------------------------------------------------------------------------------
# the table


def _predictions(days: pd.DatetimeIndex, seed: int, skill: float) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    symbols = [f"S{i:02d}" for i in range(30)]
    frame = pd.DataFrame(
        [(s, d) for d in days for s in symbols], columns=["symbol", "date"]
    ).assign(fwd_return=lambda f: rng.normal(0, 0.02, len(f)))
    frame["score"] = skill * frame["fwd_return"] + rng.normal(0, 0.02, len(frame))
    for k in range(4):
        frame[f"p{k}"] = 0.25
    frame["label"] = 0
    return frame


def test_period_rows_are_the_evaluation_metrics_of_the_concatenated_predictions() -> None:
    days = pd.bdate_range("2021-01-04", periods=40)
    periods = [
        {"number": 1, "test_start": days[0].date(), "test_end": days[19].date()},
        {"number": 2, "test_start": days[20].date(), "test_end": days[39].date()},
    ]
    preds = {"network": _predictions(days, 0, 0.8), "lightgbm": _predictions(days, 1, 0.3)}
    evaluate = EvaluateSection(long_short_quantile=0.2, cost_bps=10.0, smoothing_half_life=0.0)
    table = report.period_rows(periods, preds, evaluate).set_index("period")
    network = preds["network"]
    second = network[network["date"] >= days[20]]
    assert table.loc["all", "network_rank_ic"] == pytest.approx(ic_metrics(network)["rank_ic"])
    assert table.loc["2", "network_rank_ic"] == pytest.approx(ic_metrics(second)["rank_ic"])
    assert table.loc["2", "days"] == 20 and table.loc["all", "days"] == 40
    # period 2's first day pays for turning period 1's book into its own, not for a new book
    whole = long_short_returns(network, 0.2, 10.0)
    alone = long_short_returns(second, 0.2, 10.0)
    assert table.loc["2", "network_ls_turnover"] == pytest.approx(whole["turnover"][20:].mean())
    assert table.loc["2", "network_ls_turnover"] != pytest.approx(alone["turnover"].mean())
    assert table.loc["2", "network_ls_ann_return"] == pytest.approx(whole["net"][20:].mean() * 252)
    daily = [
        ic_metrics(frame[frame["date"] == day])["rank_ic"]
        for day in days
        for frame in (preds["network"], preds["lightgbm"])
    ]
    diff = np.asarray(daily[0::2]) - np.asarray(daily[1::2])
    assert table.loc["all", "rank_ic_difference"] == pytest.approx(diff.mean())
    t = diff.mean() / (diff.std(ddof=1) / math.sqrt(len(diff)))
    assert table.loc["all", "rank_ic_difference_t"] == pytest.approx(t)
    assert table.loc["all", "network_rank_ic"] > table.loc["all", "lightgbm_rank_ic"]

    markdown = report.backtest_markdown(table.reset_index(), config())
    lines = markdown.splitlines()
    assert "network Rank IC" in lines[2] and "LightGBM Rank IC" in lines[2]
    assert [line.split("|")[1].strip() for line in lines[4:]] == ["1", "2", "**all**"]
    assert f"{table.loc['all', 'network_rank_ic']:.4f}" in lines[-1]


def _exposures(preds: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Random factor exposures and three industries for every scored (symbol, date)."""
    rng = np.random.default_rng(seed)
    frame = preds[["symbol", "date"]].drop_duplicates().reset_index(drop=True)
    for column in ("vol20", "log_dollar_volume", "reversal5"):
        frame[column] = rng.normal(size=len(frame))
    frame["industry"] = "I" + (frame["symbol"].str[1:].astype(int) % 3).astype(str)
    return frame


def test_the_strategy_columns_are_the_building_blocks_on_the_smoothed_concatenation() -> None:
    days = pd.bdate_range("2021-01-04", periods=40)
    periods = [
        {"number": 1, "test_start": days[0].date(), "test_end": days[19].date()},
        {"number": 2, "test_start": days[20].date(), "test_end": days[39].date()},
    ]
    preds = {"network": _predictions(days, 0, 0.8), "lightgbm": _predictions(days, 1, 0.3)}
    exposures = _exposures(preds["network"], 2)
    # the score loads on the volatility exposure, so neutralising it changes the Rank IC
    network = preds["network"].merge(exposures[["symbol", "date", "vol20"]], how="left")
    preds["network"]["score"] += 0.02 * network["vol20"].to_numpy()
    cfg = EvaluateSection(long_short_quantile=0.2, topk=5, n_drop=2, smoothing_half_life=3.0)
    table = report.period_rows(periods, preds, cfg, exposures=exposures).set_index("period")
    raw = report.period_rows(
        periods, preds, cfg.model_copy(update={"smoothing_half_life": 0.0})
    ).set_index("period")

    for model, frame in preds.items():
        traded = smooth_scores(frame, 3.0)  # over both periods: period 2 has period 1's past
        daily = topk_dropout_returns(traded, 5, 2, 10.0)
        for name, rows in (("2", daily.iloc[20:]), ("all", daily)):
            expected = topk_dropout_metrics(rows, 252)
            for key in report.TOPK_COLUMNS:
                assert table.loc[name, f"{model}_{key}"] == pytest.approx(expected[key]), key
        second = traded[traded["date"] >= days[20]]
        alone = topk_dropout_returns(smooth_scores(frame[frame["date"] >= days[20]], 3.0), 5, 2, 10)
        assert topk_dropout_returns(second, 5, 2, 10.0)["long_turnover"].iloc[0] == pytest.approx(
            alone["long_turnover"].iloc[0]
        )  # both start from an empty book: only the scores differ ...
        assert table.loc["2", f"{model}_topk_excess_turnover"] != pytest.approx(
            topk_dropout_metrics(alone, 252)["topk_excess_turnover"]
        )  # ... and the table's period 2 inherits period 1's book and smoothed history
        decile = long_short_returns(traded, 0.2, 10.0)
        assert table.loc["all", f"{model}_ls_turnover"] == pytest.approx(decile["turnover"].mean())
        neutral = neutral_daily_rank_ic(frame, exposures)
        assert table.loc["all", f"{model}_rank_ic_neutral"] == pytest.approx(neutral.mean())
        assert table.loc["2", f"{model}_rank_ic_neutral"] == pytest.approx(neutral.iloc[20:].mean())
        # smoothing moves the books, never the model's own Rank IC
        assert table.loc["all", f"{model}_rank_ic"] == raw.loc["all", f"{model}_rank_ic"]
        assert table.loc["all", f"{model}_ls_turnover"] < raw.loc["all", f"{model}_ls_turnover"]
    assert table.loc["all", "network_rank_ic_neutral"] != pytest.approx(
        table.loc["all", "network_rank_ic"]
    )
    assert "network_rank_ic_neutral" not in raw  # no exposures, no neutral column

    cfg_all = config("evaluate.topk=5", "evaluate.n_drop=2", "evaluate.smoothing_half_life=3")
    markdown = report.backtest_markdown(table.reset_index(), cfg_all)
    header, *_, last = markdown.splitlines()[2:]
    assert "network TopK net excess ann. (IR)" in header and "LightGBM neutral Rank IC" in header
    cells = [cell.strip() for cell in last.split("|")]
    all_row = table.loc["all"]
    excess = f"{all_row['network_topk_excess_ann_return_net']:.3f}"
    assert f"{excess} ({all_row['network_topk_excess_ir_net']:.2f})" in cells
    assert f"{all_row['lightgbm_topk_ls_sharpe_net']:.2f}" in cells
    assert f"{all_row['network_rank_ic_neutral']:.4f}" in cells
    assert "holding 5, replacing at most 2" in markdown and "half-life 3 days" in markdown

    flat, steps = report.parent_metrics(table.reset_index())
    assert flat["test/topk_excess_ir_net"] == all_row["network_topk_excess_ir_net"]
    assert flat["test/lightgbm_topk_ls_sharpe_net"] == all_row["lightgbm_topk_ls_sharpe_net"]
    assert flat["test/rank_ic_neutral"] == all_row["network_rank_ic_neutral"]
    assert flat["test/rank_ic_smoothed"] == all_row["network_rank_ic_smoothed"]
    step_2 = dict(steps)[2]
    assert (
        step_2["period/network_topk_excess_turnover"]
        == table.loc["2", "network_topk_excess_turnover"]
    )
    assert "period/lightgbm_rank_ic_neutral" in step_2

    series = {m: report.daily_series(f, cfg, exposures) for m, f in preds.items()}
    figure = report.backtest_figure(table.reset_index(), series)
    line = figure.axes[2].lines[0]
    np.testing.assert_allclose(
        line.get_ydata(), series["network"].topk["excess_net"].cumsum().to_numpy()
    )


def test_a_model_missing_from_some_period_is_left_out_of_the_table() -> None:
    days = pd.bdate_range("2021-01-04", periods=10)
    loaded = [
        ({"period": {"number": 1}}, {"network": _predictions(days[:5], 0, 1.0)}),
        (
            {"period": {"number": 2}},
            {"network": _predictions(days[5:], 0, 1.0), "lightgbm": _predictions(days[5:], 1, 1)},
        ),
    ]
    periods, preds = report.concatenate(loaded)
    assert list(preds) == ["network"] and len(preds["network"]) == 300
    assert preds["network"]["period"].tolist() == [1] * 150 + [2] * 150
    assert [p["number"] for p in periods] == [1, 2]


# ----------------------------------------------------------------------------------------------
# the flow


FAST = [
    "data.synthetic.n_symbols=30",
    "data.synthetic.n_days=320",
    "shards.n_shards=2",
    "train.epochs=2",
    "train.max_batches_per_epoch=3",
    "train.device=cpu",
    "train.num_threads=1",
    "model.use_attention=false",
    "backtest.retrain_months=2",
    "backtest.train_months=6",
    "backtest.valid_months=2",
    "backtest.end=2020-02-28",
    "runner.fit_workers=1",
    "backtest.lightgbm_params={max_rounds: 15, min_data_in_leaf: 20}",
]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_backtest_flow_resumes_after_a_crash_and_a_dask_cluster_gives_the_same_table(
    tmp_path: Path, mlflow_uri: str, monkeypatch
) -> None:
    from alphaloom.flows.backtest import backtest
    from alphaloom.tasks.comparison.baselines import lightgbm_available
    from alphaloom.tasks.training.progress import ProgressReporter
    from tests.test_flows import run_with_states

    cfg = config(*FAST, f"work_dir={tmp_path / 'work'}", f"tracking.tracking_uri={mlflow_uri}")
    report_epoch = ProgressReporter.__call__

    def crash_after_period_2_epoch_1(self, event):  # after its checkpoint, as a power cut would
        report_epoch(self, event)
        if event.phase == "epoch" and self.label.startswith("period 2/"):
            raise RuntimeError("power cut during period 2")

    monkeypatch.setattr(ProgressReporter, "__call__", crash_after_period_2_epoch_1)
    with pytest.raises(RuntimeError, match="power cut"):
        backtest(config=cfg)
    monkeypatch.setattr(ProgressReporter, "__call__", report_epoch)
    client = mlflow.MlflowClient(mlflow_uri)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        filter_string="tags.`alphaloom.kind` = 'backtest'",
    )
    assert parent.info.status == "FAILED"
    summary, states = run_with_states(backtest, cfg)
    assert summary["parent_run_id"] == parent.info.run_id  # the same parent, continued
    # a failed period does not stop the others: period 3 finished in the crashed run
    assert states["period1"] == states["period3"] == "Cached" and states["period2"] == "Completed"
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"

    table = pd.DataFrame(summary["table"])
    n_periods = len(table) - 1
    assert n_periods == 3 and table["period"].tolist() == ["1", "2", "3", "all"]
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    models = ["network", "lightgbm"] if lightgbm_available() else ["network"]
    by_period = {
        (run.data.tags["alphaloom.period"], run.data.tags["alphaloom.backtest_model"])
        for run in children
    }
    assert len(children) == len(by_period) == n_periods * len(models)  # period 2 continued
    assert all(run.info.status == "FINISHED" for run in children)
    assert all("test/rank_ic" in run.data.metrics for run in children)
    (period_2,) = [r for r in children if r.data.tags["alphaloom.period"] == "2"
                   and r.data.tags["alphaloom.backtest_model"] == "network"]  # fmt: skip
    epochs = client.get_metric_history(period_2.info.run_id, "valid/rank_ic")
    assert sorted(m.step for m in epochs) == [0, 1]  # resumed at epoch 2, not trained again

    metrics = client.get_run(parent.info.run_id).data.metrics
    assert metrics["test/rank_ic"] == pytest.approx(table.iloc[-1]["network_rank_ic"])
    # the flow passes the market's exposures: the neutral Rank IC is in the table and the run
    assert table["network_rank_ic_neutral"].notna().all()
    assert metrics["test/rank_ic_neutral"] == pytest.approx(
        table.iloc[-1]["network_rank_ic_neutral"]
    )
    assert "test/topk_excess_turnover" in metrics and "test/topk_ls_sharpe_net" in metrics
    if lightgbm_available():
        assert "test/lightgbm_rank_ic" in metrics and "test/rank_ic_difference_t" in metrics
    network = pd.read_parquet(
        client.download_artifacts(parent.info.run_id, "predictions/network.parquet", tmp_path)
    )
    assert sorted(network["period"].unique()) == [1, 2, 3]
    assert not network.duplicated(["symbol", "date"]).any()
    first = pd.Timestamp(table.iloc[0]["test_start"])
    assert network["date"].min() >= first  # nothing before the first period is scored
    assert report.markdown_of_run(cfg, parent.info.run_id) == summary["markdown"]

    # the same backtest with its periods on a Dask LocalCluster of 2 worker processes, from
    # scratch (its own work dir and store): every period trained there, the same table
    pytest.importorskip("prefect_dask")
    dask_store = f"sqlite:///{tmp_path / 'dask.db'}"
    mlflow.MlflowClient(dask_store).search_experiments()  # created once, before workers share it
    dask = config(
        *FAST,
        f"work_dir={tmp_path / 'dask'}",
        f"tracking.tracking_uri={dask_store}",
        "runner.kind=dask",
        "runner.fit_workers=2",
    )
    fanned, dask_states = run_with_states(backtest, dask)
    assert [dask_states[f"period{n}"] for n in (1, 2, 3)] == ["Completed"] * 3
    on_dask = pd.DataFrame(fanned["table"])
    numeric = [c for c in table.columns if pd.api.types.is_float_dtype(table[c])]
    assert "network_rank_ic" in numeric and table["network_rank_ic"].notna().all()
    pd.testing.assert_frame_equal(table[numeric], on_dask[numeric])  # every cell, every period


def test_backtest_table_of_an_unknown_run_exits_2_and_says_why(mlflow_uri: str, capsys) -> None:
    from alphaloom.flows.cli import main

    code = main(["backtest", "--table", "0123abcd", "--set", f"tracking.tracking_uri={mlflow_uri}"])
    assert code == 2
    assert "run 0123abcd" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_backtest_command_names_an_impossible_plan(tmp_path: Path, mlflow_uri: str, capsys) -> None:
    from alphaloom.flows.cli import main

    sets = [
        *FAST,
        f"work_dir={tmp_path / 'work'}",
        "backtest.end=null",
        "backtest.start=2030-01-01",
    ]
    args = ["backtest", "--config", str(REPO / "configs" / "smoke.yaml")]
    assert main([*args, *(t for item in sets for t in ("--set", item))]) == 2
    assert "no period to score" in capsys.readouterr().err
