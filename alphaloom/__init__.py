"""alphaloom: rank stocks by expected forward return with a deep sequence model.

One import name for the whole project. The code lives in this folder; the design's top-level
`flows/`, `tasks/`, `model/` and `configs/` are symlinks into it, so every path the docs name
(tasks/common/config.py, ...) opens the same file (CONTRIBUTING.md says why):

    flows/   -> alphaloom.flows   Prefect flows: the order of tasks, no domain logic
    tasks/   -> alphaloom.tasks   one subpackage per pipeline stage
    model/   -> alphaloom.model   PyTorch only: loader, network, losses
    configs/ -> alphaloom.configs the YAML configs, shipped as package data
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("alphaloom")
except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
    __version__ = "0+unknown"
