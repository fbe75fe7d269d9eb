"""The `alphaloom` command line: synth, features, errors that name the problem, the UI command."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from alphaloom.flows import cli
from alphaloom.flows.cli import NIGHTLY_CONFIG_NAME, _config, build_parser, main
from alphaloom.tasks.common.config import DEFAULT_CONFIG_NAME, load_config, packaged_config
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


def files_settings(tmp_path: Path, market: Path) -> list[str]:
    """The smoke config pointed at a synthetic market written as files, with short windows."""
    return [
        f"work_dir={tmp_path / 'work'}",
        "data.source=files",
        f"data.bars_path={market}",
        "features.windows=[5,10]",
        "shards.window=20",
        "loader.min_valid_days=10",
    ]


def test_features_command_builds_table_from_synth_files(tmp_path, capsys) -> None:
    market = tmp_path / "market"
    assert main(["synth", "--out", str(market), *overrides(SMALL)]) == 0
    sets = files_settings(tmp_path, market)
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


class ConfigRead(Exception):
    """Raised by a stand-in load_config: which config file a command reads (None: none)."""


@pytest.mark.parametrize(
    ("command", "named"),
    [
        ("features", DEFAULT_CONFIG_NAME),
        ("run", DEFAULT_CONFIG_NAME),
        ("score", DEFAULT_CONFIG_NAME),
        ("validate", DEFAULT_CONFIG_NAME),
        ("compare", DEFAULT_CONFIG_NAME),
        ("backtest", DEFAULT_CONFIG_NAME),
        ("train-ddp", DEFAULT_CONFIG_NAME),
        ("config", DEFAULT_CONFIG_NAME),
        ("nightly", NIGHTLY_CONFIG_NAME),
        ("serve", NIGHTLY_CONFIG_NAME),
        ("synth", None),
        ("ui", None),
    ],
)
def test_help_names_the_config_each_command_reads(command, named, capsys, monkeypatch) -> None:
    """`--config`'s help names the config the command reads without it (`nightly --help` said
    default.yaml while it reads nightly.yaml); None: the built-in defaults, no file."""
    monkeypatch.setenv("COLUMNS", "200")  # one line per option: nothing wrapped mid-name
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    lines = capsys.readouterr().out.splitlines()
    (help_line,) = [line for line in lines if line.strip().startswith("--config CONFIG")]
    help_text = help_line.split("--config CONFIG", 1)[1]
    said = {name for name in (DEFAULT_CONFIG_NAME, NIGHTLY_CONFIG_NAME) if name in help_text}
    assert said == ({named} if named else set()), help_line
    assert ("built-in defaults" in help_text) == (named is None), help_line

    def read(path, overrides=None):
        raise ConfigRead(path)

    monkeypatch.setattr(cli, "load_config", read)
    monkeypatch.setattr("alphaloom.flows.serve.serve_deployments", lambda config, **_: read(config))
    args = build_parser().parse_args(
        [command, *(["--out", "unused"] if command == "synth" else [])]
    )
    with pytest.raises(ConfigRead) as config_read:
        args.func(args)
    path = config_read.value.args[0]
    assert (Path(path).name if path else None) == named


def validate(tmp_path: Path, capsys, *sets: str) -> tuple[int, str]:
    """`alphaloom validate` on a small synthetic market written as files: status, last line."""
    market = tmp_path / "market"
    if not market.exists():
        assert main(["synth", "--out", str(market), *overrides(SMALL)]) == 0
    settings = [*files_settings(tmp_path, market), *sets]
    capsys.readouterr()
    status = main(["validate", "--config", str(REPO / "configs/smoke.yaml"), *overrides(settings)])
    return status, capsys.readouterr().out.strip().splitlines()[-1]


def test_validate_verdicts_are_whole_sentences(tmp_path, capsys) -> None:
    """The stop verdict ended in the colon that introduces the report: now it says why."""
    assert validate(tmp_path, capsys) == (0, "A run would go ahead.")

    bars_file = tmp_path / "market" / "bars.parquet"
    bars = pd.read_parquet(bars_file)
    bars.loc[bars.index[:3], "close"] = -1.0
    bars.to_parquet(bars_file, index=False)
    status, verdict = validate(tmp_path, capsys, "data.on_invalid=error")
    assert status == 1
    assert verdict == (
        "A run would stop: invalid input data (data.on_invalid is 'error'; "
        "set it to 'drop' to quarantine invalid rows)."
    )
