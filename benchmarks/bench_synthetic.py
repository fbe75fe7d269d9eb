"""How much signal the default synthetic market holds, and how little of it a shallow model finds.

Prints the generation time, the oracle's mean daily Rank IC (the ceiling for any model), the
Rank IC of each planted component alone, of a naive 5-day reversal score, and of a linear model
(pooled least squares on 1/5/20-day returns, the 5/20-day volume ratio and industry dummies,
fitted on the first 70 % of days, scored on the rest). The last line is the ratio of the oracle's
to the linear model's Rank IC on the same test days: the room a deep model has.

Run: .venv/bin/python benchmarks/bench_synthetic.py [--symbols 300 --days 1500]
(or as a module: .venv/bin/python -m benchmarks.bench_synthetic)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from alphaloom.tasks.common.config import SyntheticSection
from alphaloom.tasks.data import synthetic
from alphaloom.tasks.data.labels import forward_return
from alphaloom.tasks.evaluation import metrics
from alphaloom.tasks.evaluation.metrics import daily_ic


def shallow_features(market: synthetic.SyntheticMarket) -> tuple[pd.DataFrame, list[str]]:
    """Per-row features a shallow model would use (no text, no interactions)."""
    bars = market.bars.merge(market.instruments[["symbol", "industry"]], on="symbol")
    close = bars.groupby("symbol")["close"]
    volume = bars.groupby("symbol")["volume"]
    feats = pd.DataFrame({"symbol": bars["symbol"], "date": bars["date"]})
    for n in (1, 5, 20):
        feats[f"ret{n}"] = close.pct_change(n)
    feats["vol_ratio"] = np.log(
        volume.transform(lambda v: v.rolling(5).mean() / v.rolling(20).mean())
    )
    dummies = pd.get_dummies(bars["industry"], prefix="ind", dtype=float)
    feats = pd.concat([feats, dummies], axis=1)
    feats["fwd"] = forward_return(bars, horizon=1)
    names = ["ret1", "ret5", "ret20", "vol_ratio", *dummies.columns]
    return feats.merge(market.oracle, on=["symbol", "date"]).dropna(), names


def linear_vs_oracle(market: synthetic.SyntheticMarket) -> tuple[float, float, float]:
    """(linear model IC, naive reversal IC, oracle IC) on the last 30 % of days."""
    feats, names = shallow_features(market)
    days = np.sort(feats["date"].unique())
    split = days[int(0.7 * len(days))]
    train, test = feats[feats["date"] < split], feats[feats["date"] >= split].copy()
    target = train["fwd"] - train.groupby("date")["fwd"].transform("mean")
    coef, *_ = np.linalg.lstsq(train[names].to_numpy(), target.to_numpy(), rcond=None)
    test["linear"] = test[names].to_numpy() @ coef
    test["naive"] = -test["ret5"]
    ics = (daily_ic(test, "spearman", col, "fwd").mean() for col in ("linear", "naive"))
    oracle = daily_ic(test, "spearman", "expected_return", "fwd").mean()
    return (*ics, oracle)


def component_ic(cfg: SyntheticSection, keep: str) -> float:
    """Oracle Rank IC when only one planted component is switched on."""
    saved = synthetic.K_SEQ, synthetic.K_IND, synthetic.K_THEME
    weights = dict(zip(("seq", "ind", "theme"), saved, strict=True))
    try:
        synthetic.K_SEQ, synthetic.K_IND, synthetic.K_THEME = (
            w if name == keep else 0.0 for name, w in weights.items()
        )
        return metrics.oracle_rank_ic(synthetic.generate_market(cfg))
    finally:
        synthetic.K_SEQ, synthetic.K_IND, synthetic.K_THEME = saved


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=300)
    parser.add_argument("--days", type=int, default=1500)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = SyntheticSection(n_symbols=args.symbols, n_days=args.days)
    start = time.perf_counter()
    market = synthetic.generate_market(cfg)
    seconds = time.perf_counter() - start
    print(f"generate_market {args.symbols}x{args.days}: {seconds:.2f} s")
    print(f"oracle rank IC (all days):  {metrics.oracle_rank_ic(market):.4f}")
    for name in ("seq", "ind", "theme"):
        print(f"  only the {name:<5} component: {component_ic(cfg, name):.4f}")
    linear, naive, oracle = linear_vs_oracle(market)
    print(f"test days: naive 5-day reversal IC {naive:.4f}, linear model IC {linear:.4f}")
    print(f"test days: oracle IC {oracle:.4f}")
    print(f"oracle/linear rank IC ratio: {oracle / linear:.2f}")


if __name__ == "__main__":
    main()
