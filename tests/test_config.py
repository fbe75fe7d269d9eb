"""PipelineConfig: YAML loading, overrides, and errors that name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from alphaloom.tasks.common.config import (
    ConfigError,
    PipelineConfig,
    config_from_dict,
    load_config,
    packaged_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_load_without_a_file() -> None:
    cfg = load_config()
    assert isinstance(cfg, PipelineConfig)
    assert cfg.features.label.quantile_edges == (0.3, 0.6, 0.9)


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert cfg.data.source == "synthetic"


def test_override_sets_nested_value_with_yaml_types() -> None:
    cfg = load_config(None, ["train.epochs=3", "model.use_attention=false", "loss.alpha=[1,2,3,4]"])
    assert cfg.train.epochs == 3
    assert cfg.model.use_attention is False
    assert cfg.loss.alpha == [1.0, 2.0, 3.0, 4.0]


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'train\.epocs'"):
        load_config(path)


def test_unknown_section_in_override_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'trian'"):
        load_config(None, ["trian.epochs=3"])


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"invalid value for 'train\.epochs'"):
        load_config(None, ["train.epochs=many"])


def test_malformed_override_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(None, ["train.epochs"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cross_section_constraint() -> None:
    with pytest.raises(ConfigError, match="min_valid_days"):
        load_config(None, ["shards.window=10", "loader.min_valid_days=20"])


def test_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.epochs=4"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def _outside_data(cfg: PipelineConfig) -> dict:
    values = cfg.model_dump(mode="json")
    values.pop("data")
    return values


def test_a_data_only_config_trains_the_packaged_default(tmp_path: Path) -> None:
    """A user's YAML that sets only `data:` resolves, key for key outside `data`, to what
    `alphaloom run` without --config trains (the packaged default.yaml)."""
    bars = tmp_path / "bars.csv"
    bars.write_text("symbol,date,open,high,low,close,volume\n")
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"data:\n  source: files\n  bars_path: {bars}\n")
    packaged = load_config(packaged_config())
    assert _outside_data(load_config(mine)) == _outside_data(packaged)
    assert _outside_data(load_config(None)) == _outside_data(packaged)


def test_the_default_config_names_only_the_data() -> None:
    """configs/default.yaml cannot disagree with the schema: it sets nothing outside `data`."""
    import yaml

    raw = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert set(raw) == {"data"}
    assert load_config(CONFIGS / "default.yaml") == config_from_dict({"data": raw["data"]})


def test_the_schema_defaults_are_the_benchmarked_model() -> None:
    """The settings docs/benchmark.md's `full` row was measured with (configs/default.yaml before
    the defaults moved into the schema); a change here must re-measure that page."""
    cfg = PipelineConfig()
    trained = {
        "shards.window": cfg.shards.window,
        "model.head": cfg.model.head,
        "model.width": (cfg.model.input_dim, cfg.model.lstm_hidden, cfg.model.mlp_hidden),
        "loss": (cfg.loss.kind, cfg.loss.gamma, cfg.loss.alpha, cfg.loss.distance_weight),
        "loss.rank_weight": cfg.loss.rank_weight,
        "train": (cfg.train.epochs, cfg.train.lr, cfg.train.patience),
        "train.max_batches_per_epoch": cfg.train.max_batches_per_epoch,
        "train.num_threads": cfg.train.num_threads,
        "loader": (cfg.loader.batch_size, cfg.loader.pool_shards, cfg.loader.min_valid_days),
    }
    assert trained == {
        "shards.window": 30,
        "model.head": "ordinal",
        "model.width": (32, 32, 32),
        "loss": ("composite", 1.0, None, 0.5),
        "loss.rank_weight": 1.0,
        "train": (8, 0.002, 3),
        "train.max_batches_per_epoch": 240,
        "train.num_threads": 1,
        "loader": (512, 4, 20),
    }


@pytest.mark.parametrize("name", ["nightly.yaml", "sp500-dev.yaml"])
def test_other_shipped_configs_keep_the_default_model(name: str) -> None:
    """nightly and sp500-dev change data, splits, registry or tracking, never the model."""
    cfg = load_config(CONFIGS / name)
    default = PipelineConfig()
    for section in ("shards", "loader", "model", "loss", "train", "text"):
        assert getattr(cfg, section) == getattr(default, section), section


def test_config_command_prints_what_a_run_resolves_to(capsys, tmp_path: Path) -> None:
    import yaml

    from alphaloom.flows.cli import main

    assert main(["config", "--set", "train.epochs=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(None, ["train.epochs=3"]).model_dump(mode="json")
    assert printed["train"]["epochs"] == 3


def test_strategy_settings_default_in_one_place_and_reject_bad_books() -> None:
    from alphaloom.tasks.common import research_config as config_module

    evaluate = load_config().evaluate
    assert (evaluate.topk, evaluate.n_drop, evaluate.smoothing_half_life) == (
        config_module.DEFAULT_TOPK,
        config_module.DEFAULT_N_DROP,
        config_module.DEFAULT_SMOOTHING_HALF_LIFE,
    )
    cfg = config_from_dict({}, ["evaluate.topk=10", "evaluate.n_drop=10"])
    assert (cfg.evaluate.topk, cfg.evaluate.n_drop) == (10, 10)  # a full daily rebalance
    with pytest.raises(ConfigError, match=r"evaluate\.n_drop \(11\) must be <= evaluate\.topk"):
        config_from_dict({}, ["evaluate.topk=10", "evaluate.n_drop=11"])
    with pytest.raises(ConfigError, match=r"invalid value for 'evaluate\.topk'"):
        config_from_dict({}, ["evaluate.topk=0"])
    with pytest.raises(ConfigError, match=r"invalid value for 'evaluate\.n_drop'"):
        config_from_dict({}, ["evaluate.n_drop=-1"])
    for bad in ("-1", ".nan", ".inf"):
        with pytest.raises(ConfigError, match=r"invalid value for 'evaluate\.smoothing_half_life'"):
            config_from_dict({}, [f"evaluate.smoothing_half_life={bad}"])
    assert config_from_dict({}, ["evaluate.smoothing_half_life=2.5"]).evaluate.smoothing_half_life
