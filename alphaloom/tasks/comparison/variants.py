"""What a comparison compares: variants as data, and the built-in grid.

A variant is a name plus `section.key=value` overrides of the pipeline config (or `kind:
lightgbm` / `blend` plus LightGBM parameters), so the ablation list can be extended from YAML
(`alphaloom compare --variants FILE`) without code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from alphaloom.tasks.common.config import PipelineConfig, config_from_dict
from alphaloom.tasks.comparison import baselines


class Variant(BaseModel):
    """One entry of the comparison: config overrides for the network, or the LightGBM baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["network", "lightgbm", "blend"] = "network"
    overrides: tuple[str, ...] = ()
    params: dict[str, Any] = Field(default_factory=dict, description="LightGBM parameters")
    description: str = ""

    @model_validator(mode="after")
    def _params_need_lightgbm(self) -> Variant:
        if self.params and self.kind == "network":
            raise ValueError(f"variant '{self.name}': params are for kinds 'lightgbm', 'blend'")
        return self


# The grid: every variant switches one idea of the default off (or back to the previous default),
# so each idea's effect is the paired difference `full` - variant. The overrides are explicit
# about everything they mean (e.g. the cross-entropy network also drops the ranking term), so
# a variant means the same whatever configs/default.yaml holds; tests/test_compare.py checks
# that no variant is a no-op on the default config.
_NO_RANK = "loss.rank_weight=0"


_NETWORK_LOSS_GRID: tuple[Variant, ...] = (
    Variant(
        name="cross_entropy",
        overrides=("loss.kind=cross_entropy", _NO_RANK),
        description="the same network trained with plain cross-entropy",
    ),
    Variant(
        name="ce_alpha",
        overrides=("loss.kind=focal", "loss.gamma=0", "loss.alpha=batch", _NO_RANK),
        description="cross-entropy with batch alpha (inverse class frequency per batch)",
    ),
    Variant(
        name="focal",
        overrides=("loss.kind=focal", "loss.alpha=null", _NO_RANK),
        description="focal loss (the default's gamma) without alpha, distance or ranking term",
    ),
    Variant(
        name="focal_alpha",
        overrides=("loss.kind=focal", "loss.alpha=batch", _NO_RANK),
        description="focal loss with batch alpha, without distance or ranking term",
    ),
    Variant(
        name="no_focal",
        overrides=("loss.gamma=0",),
        description="the default with cross-entropy in place of focal loss (gamma 0)",
    ),
    Variant(
        name="no_distance",
        overrides=("loss.kind=focal",),
        description="the default without the ordinal distance term",
    ),
    Variant(name="no_rank", overrides=(_NO_RANK,), description="without the per-day ranking term"),
    Variant(
        name="batch_alpha",
        overrides=("loss.alpha=batch",),
        description="plain batch alpha (only the rare top class up-weighted)",
    ),
    Variant(
        name="symmetric_alpha",
        overrides=("loss.alpha=batch_symmetric",),
        description="batch alpha that up-weights both rare tails alike",
    ),
    Variant(
        name="softmax_head",
        overrides=("model.head=softmax", "model.score=expected_class"),
        description="softmax head scored by the expected class sum_k k p_k",
    ),
    Variant(
        name="softmax_class_values",
        overrides=("model.head=softmax", "model.score=class_values"),
        description="softmax head scored by class values fitted on the training split",
    ),
    Variant(
        name="softmax_cross_entropy",
        overrides=(
            "model.head=softmax",
            "model.score=expected_class",
            "loss.kind=cross_entropy",
            _NO_RANK,
        ),
        description="the previous benchmark's cross-entropy network (softmax, score by k)",
    ),
    Variant(
        name="previous_default",
        overrides=(
            "model.head=softmax",
            "model.score=expected_class",
            "loss.kind=composite",
            "loss.gamma=2",
            "loss.alpha=batch",
            "loss.distance_weight=0.5",
            _NO_RANK,
        ),
        description="the default before issue 12: softmax, focal gamma 2 + batch alpha + distance",
    ),
    Variant(
        name="blend_lightgbm",
        kind="blend",
        description="LightGBM on top: rank blend of the default network and LightGBM, "
        "weight fitted on the validation split",
    ),
    Variant(
        name="lightgbm",
        kind="lightgbm",
        description="LightGBM on the end-day factors (Qlib's Alpha158 baseline)",
    ),
)


_ARCHITECTURE_GRID: tuple[Variant, ...] = (
    Variant(
        name="no_attention",
        overrides=("model.use_attention=false",),
        description="LSTM only, no self-attention",
    ),
    Variant(name="no_text", overrides=("model.use_text=false",), description="no text vector"),
    Variant(
        name="no_industry",
        overrides=("model.use_industry=false",),
        description="no industry embedding",
    ),
    Variant(
        name="no_index", overrides=("model.use_index=false",), description="no index embedding"
    ),
    Variant(
        name="no_calendar",
        overrides=("model.use_calendar=false",),
        description="no day-of-week / month embedding",
    ),
)


DEFAULT_VARIANTS: tuple[Variant, ...] = (
    Variant(name="full", description="the configured model and loss"),
    *_NETWORK_LOSS_GRID,
    *_ARCHITECTURE_GRID,
)


class CompareError(ValueError):
    """The variant list is unusable; the message names the file or the variant."""


def load_variants(path: str | Path) -> list[Variant]:
    """Variants from a YAML list: mappings (name, kind, overrides, params, description), or
    plain names, which pick that variant of the built-in grid (`DEFAULT_VARIANTS`)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CompareError(f"variants file not found: {path}") from None
    except yaml.YAMLError as err:
        raise CompareError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, list) or not raw:
        raise CompareError(f"{path}: expected a non-empty list of variants")
    built_in = {v.name: v for v in DEFAULT_VARIANTS}
    variants = []
    for i, entry in enumerate(raw):
        if isinstance(entry, str):
            if entry not in built_in:
                raise CompareError(
                    f"{path}: variant #{i + 1}: '{entry}' is not a built-in variant "
                    f"(known: {', '.join(built_in)})"
                )
            variants.append(built_in[entry])
            continue
        try:
            variants.append(Variant.model_validate(entry))
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "<entry>"
            raise CompareError(f"{path}: variant #{i + 1}: '{key}': {first['msg']}") from None
    return check_variants(variants)


def check_variants(variants: Sequence[Variant]) -> list[Variant]:
    """The list itself if its names are unique (rows and runs are keyed by name)."""
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CompareError(f"variant names must be unique; repeated: {duplicates}")
    if not variants:
        raise CompareError("the variant list is empty")
    return list(variants)


def seed_list(cfg: PipelineConfig, n_seeds: int) -> list[int]:
    """train.seed, train.seed + 1, ...: the seeds every variant runs with (paired by seed)."""
    if n_seeds < 1:
        raise CompareError(f"--seeds must be >= 1, got {n_seeds}")
    return [cfg.train.seed + i for i in range(n_seeds)]


def skipped_variants(variants: Iterable[Variant]) -> dict[str, str]:
    """Variants that cannot run here and why (LightGBM without the optional extra)."""
    if baselines.lightgbm_available():
        return {}
    reason = f"LightGBM is not installed: {baselines.INSTALL_HINT}"
    return {v.name: reason for v in variants if v.kind in ("lightgbm", "blend")}


def variant_config(cfg: PipelineConfig, variant: Variant, seed: int) -> PipelineConfig:
    """The base config with the variant's overrides and the seed applied (ConfigError if bad)."""
    overrides = [*variant.overrides, f"train.seed={seed}"]
    return config_from_dict(cfg.model_dump(mode="json"), overrides, f"variant '{variant.name}'")
