"""alphaloom: rank stocks by expected forward return with a deep sequence model.

One import name for the whole project. The repository keeps its three layers at the top level,
where a newcomer looks first; `pyproject.toml` maps them into this namespace when installed, and in
the checkout `alphaloom/flows`, `alphaloom/tasks`, `alphaloom/model` and `alphaloom/configs` are
symlinks to them, so editors and import-linter resolve `alphaloom.*` from the source tree:

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
