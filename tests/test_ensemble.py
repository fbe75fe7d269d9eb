"""Seed ensembles: the per-day rank average on hand-made frames, K = 1 as the single model, and
member i of a trained ensemble as the single run with seed + i."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from alphaloom.model.ensemble import SeedEnsemble, members_of
from alphaloom.tasks.backtest.periods import Period
from alphaloom.tasks.backtest.retrain import period_location
from alphaloom.tasks.evaluation.ensemble import combine_members
from alphaloom.tasks.evaluation.metrics import EvaluationError
from alphaloom.tasks.evaluation.predictions import eval_dataset, predict
from alphaloom.tasks.orchestration.caching import StageRef
from alphaloom.tasks.serving.ranking import predict as serve
from alphaloom.tasks.training import ensemble
from alphaloom.tasks.training.train import TrainResult, fingerprint, train_model
from tests.helpers_train import TinyData, build_tiny_shards, tiny_config

# ----------------------------------------------------------------------------------------------
# the combination rule on hand-made frames


def frame(scores: dict[str, list[float]], probs: float = 0.25) -> pd.DataFrame:
    """Prediction rows of days "d0", "d1", ... with symbols a, b, c, ... in order."""
    rows = [
        {"symbol": chr(97 + i), "date": pd.Timestamp("2020-01-01") + pd.Timedelta(days=day)}
        | {"score": value, "p0": probs, "p1": 0.25, "p2": 0.25, "p3": 0.5 - probs}
        for day, values in enumerate(scores.values())
        for i, value in enumerate(values)
    ]
    return pd.DataFrame(rows).assign(label=1, fwd_return=0.0)


def test_the_score_is_the_mean_of_per_day_percentile_ranks_over_the_whole_day() -> None:
    a = frame({"d0": [10.0, 20.0, 30.0, 40.0], "d1": [-1.0, -3.0, -2.0, 0.0]}, probs=0.1)
    b = frame({"d0": [0.4, 0.1, 0.2, 0.3], "d1": [5.0, 6.0, 7.0, 8.0]}, probs=0.3)
    out = combine_members([a, b])
    # day 0: a ranks 1,2,3,4 / 4, b ranks 4,1,2,3 / 4; day 1: a 3,1,2,4, b 1,2,3,4 (each / 4)
    expected = [(1 + 4) / 8, (2 + 1) / 8, (3 + 2) / 8, (4 + 3) / 8, (3 + 1) / 8, (1 + 2) / 8]
    expected += [(2 + 3) / 8, (4 + 4) / 8]
    np.testing.assert_allclose(out["score"], expected)
    np.testing.assert_allclose(out["p0"], 0.2)
    np.testing.assert_allclose(out["p3"], 0.3)
    assert out[["symbol", "date", "label", "fwd_return"]].equals(
        a[["symbol", "date", "label", "fwd_return"]]
    )
    # scale-free: multiplying one member's scores leaves the ensemble unchanged
    b10 = b.assign(score=b["score"] * 1e6 - 3)
    np.testing.assert_array_equal(combine_members([a, b10])["score"], out["score"])


def test_a_member_with_the_order_reversed_cancels_and_ranks_ignore_batches() -> None:
    a = frame({"d0": [1.0, 2.0, 3.0, 4.0, 5.0], "d1": [5.0, 1.0, 4.0, 2.0, 3.0]})
    out = combine_members([a, a.assign(score=-a["score"])])
    np.testing.assert_allclose(out["score"], 0.6)  # (r + (n + 1 - r)) / 2n with n = 5
    same = combine_members([a, a, a])
    np.testing.assert_allclose(same["score"], a.groupby("date")["score"].rank(pct=True))
    # rows of one day split across "batches" (the frame's row order) rank as one cross-section
    shuffled = a.sample(frac=1.0, random_state=0)
    mixed = combine_members([shuffled, shuffled]).sort_index()
    np.testing.assert_allclose(mixed["score"], same["score"])


def test_one_member_is_returned_as_it_is_and_other_rows_are_refused() -> None:
    a = frame({"d0": [3.0, 1.0, 2.0]})
    assert combine_members([a]) is a
    with pytest.raises(EvaluationError, match="member 1 scored other rows"):
        combine_members([a, a.iloc[::-1].reset_index(drop=True)])
    with pytest.raises(EvaluationError):
        combine_members([])


# ----------------------------------------------------------------------------------------------
# K = 1 and the keys


def test_one_member_trains_exactly_as_before_and_keys_ignore_the_ensemble_size(tmp_path) -> None:
    cfg = tiny_config()
    calls = []

    def train(*args):
        calls.append(args)
        return "single result"

    assert ensemble.fit_ensemble(train, "shards", cfg, "ckpt", "run") == "single result"
    assert calls == [("shards", cfg, "ckpt", "run")]  # the config itself, untouched

    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    (shard_dir / "manifest.json").write_text("{}")
    three = tiny_config("train.ensemble=3", "train.seed=5")
    single = tiny_config("train.seed=7")
    assert fingerprint(three, shard_dir) == fingerprint(tiny_config("train.seed=5"), shard_dir)
    member = ensemble.member_config(three, 2)
    assert member.train.seed == 7 and member.train.ensemble == 1
    assert member.model_dump() == single.model_dump()
    # a backtest period's key: unchanged for one network, another one for an ensemble
    period = Period(
        number=1, train_start="2019-01-01", train_end="2019-06-28", valid_start="2019-07-03",
        valid_end="2019-08-30", test_start="2019-09-04", test_end="2019-10-31",
    )  # fmt: skip
    shards = StageRef(stage="shards", path=str(shard_dir), key="k")
    keys = {
        k: period_location(tiny_config(f"train.ensemble={k}"), period, shards).key for k in (1, 2)
    }
    assert keys[1] != keys[2]


# ----------------------------------------------------------------------------------------------
# a trained ensemble


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyData:
    return build_tiny_shards(tmp_path_factory.mktemp("shards"))


FIT = ("train.epochs=1", "train.max_batches_per_epoch=5")


@pytest.fixture(scope="module")
def trained(tiny: TinyData, tmp_path_factory) -> TrainResult:
    cfg = tiny_config(*FIT, "train.ensemble=2", "train.seed=3")
    return ensemble.train_members(str(tiny.shard_dir), cfg, str(tmp_path_factory.mktemp("ens")))


def test_member_i_is_the_single_run_with_seed_plus_i(
    tiny: TinyData, trained: TrainResult, tmp_path: Path
) -> None:
    cfg = tiny_config(*FIT, "train.seed=4")
    single = train_model(tiny.shard_dir, cfg, tmp_path)
    model = trained.model
    assert isinstance(model, SeedEnsemble) and len(members_of(model)) == 2
    assert [m["seed"] for m in trained.members] == [3.0, 4.0]
    one = predict(members_of(model)[1], tiny.shard_dir, "test", cfg)
    pd.testing.assert_frame_equal(one, predict(single.model, tiny.shard_dir, "test", cfg))
    # the ensemble's predictions are its members' combined; its weights are one state dict
    zero = predict(members_of(model)[0], tiny.shard_dir, "test", cfg)
    combined = predict(model, tiny.shard_dir, "test", cfg)
    pd.testing.assert_frame_equal(combined, combine_members([zero, one]))
    assert not combined["score"].equals(zero["score"])
    state = torch.load(trained.model_state_path, map_location="cpu", weights_only=True)
    assert {key.split(".")[1] for key in state} == {"0", "1"}
    with pytest.raises(TypeError, match="no per-batch score"):
        model(next(iter(eval_dataset(tiny.shard_dir, "test", cfg))))


def test_a_served_ensemble_combines_a_tensor_request_and_scores_one_member_on_request(
    tiny: TinyData, trained: TrainResult
) -> None:
    batch = next(iter(eval_dataset(tiny.shard_dir, "test", tiny.cfg)))
    inputs = {key: batch[key].numpy() for key in trained.model.input_keys}
    members = members_of(trained.model)
    each = [serve(member, None, inputs) for member in members]
    for i, member_out in enumerate(each):
        pd.testing.assert_frame_equal(serve(trained.model, None, inputs, {"member": i}), member_out)
    days = batch["date"].numpy()
    out = serve(trained.model, None, {**inputs, "date": days})
    expected = combine_members([f.assign(date=days) for f in each]).drop(columns="date")
    pd.testing.assert_frame_equal(out, expected)
    assert serve(trained.model, None, inputs)["score"].between(0, 1).all()


def test_another_trainer_trains_the_same_members_one_after_another(
    tiny: TinyData, trained: TrainResult, tmp_path: Path
) -> None:
    """The DDP launcher's path: `train` per member, its config and directory, no run id."""
    cfg = tiny_config(*FIT, "train.ensemble=2", "train.seed=3")
    seen = []

    def train(shard_dir, member_cfg, checkpoint_dir, run_id):
        seen.append((member_cfg.train.seed, Path(checkpoint_dir).name, run_id))
        return train_model(shard_dir, member_cfg, checkpoint_dir)

    result = ensemble.fit_ensemble(train, str(tiny.shard_dir), cfg, str(tmp_path), None)
    assert seen == [(3, "member-0", None), (4, "member-1", None)]
    ours = predict(result.model, tiny.shard_dir, "valid", cfg)
    pd.testing.assert_frame_equal(ours, predict(trained.model, tiny.shard_dir, "valid", cfg))


def test_a_backtest_period_network_is_the_ensemble(
    tiny: TinyData, trained: TrainResult, mlflow_uri: str
) -> None:
    from alphaloom.tasks.backtest.retrain import retrain_network
    from alphaloom.tasks.tracking import runs

    cfg = tiny_config(*FIT, "train.ensemble=2", "train.seed=3", f"work_dir={tiny.shard_dir.parent}")
    cfg = cfg.model_copy(
        update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": mlflow_uri})}
    )
    shards = StageRef(stage="shards", key="tiny", path=str(tiny.shard_dir))
    with runs.tracked_run(cfg) as run_id:
        scored = retrain_network(cfg, shards, run_id, "period 1/1")
    pd.testing.assert_frame_equal(scored.preds, predict(trained.model, tiny.shard_dir, "test", cfg))
    assert [m["seed"] for m in scored.record["members"]] == [3.0, 4.0]
    metrics = mlflow.MlflowClient(mlflow_uri).get_run(run_id).data.metrics
    assert metrics["ensemble/member1/best_epoch"] == scored.record["members"][1]["best_epoch"]
    assert "test/rank_ic" in metrics


def test_raw_bars_are_ranked_by_the_ensemble_as_the_pipeline_ranks_them(
    tiny: TinyData, trained: TrainResult, tmp_path: Path
) -> None:
    from alphaloom.tasks.data.synthetic import generate_market
    from alphaloom.tasks.serving.bundle import load_bundle, write_bundle

    cfg = tiny.cfg
    bundle = load_bundle(write_bundle(tiny.shard_dir, cfg, tmp_path / "bundle"))
    bars = generate_market(cfg.data.synthetic).bars
    last = bars["date"].max()
    keys = ["symbol", "date"]
    for member, model in [(None, trained.model), (1, members_of(trained.model)[1])]:
        ranked = serve(trained.model, bundle, bars, None if member is None else {"member": member})
        expected = predict(model, tiny.shard_dir, None, cfg, dates=[last])
        merged = expected.merge(ranked, on=keys, suffixes=("_pipeline", "_served"))
        assert len(merged) == len(expected) == len(ranked)
        np.testing.assert_array_equal(merged["score_served"], merged["score_pipeline"])
        assert ranked["score"].is_monotonic_decreasing and ranked["rank"].iloc[0] == 1


def test_a_rerun_finds_every_members_finished_checkpoint(
    tiny: TinyData, trained: TrainResult, monkeypatch
) -> None:
    import alphaloom.tasks.training.train as train_module

    def no_training(*args, **kwargs):
        raise AssertionError("a finished member trained again")

    monkeypatch.setattr(train_module, "train_epoch", no_training)
    cfg = tiny_config(*FIT, "train.ensemble=2", "train.seed=3")
    checkpoints = str(Path(trained.model_state_path).parent)
    again = ensemble.train_members(str(tiny.shard_dir), cfg, checkpoints)
    assert again.members == trained.members
    pd.testing.assert_frame_equal(
        predict(again.model, tiny.shard_dir, "valid", cfg),
        predict(trained.model, tiny.shard_dir, "valid", cfg),
    )
