"""Which signal survives trading: seeds, seed ensembles, score smoothing and the TopkDropout book
judged on the walk-forward's out-of-sample days, paired day by day.

Input: finished `alphaloom backtest` parent runs, one per seed, on the same data and periods
(each holds `predictions/network.parquet` and `lightgbm.parquet`: every period's out-of-sample
predictions). Nothing is retrained here. From those predictions:

* single seeds (the default model), and seed ensembles of the first K seeds: the per-day mean of
  the members' percentile ranks (`tasks/evaluation/ensemble.py`, what `train.ensemble: K` scores);
* score smoothing (`tasks/evaluation/smoothing.py`) with a few half-lives, applied causally over
  the concatenated out-of-sample days, as the backtest does;
* the TopkDropout book (`tasks/evaluation/portfolio.py`) over a grid of (topk, n_drop) at
  `--cost-bps` per side; its long-only excess over the equal-weighted universe is the headline
  (net IR), the long-short and the decile book beside it;
* the daily Rank IC, the factor-neutral Rank IC (`tasks/evaluation/neutral.py`), and the
  network against LightGBM of the same seed.

Settings are chosen on the first half of the periods (`--choose-periods`, by net IR of the
TopkDropout excess book first, Rank IC second) and reported on the other half and on all periods,
so the choice is not judged on the days that made it. Differences are paired by day: mean daily
difference and its t-statistic (`metrics.paired_t`).

LightGBM candidates (`--lightgbm`): Qlib's published Alpha158 parameters (the baseline's default)
stopped on the validation loss or on the validation Rank IC, and the earlier default (63 leaves,
lr 0.05, L2 10, row bagging) with either rule, fitted on every period's own shard set (seed 0);
the one with the best Rank IC on the choice periods is the "strongest LightGBM" the network is
paired with.

    # no arguments (what `make bench` runs): a small synthetic market, 2 seeds, 1-epoch fits
    .venv/bin/python benchmarks/walk_forward.py
    # the real data (expanding, first 12 months of training, retrain every 6 months), 3 seeds:
    .venv/bin/python benchmarks/walk_forward.py --data sp500-dev --seeds 3 --lightgbm \\
        --work-dir wf
    # or judge backtests that already ran (one parent run per seed, same periods):
    .venv/bin/python benchmarks/walk_forward.py --tracking-uri sqlite:///wf/mlflow.db \\
        --work-dir wf --runs RUN_SEED0 RUN_SEED1 RUN_SEED2 --lightgbm

The last line: net IR of the chosen strategy over the held-out periods, and its ratio to the
single seed's at Qlib's TopkDropout (50, 5) without smoothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
SP500_DEV = REPO.parent / "shared" / "data" / "sp500-dev"
QUICK = [  # a small market: the whole benchmark takes a few minutes on 2 cores
    "data.synthetic.n_symbols=60", "data.synthetic.n_days=420", "text.enabled=false",
    "model.use_text=false", "train.epochs=1", "train.max_batches_per_epoch=30",
    "backtest.retrain_months=3", "backtest.train_months=8", "backtest.valid_months=2",
]  # fmt: skip
SP500 = ["backtest.retrain_months=6", "backtest.train_months=12", "backtest.valid_months=3"]
RUNNER = """
import json, sys
from alphaloom.flows.backtest import backtest
from alphaloom.tasks.common.config import load_config
config_path, out, *overrides = sys.argv[1:]
json.dump({"run": backtest(config=load_config(config_path, overrides))["parent_run_id"]},
          open(out, "w"))
"""
EARLIER_LIGHTGBM = {  # the baseline's defaults before Qlib's parameters
    "learning_rate": 0.05, "num_leaves": 63, "max_depth": -1, "min_data_in_leaf": 200,
    "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1,
    "lambda_l1": 0.0, "lambda_l2": 10.0,
}  # fmt: skip
LIGHTGBM_CANDIDATES = {
    "lgb_qlib_loss": {},
    "lgb_qlib_rank_ic": {"stop_on": "rank_ic"},
    "lgb_earlier_loss": {**EARLIER_LIGHTGBM},
    "lgb_earlier_rank_ic": {**EARLIER_LIGHTGBM, "stop_on": "rank_ic"},
}
ANNUALIZATION = 252
QLIB_BOOK = (50, 5)  # Qlib's TopkDropoutStrategy(topk=50, n_drop=5)
TOPKS = (10, 20, 30, 50)
N_DROPS = (1, 2, 5, 10)
HALF_LIVES = (0.0, 2.0, 5.0, 10.0, 20.0)


class Signal(NamedTuple):
    """A scored out-of-sample history: its name, the model family and the predictions."""

    name: str
    family: str  # "single", "ensemble", "lightgbm"
    preds: pd.DataFrame
    note: str = ""  # e.g. a LightGBM candidate's rounds kept per period


def load_predictions(tracking_uri: str, run_id: str) -> dict[str, pd.DataFrame]:
    """{model: concatenated out-of-sample predictions} logged by a backtest parent run."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="alphaloom-wf-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="predictions", dst_path=tmp, tracking_uri=tracking_uri
        )
        return {p.stem: pd.read_parquet(p) for p in sorted(Path(local).glob("*.parquet"))}


def run_backtests(
    config: Path, overrides: list[str], seeds: int, work: Path, store: str
) -> list[str]:
    """One `backtest` per seed (train.seed = 0..seeds-1), each its own process, sharing the
    work dir (the data stages are built once); their parent run ids."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    create = f"import mlflow; mlflow.MlflowClient({store!r}).search_experiments()"
    subprocess.run([sys.executable, "-c", create], check=True, env=env)  # once, before sharing
    runs = []
    for seed in range(seeds):
        out = work / f"seed{seed}.json"
        sets = [*overrides, f"train.seed={seed}", f"work_dir={work / 'outputs'}",
                f"tracking.tracking_uri={store}"]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", RUNNER, str(config), str(out), *sets],
            cwd=REPO, env=env, capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"backtest seed {seed} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        runs.append(json.loads(out.read_text())["run"])
        print(f"backtest seed {seed}: run {runs[-1]}", flush=True)
    return runs


def period_shards(work_dir: Path) -> list[tuple[int, Path]]:
    """(period number, its shard dir) of the backtest periods under `work_dir/outputs`."""
    found: dict[int, Path] = {}
    for record in sorted((work_dir / "outputs").glob("backtest/*/period.json")):
        data = json.loads(record.read_text())
        found.setdefault(
            int(data["period"]["number"]), record.parents[2] / "shards" / data["shards"]
        )
    return sorted(found.items())


def lightgbm_candidates(work_dir: Path, cfg) -> list[Signal]:
    """Each LightGBM candidate's out-of-sample predictions, fitted period by period; kept
    under `work_dir/lightgbm/` by candidate and period shard sets, so a rerun reads them."""
    import hashlib

    from alphaloom.tasks.comparison.baselines import predict_lightgbm, train_lightgbm

    periods = period_shards(work_dir)
    key = hashlib.sha256(repr([(n, s.name) for n, s in periods]).encode()).hexdigest()[:12]
    out = []
    for name, params in LIGHTGBM_CANDIDATES.items():
        saved = work_dir / "lightgbm" / f"{name}-{key}.parquet"
        if saved.is_file():
            preds = pd.read_parquet(saved)
            note = preds.attrs.get("note", name)
        else:
            frames, rounds = [], []
            for number, shards in periods:
                fit = train_lightgbm(shards, cfg, params, seed=0)
                frames.append(predict_lightgbm(fit, shards, "test", cfg).assign(period=number))
                rounds.append(f"{fit.best_iteration}/{len(fit.history)}")
            note = f"{name}: rounds kept / run per period {' '.join(rounds)}"
            preds = pd.concat(frames, ignore_index=True)
            preds.attrs["note"] = note
            saved.parent.mkdir(parents=True, exist_ok=True)
            preds.to_parquet(saved.with_suffix(".tmp"), index=False)
            saved.with_suffix(".tmp").rename(saved)
        out.append(Signal(name, "lightgbm", preds, note))
        print(note, flush=True)
    return out


def signals(runs: Sequence[dict[str, pd.DataFrame]]) -> list[Signal]:
    """Each seed's network and LightGBM, and the ensembles of the first 2..K seeds."""
    from alphaloom.tasks.evaluation.ensemble import combine_members

    out = []
    for seed, models in enumerate(runs):
        out.append(Signal(f"seed{seed}", "single", models["network"]))
        if "lightgbm" in models:
            out.append(Signal(f"lightgbm{seed}", "lightgbm", models["lightgbm"]))
    aligned = [_aligned(models["network"]) for models in runs]
    for k in range(2, len(runs) + 1):
        out.append(Signal(f"ensemble{k}", "ensemble", combine_members(aligned[:k])))
    return out


def market_dir_of(work_dir: Path):
    """The ingested market of the backtests under `work_dir/outputs` (one market), or None."""
    from alphaloom.tasks.orchestration.caching import StageRef

    found = sorted((work_dir / "outputs" / "market").glob("*/instruments.parquet"))
    return (
        StageRef(stage="market", key=found[0].parent.name, path=str(found[0].parent))
        if found
        else None
    )


def _aligned(preds: pd.DataFrame) -> pd.DataFrame:
    return preds.sort_values(["date", "symbol"], kind="stable").reset_index(drop=True)


class Figures:
    """Daily series of every (signal, half-life[, book]), each computed once, when first asked:
    the Rank IC and neutral Rank IC of the traded (smoothed) score and the decile book need no
    TopkDropout setting, the TopkDropout books do."""

    def __init__(self, sigs: Sequence[Signal], exposures, cost_bps: float) -> None:
        self.preds = {sig.name: _aligned(sig.preds) for sig in sigs}
        self.exposures, self.cost_bps = exposures, cost_bps
        self._signal: dict = {}
        self._book: dict = {}

    def traded(self, name: str, half_life: float) -> pd.DataFrame:
        from alphaloom.tasks.evaluation.smoothing import smooth_scores

        return smooth_scores(self.preds[name], half_life)

    def signal(self, name: str, half_life: float) -> dict[str, pd.Series]:
        from alphaloom.tasks.evaluation.metrics import daily_ic, long_short_returns
        from alphaloom.tasks.evaluation.neutral import neutral_daily_rank_ic

        key = (name, half_life)
        if key not in self._signal:
            traded = self.traded(name, half_life)
            out = {
                "rank_ic": daily_ic(traded, "spearman"),
                "decile_net": long_short_returns(traded, 0.1, self.cost_bps)["net"],
            }
            if self.exposures is not None:
                out["rank_ic_neutral"] = neutral_daily_rank_ic(traded, self.exposures)
            self._signal[key] = out
        return self._signal[key]

    def book(self, name: str, half_life: float, book: tuple[int, int]) -> dict[str, pd.Series]:
        from alphaloom.tasks.evaluation.portfolio import topk_dropout_returns

        key = (name, half_life, book)
        if key not in self._book:
            daily = topk_dropout_returns(self.traded(name, half_life), *book, self.cost_bps)
            self._book[key] = {
                c: daily[c] for c in ("excess_net", "excess_gross", "long_turnover", "ls_net")
            }
        return self._book[key]

    def __getitem__(self, key: tuple[str, float, tuple[int, int]]) -> dict[str, pd.Series]:
        name, half_life, book = key
        return {**self.signal(name, half_life), **self.book(name, half_life, book)}


def summary(daily: dict[str, pd.Series], days: pd.Index) -> dict[str, float]:
    """Means and annualised ratios over `days`."""

    def on(name: str) -> pd.Series:
        series = daily.get(name)
        return series[series.index.isin(days)] if series is not None else pd.Series(dtype=float)

    def ratio(series: pd.Series) -> float:
        std = series.std(ddof=1)
        return float(series.mean() / std * math.sqrt(ANNUALIZATION)) if std > 0 else math.nan

    rank_ic = on("rank_ic")
    return {
        "rank_ic": float(rank_ic.mean()),
        "rank_ic_t": float(rank_ic.mean() / rank_ic.std(ddof=1) * math.sqrt(len(rank_ic))),
        "rank_ic_neutral": float(on("rank_ic_neutral").mean()),
        "excess_net_ann": float(on("excess_net").mean() * ANNUALIZATION),
        "excess_gross_ann": float(on("excess_gross").mean() * ANNUALIZATION),
        "ir_net": ratio(on("excess_net")),
        "ir_gross": ratio(on("excess_gross")),
        "turnover": float(on("long_turnover").mean()),
        "ls_sharpe_net": ratio(on("ls_net")),
        "decile_sharpe_net": ratio(on("decile_net")),
    }


def paired(a: pd.Series, b: pd.Series, days: pd.Index) -> str:
    """'mean (t)' of the daily a - b over the days both have within `days`."""
    from alphaloom.tasks.evaluation.metrics import paired_t

    diff = (a - b).dropna()
    mean, t, n = paired_t(diff[diff.index.isin(days)])
    return f"{mean:+.4f} ({t:+.2f}, {n} d)"


def _markdown(rows: list[dict], columns: Sequence[str]) -> str:
    frame = pd.DataFrame(rows)[list(columns)]
    return frame.to_markdown(index=False, floatfmt=".4f")


def main(argv: Sequence[str] | None = None) -> int:
    from alphaloom.tasks.common.config import load_config
    from alphaloom.tasks.evaluation.neutral import market_exposures

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.data == "sp500-dev":
        if not SP500_DEV.is_dir():
            sys.exit(f"{SP500_DEV} is absent: nothing to measure on real data")
        config, overrides = REPO / "configs" / "sp500-dev.yaml", [*SP500, *args.set]
    else:
        config, overrides = REPO / "configs" / "default.yaml", [*QUICK, *args.set]
    with tempfile.TemporaryDirectory(prefix="walk-forward-") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        store = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
        run_ids = args.runs or run_backtests(config, overrides, args.seeds, work, store)
        runs = [load_predictions(store, run_id) for run_id in run_ids]
        market = market_dir_of(work)
        exposures = None if market is None else market_exposures(market)
        sigs = signals(runs)
        if args.lightgbm:
            cfg = load_config(config, overrides)
            sigs += lightgbm_candidates(work, cfg)
        lines = report(sigs, runs, exposures, args)
    if args.doc:
        write_doc(Path(args.doc), lines, run_ids, store, args)
    return 0


def write_doc(path: Path, lines: list[str], run_ids: Sequence[str], store: str, args) -> None:
    """The report as the page's walk-forward section (tasks/common/doc_sections.py)."""
    from alphaloom.tasks.common.doc_sections import with_section
    from alphaloom.tasks.common.storage import write_text_atomic

    header = [
        f"## Walk-forward on {args.data}: seeds, ensembles, smoothing and the TopkDropout book",
        "",
        f"- Command: `.venv/bin/python benchmarks/walk_forward.py {' '.join(args.argv)}`",
        f"- Backtest parent runs (one per seed): {', '.join(f'`{r}`' for r in run_ids)} "
        f"in `{store}`",
        "",
    ]
    body = "\n".join([*header, *lines[:-1], "", f"**{lines[-1]}**"])
    old = path.read_text() if path.is_file() else ""
    write_text_atomic(path, with_section(old, "walk-forward", body))
    path.chmod(0o644)
    print(f"wrote the walk-forward section of {path}")


def report(sigs: list[Signal], runs, exposures, args) -> list[str]:
    """Choose on the first periods; the tables, the pairs and the ratio line (printed too)."""
    lines: list[str] = []

    def emit(text: str) -> None:  # printed, and kept for --doc
        lines.append(text)
        print(text, flush=True)

    periods = sorted(int(p) for p in runs[0]["network"]["period"].unique())
    half = args.choose_periods or max(1, len(periods) // 2)
    first = [p for p in periods if p <= half]
    frame = runs[0]["network"]
    day_of = frame.drop_duplicates("date").set_index("date")["period"]
    choose_days = pd.Index(day_of[day_of.isin(first)].index)
    held_days = pd.Index(day_of[~day_of.isin(first)].index)
    all_days = pd.Index(day_of.index)
    emit(f"{len(runs)} seeds, periods {periods}; choose on {first} ({len(choose_days)} days), "
          f"report on the rest ({len(held_days)} days)")  # fmt: skip

    books = [(k, n) for k, n in itertools.product(TOPKS, N_DROPS) if n <= k]
    grid = Figures(sigs, exposures, args.cost_bps)

    # choose (half-life, book) on the first periods, by the mean over single seeds
    singles = [s.name for s in sigs if s.family == "single"]

    def mean_over(names: list[str], h: float, book, days, key: str) -> float:
        return float(np.mean([summary(grid[(n, h, book)], days)[key] for n in names]))

    choice = max(
        itertools.product(HALF_LIVES, books),
        key=lambda hb: (
            mean_over(singles, *hb, choose_days, "ir_net"),
            mean_over(singles, *hb, choose_days, "rank_ic"),
        ),
    )
    h_star, book_star = choice
    emit(f"chosen on periods {first}: half-life {h_star:g} days, topk {book_star[0]}, "
          f"n_drop {book_star[1]}")  # fmt: skip

    report = []
    columns = ["signal", "days", "setting", "rank_ic", "rank_ic_t", "rank_ic_neutral",
               "excess_gross_ann", "excess_net_ann", "ir_gross", "ir_net", "turnover",
               "ls_sharpe_net", "decile_sharpe_net"]  # fmt: skip
    settings = {"raw, Qlib book": (0.0, QLIB_BOOK), "chosen": (h_star, book_star)}
    for span, days in (("held-out", held_days), ("all", all_days), ("choice", choose_days)):
        for sig in sigs:
            for label, (h, book) in settings.items():
                row = summary(grid[(sig.name, h, book)], days)
                report.append({"signal": sig.name, "days": span, "setting": label, **row})
    emit("\n### Signals (held-out periods, all periods, choice periods)\n")
    emit(_markdown(report, columns))

    # grid of the choice periods: net IR by (half-life, book), mean over single seeds
    emit("\n### Net IR of the TopkDropout excess book by setting, choice periods, mean of seeds\n")
    table = pd.DataFrame(
        {
            f"h={h:g}": {f"k={k} n={n}": mean_over(singles, h, (k, n), choose_days, "ir_net")
                         for k, n in books}
            for h in HALF_LIVES
        }
    )  # fmt: skip
    emit(table.to_markdown(floatfmt=".2f"))

    # the strongest LightGBM: the best Rank IC on the choice periods (raw scores)
    lightgbms = [s.name for s in sigs if s.family == "lightgbm"]
    strongest = max(
        lightgbms, key=lambda n: summary(grid[(n, 0.0, QLIB_BOOK)], choose_days)["rank_ic"],
        default=None,
    )  # fmt: skip
    for sig in sigs:
        if sig.note:
            emit(f"- {sig.note}")
    if strongest:
        emit(f"- strongest LightGBM on periods {first} (Rank IC): {strongest}")
    emit("\n### Paired daily differences: mean (t, days)\n")
    pairs = []
    ens = [s.name for s in sigs if s.family == "ensemble"]
    for span, days in (("held-out", held_days), ("all", all_days)):
        for label, (h, book) in settings.items():
            todo = [(e, n, h) for e, n in itertools.product(ens, singles)]
            todo += [(n, n, 0.0) for n in singles if h]  # smoothed - raw, same model and book
            todo += [(m, strongest, h) for m in [*singles, *ens] if strongest]
            default_lgb = "lgb_qlib_loss"  # the baseline's default, against the strongest
            if strongest and strongest != default_lgb and default_lgb in lightgbms:
                todo.append((strongest, default_lgb, h))
            for a, b, b_h in todo:
                name = f"{a} smoothed - raw" if a == b else f"{a} - {b}"
                pairs.append(
                    _pair(name, span, label, grid[(a, h, book)], grid[(b, b_h, book)], days)
                )
    emit(_markdown(pairs, ["pair", "days", "setting", "rank_ic", "excess_net"]))

    chosen = mean_over(singles, h_star, book_star, held_days, "ir_net")
    before = mean_over(singles, 0.0, QLIB_BOOK, held_days, "ir_net")
    ratio = f", ratio {chosen / before:.2f}" if before > 0 else " (no ratio: a negative base)"
    emit(f"held-out net IR, mean of seeds: chosen {chosen:.2f} vs raw at Qlib's book "
         f"{before:.2f}: difference {chosen - before:+.2f}{ratio}")  # fmt: skip
    return lines


def _pair(name, span, label, a, b, days) -> dict:
    return {
        "pair": name,
        "days": span,
        "setting": label,
        "rank_ic": paired(a["rank_ic"], b["rank_ic"], days),
        "excess_net": paired(a["excess_net"], b["excess_net"], days),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["synthetic", "sp500-dev"], default="synthetic")
    parser.add_argument("--seeds", type=int, default=2, help="backtests to run, seeds 0..N-1")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work-dir", help="backtests' work dir (outputs/, mlflow.db)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: <work-dir>/mlflow.db)")
    parser.add_argument("--runs", nargs="+", help="finished backtest parent runs, one per seed")
    parser.add_argument("--lightgbm", action="store_true", help="also fit LightGBM candidates")
    parser.add_argument(
        "--choose-periods", type=int, help="choose on periods 1..N (default: the first half)"
    )
    parser.add_argument("--cost-bps", type=float, default=10.0, help="cost per side, in bp")
    parser.add_argument("--doc", help="also write the report as this page's walk-forward section")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
