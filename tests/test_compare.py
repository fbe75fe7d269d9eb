"""Baselines and ablations side by side: variant configs, LightGBM baseline, table, flow.

Unit tests use hand-made outcomes and a tiny shard set; the two flow tests share one smoke-sized
work dir (so the second reuses the cached data stages) and train each variant for a few batches.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from alphaloom.tasks.common.config import ConfigError, load_config
from alphaloom.tasks.comparison.compare import VariantFailed, VariantOutcome
from alphaloom.tasks.comparison.summary import (
    comparison_csv,
    comparison_markdown,
    oracle_rank_ic,
    summarise,
)
from alphaloom.tasks.comparison.variants import (
    DEFAULT_VARIANTS,
    CompareError,
    Variant,
    load_variants,
    seed_list,
    variant_config,
)
from tests.helpers_train import build_tiny_shards

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"
FAST = [
    "train.epochs=1",
    "train.max_batches_per_epoch=2",
    "train.num_threads=1",
    "train.device=cpu",
]
DEFAULT = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
TINY_LGBM = {  # Qlib's L1 of 205 leaves a tiny market's trees without a split
    "max_rounds": 12, "early_stopping_rounds": 4, "num_leaves": 7, "min_data_in_leaf": 20,
    "lambda_l1": 0.0, "lambda_l2": 10.0,
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# variants as data


def test_default_variants_cover_the_grid_and_each_changes_the_default():
    """Every idea is separable: each network variant differs from the default config (a
    variant that changes nothing would report a fake zero effect), and says what it means."""
    cfg = load_config(DEFAULT)
    names = {v.name for v in DEFAULT_VARIANTS}
    assert {"full", "no_attention", "no_text", "no_industry", "no_index", "no_calendar"} <= names
    assert {
        "cross_entropy", "ce_alpha", "focal", "focal_alpha", "no_focal", "no_distance",
        "no_rank", "symmetric_alpha", "softmax_head", "softmax_class_values",
        "softmax_cross_entropy", "previous_default", "blend_lightgbm", "lightgbm",
    } <= names  # fmt: skip
    by_name = {v.name: variant_config(cfg, v, cfg.train.seed) for v in DEFAULT_VARIANTS}
    assert by_name["full"].model_dump() == cfg.model_dump()
    for variant in DEFAULT_VARIANTS:
        if variant.kind == "network" and variant.name != "full":
            assert by_name[variant.name].model_dump() != cfg.model_dump(), variant.name
        assert variant.description, variant.name
    ce = by_name["cross_entropy"]
    assert ce.loss.kind == "cross_entropy" and ce.loss.rank_weight == 0
    assert ce.model.model_dump() == cfg.model.model_dump()  # the same network
    assert by_name["ce_alpha"].loss.gamma == 0 and by_name["ce_alpha"].loss.alpha == "batch"
    assert by_name["focal"].loss.alpha is None and by_name["focal"].loss.kind == "focal"
    assert by_name["no_rank"].loss.rank_weight == 0
    assert by_name["no_focal"].loss.gamma == 0 and by_name["no_focal"].loss.rank_weight > 0
    previous = by_name["previous_default"]
    assert (previous.model.head, previous.loss.gamma, previous.loss.alpha) == (
        "softmax",
        2,
        "batch",
    )
    assert by_name["softmax_class_values"].model.score == "class_values"
    assert not by_name["no_attention"].model.use_attention
    assert variant_config(cfg, DEFAULT_VARIANTS[1], seed=11).train.seed == 11


def test_bad_override_names_the_variant_and_key():
    cfg = load_config(SMOKE)
    with pytest.raises(ConfigError, match=r"variant 'oops'.*model\.use_atention"):
        variant_config(cfg, Variant(name="oops", overrides=("model.use_atention=false",)), 0)


def test_seed_list_counts_from_train_seed():
    cfg = load_config(SMOKE, ["train.seed=5"])
    assert seed_list(cfg, 3) == [5, 6, 7]
    with pytest.raises(CompareError, match="seeds"):
        seed_list(cfg, 0)


def test_load_variants_yaml(tmp_path):
    good = tmp_path / "variants.yaml"
    good.write_text(
        "- name: full\n"
        "- name: small\n  overrides: ['model.lstm_hidden=8']\n"
        "- name: gbm\n  kind: lightgbm\n  params: {num_leaves: 15}\n"
    )
    variants = load_variants(good)
    assert [v.name for v in variants] == ["full", "small", "gbm"]
    picked = tmp_path / "picked.yaml"
    picked.write_text("- full\n- no_rank\n- name: mine\n  overrides: ['loss.gamma=3']\n")
    assert [v.overrides for v in load_variants(picked)] == [
        (),
        ("loss.rank_weight=0",),
        ("loss.gamma=3",),
    ]
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("- full\n- no_rnak\n")
    with pytest.raises(CompareError, match=r"#2: 'no_rnak' is not a built-in variant.*no_rank"):
        load_variants(unknown)
    assert variants[1].overrides == ("model.lstm_hidden=8",)
    assert variants[2].params == {"num_leaves": 15}
    dup = tmp_path / "dup.yaml"
    dup.write_text("- name: a\n- name: a\n")
    with pytest.raises(CompareError, match=r"repeated: \['a'\]"):
        load_variants(dup)
    typo = tmp_path / "typo.yaml"
    typo.write_text("- name: a\n  overides: []\n")
    with pytest.raises(CompareError, match=r"typo\.yaml: variant #1: 'overides'"):
        load_variants(typo)
    with pytest.raises(CompareError, match="not found"):
        load_variants(tmp_path / "missing.yaml")
    stray = tmp_path / "stray.yaml"
    stray.write_text("- name: net\n  params: {num_leaves: 3}\n")
    with pytest.raises(CompareError, match="lightgbm"):
        load_variants(stray)


def test_cli_rejects_bad_seeds_and_variant_files_before_running(tmp_path, capsys):
    from alphaloom.flows.cli import main

    assert main(["compare", "--config", str(SMOKE), "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: not-a-list\n")
    assert main(["compare", "--config", str(SMOKE), "--variants", str(bad)]) == 2
    assert "expected a non-empty list" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the table


def _outcome(name: str, seed: int, rank_ic: float, **extra: float) -> VariantOutcome:
    metrics = {"test/rank_ic": rank_ic, "test/oracle_rank_ic": 0.2, "valid/rank_ic": rank_ic / 2}
    return VariantOutcome(name, seed, "finished", f"run-{name}-{seed}", {**metrics, **extra})


def test_summary_rows_mean_std_and_paired_gain():
    variants = [Variant(name="full"), Variant(name="abl"), Variant(name="gbm", kind="lightgbm")]
    full, abl = [0.10, 0.12, 0.08], [0.05, 0.10, 0.09]
    outcomes = [_outcome("full", s, v) for s, v in enumerate(full)]
    outcomes += [_outcome("abl", s, v) for s, v in enumerate(abl)]
    rows = summarise(variants, outcomes, skipped={"gbm": "LightGBM is not installed"})
    assert [r["variant"] for r in rows] == ["full", "abl", "gbm"]
    full_row, abl_row, gbm_row = rows
    assert full_row["test/rank_ic_mean"] == pytest.approx(np.mean(full))
    assert full_row["test/rank_ic_std"] == pytest.approx(np.std(full, ddof=1))
    diffs = np.subtract(full, abl)
    assert abl_row["gain_mean"] == pytest.approx(diffs.mean())
    assert abl_row["gain_std"] == pytest.approx(diffs.std(ddof=1))
    assert abl_row["gain_n"] == 3
    assert math.isnan(full_row["gain_mean"])
    assert gbm_row["status"] == "skipped" and "not installed" in gbm_row["error"]
    assert oracle_rank_ic(outcomes) == pytest.approx(0.2)


def test_failed_seed_is_dropped_from_pairs_and_marks_the_row():
    variants = [Variant(name="full"), Variant(name="abl")]
    outcomes = [_outcome("full", s, 0.1 + s / 100) for s in range(3)]
    outcomes += [_outcome("abl", 0, 0.05), _outcome("abl", 2, 0.07)]
    outcomes.append(VariantOutcome("abl", 1, "failed", "run-x", error="RuntimeError: boom"))
    rows = summarise(variants, outcomes)
    abl = rows[1]
    assert abl["status"] == "failed" and "boom" in abl["error"]
    assert (abl["seeds_ok"], abl["seeds_failed"], abl["gain_n"]) == (2, 1, 2)
    assert abl["gain_mean"] == pytest.approx(np.mean([0.10 - 0.05, 0.12 - 0.07]))
    markdown = comparison_markdown(rows, [0, 1, 2], oracle=0.2)
    table = [line for line in markdown.splitlines() if line.startswith("| `")]
    assert len(table) == len(variants)
    assert "failed (1/3): RuntimeError: boom" in table[1]
    assert "oracle" in markdown and "0.2000" in markdown
    csv = pd.read_csv(pd.io.common.StringIO(comparison_csv(rows)))
    assert list(csv["variant"]) == ["full", "abl"]
    assert list(csv["status"]) == ["ok", "failed"]


def test_variant_failed_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(VariantFailed("abl", 3, "run-1", "ValueError: x")))
    assert (err.variant, err.seed, err.run_id, err.cause) == ("abl", 3, "run-1", "ValueError: x")


# ----------------------------------------------------------------------------------------------
# the LightGBM baseline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_shards(tmp_path_factory.mktemp("tiny-shards"))


def test_end_day_table_is_the_loaders_end_day(tiny):
    from alphaloom.tasks.comparison.baselines import end_day_table
    from alphaloom.tasks.evaluation.predictions import eval_dataset

    table = end_day_table(tiny.shard_dir, "valid", tiny.cfg.loader.min_valid_days)
    xs, symbols, dates = [], [], []
    for batch in eval_dataset(tiny.shard_dir, "valid", tiny.cfg):
        xs.append(batch["x"][:, -1, :])
        symbols.append(batch["symbol"])
        dates.append(batch["date"])
    loader_x = torch.cat(xs).numpy()
    loader_keys = pd.DataFrame({"d": torch.cat(dates).numpy(), "s": torch.cat(symbols).numpy()})
    table_keys = pd.DataFrame({"d": table.date, "s": table.symbol})
    pd.testing.assert_frame_equal(table_keys, loader_keys, check_dtype=False)
    np.testing.assert_array_equal(table.x, loader_x)


def test_rank_normalised_target_and_queries():
    from alphaloom.tasks.comparison.baselines import BaselineError, query_sizes, rank_normalised

    days = np.repeat([0, 1, 2], 50)
    values = np.random.default_rng(0).standard_normal(150)
    target = rank_normalised(values, days)
    for day in range(3):
        part = days == day
        assert np.array_equal(np.argsort(target[part]), np.argsort(values[part]))
        assert abs(target[part].mean()) < 1e-9
    assert target.std() == pytest.approx(1.0, abs=0.05)
    assert query_sizes(days).tolist() == [50, 50, 50]
    with pytest.raises(BaselineError, match="sorted by date"):
        query_sizes(days[::-1])


def test_bucket_probabilities_follow_class_shares():
    from alphaloom.tasks.comparison.baselines import bucket_probabilities
    from alphaloom.tasks.evaluation.metrics import PROB_COLUMNS

    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {"date": np.repeat(pd.date_range("2024-01-01", periods=4), 20), "score": rng.random(80)}
    )
    out = bucket_probabilities(frame, np.array([0.3, 0.3, 0.3, 0.1]))
    probs = out[PROB_COLUMNS].to_numpy()
    assert np.array_equal(probs.sum(axis=1), np.ones(80))
    classes = probs.argmax(axis=1)
    for _, day in out.assign(k=classes).groupby("date"):
        assert np.bincount(day["k"], minlength=4).tolist() == [6, 6, 6, 2]
        ordered = day.sort_values("score")["k"].to_numpy()
        assert np.all(np.diff(ordered) >= 0)  # a higher score never gets a lower class


@pytest.mark.parametrize(
    ("objective", "stop_on"),
    [("regression", "loss"), ("regression", "rank_ic"), ("lambdarank", "loss")],
)
def test_lightgbm_baseline_scores_the_networks_rows(tiny, objective, stop_on):
    from alphaloom.model.shard_set import ShardSetInfo
    from alphaloom.tasks.comparison.baselines import predict_lightgbm, train_lightgbm
    from alphaloom.tasks.evaluation.evaluate import evaluate_predictions
    from alphaloom.tasks.evaluation.metrics import PRED_COLUMNS
    from alphaloom.tasks.evaluation.predictions import predict
    from alphaloom.tasks.training.train import build_model

    params = {**TINY_LGBM, "objective": objective, "stop_on": stop_on}
    fit = train_lightgbm(tiny.shard_dir, tiny.cfg, params, seed=3)
    assert 1 <= fit.best_iteration <= len(fit.history) <= TINY_LGBM["max_rounds"]
    assert fit.best_val_rank_ic == pytest.approx(fit.history[fit.best_iteration - 1])
    if stop_on == "rank_ic":  # the round with the best validation Rank IC, and no loss curve
        assert fit.best_val_rank_ic == pytest.approx(max(fit.history)) and not fit.loss_history
    else:  # the round with the best validation loss (L2 lowest, NDCG highest)
        assert len(fit.loss_history) == len(fit.history)
        best = np.argmin if objective == "regression" else np.argmax
        assert fit.best_iteration == int(best(fit.loss_history)) + 1
    preds = predict_lightgbm(fit, tiny.shard_dir, "test", tiny.cfg)
    assert list(preds.columns) == PRED_COLUMNS
    metrics, _ = evaluate_predictions(preds, tiny.cfg.evaluate, tiny.oracle, with_figures=False)
    assert math.isfinite(metrics["rank_ic"]) and math.isfinite(metrics["accuracy"])
    if objective == "lambdarank":
        return  # the row and determinism checks below do not depend on the objective
    net = build_model(ShardSetInfo.open(tiny.shard_dir), tiny.cfg)
    reference = predict(net, tiny.shard_dir, "test", tiny.cfg)
    keys = ["symbol", "date", "label", "fwd_return"]
    pd.testing.assert_frame_equal(preds[keys], reference[keys])
    again = predict_lightgbm(
        train_lightgbm(tiny.shard_dir, tiny.cfg, params, seed=3), tiny.shard_dir, "test", tiny.cfg
    )
    np.testing.assert_array_equal(again["score"].to_numpy(), preds["score"].to_numpy())


def test_lightgbm_rejects_unknown_params_and_other_features(tiny, tmp_path):
    from pydantic import ValidationError

    from alphaloom.tasks.comparison.baselines import BaselineError, predict_lightgbm, train_lightgbm

    with pytest.raises(ValidationError, match="num_leafs"):
        train_lightgbm(tiny.shard_dir, tiny.cfg, {"num_leafs": 3})
    fit = train_lightgbm(tiny.shard_dir, tiny.cfg, {**TINY_LGBM, "max_rounds": 2})
    fit.feature_names = [*fit.feature_names[:-1], "SOMETHING_ELSE"]
    with pytest.raises(BaselineError, match="other features"):
        predict_lightgbm(fit, tiny.shard_dir, "test", tiny.cfg)


# ----------------------------------------------------------------------------------------------
# the flow and the command


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    """One work dir for both flow tests: the second reuses the first's cached data stages."""
    return tmp_path_factory.mktemp("compare-work")


def _children(client: mlflow.MlflowClient, parent) -> list:
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        max_results=1000,
    )


def test_compare_flow_children_table_and_failures(prefect_harness, mlflow_uri, work_dir):
    from alphaloom.flows.compare import compare_models

    cfg = load_config(SMOKE, [f"work_dir={work_dir}", *FAST])
    variants = [
        v.model_copy(update={"params": TINY_LGBM}) if v.kind == "lightgbm" else v
        for v in DEFAULT_VARIANTS
    ]
    variants += [
        Variant(name="bad_override", overrides=("model.use_attention=maybe",)),
        Variant(name="bad_heads", overrides=("model.attention_heads=3",)),  # fails in training
    ]
    summary = compare_models(cfg, seeds=1, variants=variants, figures=False)  # plots cost ~1 s each

    client = mlflow.MlflowClient(mlflow_uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = {run.data.tags["alphaloom.variant"]: run for run in _children(client, parent)}
    assert set(children) == {v.name for v in variants}
    failed = {"bad_override", "bad_heads"}
    for name, run in children.items():
        assert run.info.status == ("FAILED" if name in failed else "FINISHED"), name
    assert "use_attention" in children["bad_override"].data.tags["alphaloom.error"]
    assert "attention_heads" in children["bad_heads"].data.tags["alphaloom.error"]

    def eval_keys(run) -> set[str]:
        return {k for k in run.data.metrics if k.split("/")[0] in ("valid", "test")}

    keys = {name: eval_keys(run) for name, run in children.items() if name not in failed}
    assert len({frozenset(k) for k in keys.values()}) == 1, keys
    assert {"test/rank_ic", "test/oracle_rank_ic", "valid/rank_ic"} <= keys["full"]
    for name, run in children.items():
        assert "fit_seconds" in run.data.metrics or name in failed

    rows = {row["variant"]: row for row in summary["rows"]}
    assert list(rows) == [v.name for v in variants]
    for name, row in rows.items():
        assert row["status"] == ("failed" if name in failed else "ok"), (name, row["error"])
    assert summary["failed"] == ["bad_override", "bad_heads"]
    table = [line for line in summary["markdown"].splitlines() if line.startswith("| `")]
    assert len(table) == len(variants)
    assert sum("failed (1/1)" in line for line in table) == 2

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.csv", "rank_ic.png", "variants.yaml"} <= artifacts
    csv_path = client.download_artifacts(parent.info.run_id, "comparison.csv", str(work_dir))
    assert len(pd.read_csv(csv_path)) == len(variants)
    lgbm_rank_ic = children["lightgbm"].data.metrics["test/rank_ic"]
    assert parent.data.metrics["compare/lightgbm/test_rank_ic_mean"] == pytest.approx(lgbm_rank_ic)

    assert client.search_registered_models() == []  # a comparison never registers or promotes
    checkpoints = {
        name: Path(cfg.work_dir) / "checkpoints" / run.info.run_id / "checkpoint.pt"
        for name, run in children.items()
        if name not in failed and name != "lightgbm"
    }
    assert all(path.is_file() for path in checkpoints.values())
    assert len({path.parent for path in checkpoints.values()}) == len(checkpoints)


def test_cli_compare_runs_the_rest_without_lightgbm(
    prefect_harness, mlflow_uri, work_dir, tmp_path, monkeypatch, capsys
):
    from alphaloom.flows.cli import main
    from alphaloom.tasks.comparison import baselines

    monkeypatch.setattr(baselines, "lightgbm_available", lambda: False)
    variants = tmp_path / "variants.yaml"
    variants.write_text("- name: full\n- name: lightgbm\n  kind: lightgbm\n")
    sets = [arg for item in [f"work_dir={work_dir}", *FAST] for arg in ("--set", item)]
    argv = ["compare", "--config", str(SMOKE), "--seeds", "1", "--variants", str(variants)]
    assert main([*argv, *sets]) == 0
    out = capsys.readouterr().out
    assert "LightGBM is not installed" in out and "pip install" in out

    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(load_config(SMOKE).tracking.experiment)
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`alphaloom.kind` = 'compare'"
    )
    children = _children(client, parent)
    assert [run.data.tags["alphaloom.variant"] for run in children] == ["full"]
    plots = {a.path for a in client.list_artifacts(children[0].info.run_id, "plots/test")}
    assert "plots/test/rank_ic_over_time.png" in plots
    csv_path = client.download_artifacts(parent.info.run_id, "comparison.csv", str(tmp_path))
    rows = pd.read_csv(csv_path).set_index("variant")
    assert rows.loc["full", "status"] == "ok"
    assert rows.loc["lightgbm", "status"] == "skipped"
    assert "pip install" in rows.loc["lightgbm", "error"]
