"""Experiments: the model against its ablations and gradient-boosted baselines."""
