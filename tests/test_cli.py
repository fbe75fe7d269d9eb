"""The `alphaloom` command line: synth, features, errors that name the problem, the UI command."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from alphaloom.flows.cli import _config, build_parser, main
from alphaloom.tasks.common.config import load_config, packaged_config
from alphaloom.tasks.tracking.store import ui_command

REPO = Path(__file__).resolve().parent.parent
SMALL = ["data.synthetic.n_symbols=12", "data.synthetic.n_days=120"]


def overrides(items: list[str]) -> list[str]:
    """`--set a --set b ...` for a list of assignments."""
    return [token for item in items for token in ("--set", item)]


def test_synth_writes_real_data_format_and_extends(tmp_path, capsys) -> None:
    out = tmp_path / "market"
    assert main(["synth", "--out", str(out), *overrides(SMALL)]) == 0
    bars = pd.read_parquet(out / "bars.parquet")
    assert {"symbol", "date", "open", "high", "low", "close", "volume"} <= set(bars.columns)
    assert bars["symbol"].nunique() == 12 and bars["date"].nunique() == 120
    assert "oracle daily Rank IC" in capsys.readouterr().out

    assert main(["synth", "--out", str(out), "--extend-days", "5"]) == 0
    extended = pd.read_parquet(out / "bars.parquet")
    assert extended["date"].nunique() == 125
    pd.testing.assert_frame_equal(
        extended[extended["date"] <= bars["date"].max()].reset_index(drop=True), bars
    )


def test_features_command_builds_table_from_synth_files(tmp_path, capsys) -> None:
    market = tmp_path / "market"
    assert main(["synth", "--out", str(market), *overrides(SMALL)]) == 0
    sets = [
        f"work_dir={tmp_path / 'work'}",
        "data.source=files",
        f"data.bars_path={market}",
        "features.windows=[5,10]",
        "shards.window=20",
        "loader.min_valid_days=10",
    ]
    code = main(["features", "--config", str(REPO / "configs/smoke.yaml"), *overrides(sets)])
    assert code == 0
    printed = capsys.readouterr().out
    features_dir = Path(printed.split("features:")[1].split()[0])
    assert (features_dir / "features.parquet").is_file()


def test_config_typo_exits_2_and_names_the_key(capsys) -> None:
    assert main(["features", "--set", "train.epocs=3"]) == 2
    assert "unknown key 'train.epocs'" in capsys.readouterr().err


def test_bad_data_exits_2_and_names_the_file(tmp_path, capsys) -> None:
    bad = tmp_path / "bars.csv"
    bad.write_text("symbol,date,open,high,low,close\nA,2024-01-02,1,1,1,1\n")
    code = main(
        [
            "features",
            "--set",
            f"work_dir={tmp_path}",
            "--set",
            "data.source=files",
            "--set",
            f"data.bars_path={bad}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "bars.csv" in err and "missing required column(s) 'volume'" in err
    (report,) = (tmp_path / "market").iterdir()  # no market, only the report of the rejection
    assert report.name.endswith(".validation_report.csv") and str(report) in err


def test_ui_binds_loopback_only() -> None:
    command = ui_command("sqlite:///mlflow.db")
    assert command[command.index("--host") + 1] == "127.0.0.1"


def test_ui_needs_no_config_outside_the_checkout(tmp_path, monkeypatch) -> None:
    """`alphaloom ui` in any directory serves that directory's store; no configs/ needed."""
    launched: list[list[str]] = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(os, "execvp", lambda file, argv: launched.append(argv))
    assert main(["ui", "--port", "5123"]) == 0
    argv = launched[0]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlflow.db"
    assert argv[argv.index("--port") + 1] == "5123"


def test_commands_default_to_the_packaged_config(tmp_path, monkeypatch) -> None:
    """Outside the checkout, a command without --config reads the packaged default.yaml,
    which is the repository's configs/default.yaml."""
    monkeypatch.chdir(tmp_path)
    packaged = Path(packaged_config())
    assert packaged.read_text() == (REPO / "configs" / "default.yaml").read_text()
    args = build_parser().parse_args(["run", "--set", "train.epochs=1"])
    cfg = _config(args)
    assert cfg.shards.window == load_config(REPO / "configs" / "default.yaml").shards.window
    assert cfg.train.epochs == 1


def test_every_documented_command_exists() -> None:
    parser = build_parser()
    for command in (
        "synth",
        "features",
        "run",
        "score",
        "nightly",
        "ui",
        "serve",
        "compare",
        "train-ddp",
    ):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
