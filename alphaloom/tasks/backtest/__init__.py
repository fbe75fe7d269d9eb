"""Walk-forward backtest: retrain every K months, score the next period out of sample.

Builds on the pipeline's data stages, training, evaluation and the comparison's LightGBM
baseline; `alphaloom.flows.backtest` composes it.
"""
