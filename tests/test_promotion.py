"""Champion / challenger: the decision rule, what is recorded, retries, and racing promotions.

Models here are real registry versions with placeholder artifacts; a window scorer maps each
version to a made-up daily Rank IC series (what pyfunc scoring on the promotion window would
return), so every branch of the decision is exact. tests/test_registry.py scores real models.
"""

from __future__ import annotations

import io
import math
import threading
import time

import pandas as pd
import pytest

from alphaloom.tasks.common.config import PipelineConfig, RegistrySection
from alphaloom.tasks.dataset.split_windows import DateWindow
from alphaloom.tasks.evaluation.metrics import paired_t
from alphaloom.tasks.serving import promotion, promotion_lock
from alphaloom.tasks.serving.registry import CHAMPION, current_champion
from alphaloom.tasks.tracking import runs, store

DAYS = pd.bdate_range("2024-03-01", periods=30)
WINDOW = DateWindow("promotion", DAYS[0], DAYS[-1])


def wave(level: float, n: int = 30) -> pd.Series:
    """A daily Rank IC series around `level` that is not constant (so t is defined)."""
    return pd.Series([level + 0.02 * math.sin(k) for k in range(n)], index=DAYS[:n])


# ----------------------------------------------------------------------------------------------
# the rule


def test_the_challenger_must_beat_the_champion_by_more_than_the_margin() -> None:
    rule = RegistrySection(margin=0.005, min_days=20)
    champion = wave(0.03)
    assert promotion.decide(wave(0.03), None, None, rule)[:2] == (True, "no champion yet")
    promoted, reason, paired = promotion.decide(champion + 0.01, "1", champion, rule)
    assert promoted and "> margin 0.005" in reason
    assert paired.mean_diff == pytest.approx(0.01) and paired.days == 30
    promoted, reason, _ = promotion.decide(champion + 0.004, "1", champion, rule)
    assert not promoted and "<= margin 0.005" in reason
    assert not promotion.decide(champion, "1", champion, RegistrySection(margin=0.0))[0]  # a tie
    # A negative margin prefers the newer model unless it is clearly worse.
    assert promotion.decide(champion - 0.004, "1", champion, RegistrySection(margin=-0.005))[0]


def test_too_few_paired_days_keep_the_champion() -> None:
    rule = RegistrySection(margin=0.0, min_days=20)
    champion = wave(0.01)
    promoted, reason, paired = promotion.decide(wave(0.2, n=19), "1", champion, rule)
    assert not promoted and paired.days == 19 and "registry.min_days=20" in reason


def test_days_are_paired_not_averaged_separately() -> None:
    """The champion's extra bad day (the challenger has no Rank IC there) is not counted."""
    champion = wave(0.03)
    champion.iloc[0] = -0.5
    challenger = wave(0.032).iloc[1:]
    challenger.iloc[3] = math.nan  # a day without a defined Rank IC
    _, _, paired = promotion.decide(challenger, "1", champion, RegistrySection(min_days=5))
    assert paired.days == 28
    assert paired.mean_diff == pytest.approx(0.002)
    assert paired.challenger - paired.champion == pytest.approx(paired.mean_diff)
    mean, t_stat, n = paired_t(paired.daily["difference"])
    assert (mean, n) == (pytest.approx(0.002), 28) and paired.t_stat == t_stat


def test_an_unscorable_champion_loses_and_says_why() -> None:
    promoted, reason, paired = promotion.decide(
        wave(0.0), "4", None, RegistrySection(), "IncompatibleChampion: feature set differs"
    )
    assert promoted and paired is None and "v4" in reason and "feature set differs" in reason


# ----------------------------------------------------------------------------------------------
# against a real registry


@pytest.fixture
def cfg(module_store_uri: str, request) -> PipelineConfig:
    name = request.node.name.removeprefix("test_")[:60]
    return PipelineConfig(
        tracking={
            "tracking_uri": module_store_uri,
            "experiment": "promo",
            "registered_model": name,
        },
        registry={"margin": 0.005, "min_days": 10},
    )


def register(cfg: PipelineConfig) -> tuple[str, str]:
    """A run and a model version of it (a placeholder artifact will do for the decision)."""
    client = store.client_for(cfg)
    run_id = runs.start_run(cfg)
    client.log_text(run_id, "weights", "model/placeholder.txt")
    name = cfg.tracking.registered_model
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    return run_id, str(client.create_model_version(name, source, run_id=run_id).version)


def with_champion(cfg: PipelineConfig, level: float) -> tuple[str, pd.Series]:
    """Register and promote a first version scoring around `level`; its version and scores."""
    run_id, version = register(cfg)
    promotion.promote(cfg, run_id, version, WINDOW, FakeScorer({version: wave(level)}))
    return version, wave(level)


class FakeScorer:
    """Daily Rank IC per version; records which model URIs were scored."""

    def __init__(self, by_version: dict[str, pd.Series], pause: dict[str, float] | None = None):
        self.by_version, self.pause = by_version, pause or {}
        self.scored: list[str] = []

    def __call__(self, uri: str) -> pd.Series:
        version = uri.rsplit("/", 1)[1]
        self.scored.append(version)
        time.sleep(self.pause.get(version, 0.0))
        return self.by_version[version]


def test_the_champion_moves_only_past_the_margin_and_both_figures_are_recorded(
    cfg: PipelineConfig,
) -> None:
    client = store.client_for(cfg)
    name = cfg.tracking.registered_model
    scores = {"1": wave(0.03), "2": wave(0.033), "3": wave(0.045)}
    scorer = FakeScorer(scores)
    decisions = {}
    for expected in ("1", "2", "3"):
        run_id, version = register(cfg)
        assert version == expected
        decisions[version] = (run_id, promotion.promote(cfg, run_id, version, WINDOW, scorer))
    assert [d.promoted for _, d in decisions.values()] == [True, False, True]
    # Every challenger and the champion of the day are scored by the same scorer.
    assert scorer.scored == ["1", "2", "1", "3", "1"]
    assert current_champion(client, name) == "3"

    run_id, decision = decisions["2"]
    assert decision.champion_version == "1" and decision.mean_daily_diff == pytest.approx(0.003)
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion.promoted"] == "false"
    assert float(tags["promotion.challenger_rank_ic"]) == pytest.approx(
        scores["2"].mean(), abs=1e-6
    )
    assert float(tags["promotion.champion_rank_ic"]) == pytest.approx(scores["1"].mean(), abs=1e-6)
    assert float(tags["promotion.mean_daily_diff"]) == pytest.approx(0.003, abs=1e-6)
    assert int(tags["promotion.paired_days"]) == 30 and tags["promotion.margin"] == "0.005"
    assert tags["promotion.window"] == WINDOW.label()
    metrics = client.get_run(run_id).data.metrics
    assert metrics["registry/promoted"] == 0.0 and metrics["registry/paired_days"] == 30
    assert metrics["registry/champion_rank_ic"] == pytest.approx(scores["1"].mean())
    table = pd.read_csv(_artifact_text(client, run_id, "registry/promotion_daily_v2.csv"))
    assert len(table) == 30
    assert table["difference"].to_numpy() == pytest.approx((scores["2"] - scores["1"]).to_numpy())
    assert tags["promotion.daily_table"] == f"runs:/{run_id}/registry/promotion_daily_v2.csv"


def _artifact_text(client, run_id: str, path: str) -> io.StringIO:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        return io.StringIO(Path(local).read_text())


def test_a_retried_decision_is_made_once(cfg: PipelineConfig) -> None:
    client = store.client_for(cfg)
    name = cfg.tracking.registered_model
    scorer = FakeScorer({"1": wave(0.03), "2": wave(0.05)})
    run_1, v1 = register(cfg)
    promotion.promote(cfg, run_1, v1, WINDOW, scorer)
    run_2, v2 = register(cfg)
    first = promotion.promote(cfg, run_2, v2, WINDOW, scorer)
    scored = list(scorer.scored)
    again = promotion.promote(cfg, run_2, v2, WINDOW, scorer)  # a retried task
    assert again == first and first.promoted and first.champion_version == "1"
    assert scorer.scored == scored  # nothing scored or decided again
    assert current_champion(client, name) == "2"


def test_a_retry_after_the_alias_moved_but_before_the_record_keeps_it(
    cfg: PipelineConfig,
) -> None:
    client = store.client_for(cfg)
    name = cfg.tracking.registered_model
    run_id, version = register(cfg)
    client.set_registered_model_alias(name, CHAMPION, version)  # the first attempt died here
    decision = promotion.promote(cfg, run_id, version, WINDOW, FakeScorer({version: wave(0.02)}))
    assert decision.promoted and "already the champion" in decision.reason
    assert current_champion(client, name) == version


def test_two_promotions_racing_leave_the_better_model_champion(cfg: PipelineConfig) -> None:
    """Both read "champion v1" and both beat it; unguarded, the slower (worse) one would write
    the alias last and win. Guarded, the second decides against the first."""
    client = store.client_for(cfg)
    name = cfg.tracking.registered_model
    v1, first_scores = with_champion(cfg, 0.01)
    (run_good, good), (run_fair, fair) = register(cfg), register(cfg)
    scores = {v1: first_scores, good: wave(0.06), fair: wave(0.02)}
    decisions: dict[str, promotion.PromotionDecision] = {}
    barrier = threading.Barrier(2, timeout=60)

    def race(run_id: str, version: str, pause: float) -> None:
        barrier.wait()
        scorer = FakeScorer(scores, pause={v1: pause})  # scoring the champion takes a while
        decisions[version] = promotion.promote(cfg, run_id, version, WINDOW, scorer)

    threads = [
        threading.Thread(target=race, args=(run_good, good, 0.2)),
        threading.Thread(target=race, args=(run_fair, fair, 1.0)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert current_champion(client, name) == good
    assert decisions[good].promoted
    # Whoever went second compared itself with whoever went first, not with the stale v1.
    (first,) = [d for d in decisions.values() if d.champion_version == v1]
    (second,) = [d for d in decisions.values() if d is not first]
    assert first.promoted and second.champion_version == first.new_version


def test_without_a_lock_the_champion_is_reread_before_the_alias_moves(
    cfg: PipelineConfig, monkeypatch
) -> None:
    """A tracking server has no lock: a champion that moves while the challenger is being
    compared is noticed, and the decision is made again against the new champion."""
    client = store.client_for(cfg)
    name = cfg.tracking.registered_model
    v1, first_scores = with_champion(cfg, 0.01)
    (_, rival), (run_id, mine) = register(cfg), register(cfg)
    scores = {v1: first_scores, rival: wave(0.08), mine: wave(0.03)}

    def rival_promotes_meanwhile(uri: str) -> pd.Series:
        version = uri.rsplit("/", 1)[1]
        if version == v1:  # while this process scores the old champion ...
            client.set_registered_model_alias(name, CHAMPION, rival)
        return scores[version]

    monkeypatch.setattr(promotion_lock, "lock_file", lambda uri, name: None)  # as for a server
    decision = promotion.promote(cfg, run_id, mine, WINDOW, rival_promotes_meanwhile)
    assert decision.champion_version == rival and not decision.promoted
    assert current_champion(client, name) == rival


def test_the_lock_lives_beside_a_local_store_only(tmp_path) -> None:
    db = tmp_path / "mlflow.db"
    assert (
        promotion_lock.lock_file(f"sqlite:///{db}", "m/x")
        == tmp_path / "mlflow.db.promote-m_x.lock"
    )
    assert promotion_lock.lock_file(tmp_path.as_uri(), "m") == tmp_path / ".promote-m.lock"
    assert promotion_lock.lock_file("http://127.0.0.1:5000", "m") is None
