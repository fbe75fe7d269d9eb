"""PipelineConfig: YAML loading, overrides, and errors that name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from alphaloom.tasks.common.config import ConfigError, PipelineConfig, load_config

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
