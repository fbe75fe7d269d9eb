"""Composite training loss: focal loss + lambda * ordinal distance loss (+ a per-day ranking term).

Conventions shared by every loss here:
- Inputs are logits [B, K] and labels [B] (int64, 0..K-1); label -1 (not yet known) is ignored.
- Everything is computed in float32 with autocast disabled, from log-softmax, so bf16/fp16
  training and logits anywhere in +-1e4 give finite values and gradients.
- Reduction is the PLAIN mean over the non-ignored samples (sum of per-sample terms / count, where
  alpha only scales each sample's term; it is not a weighted mean divided by sum(alpha) as
  `torch.nn.functional.cross_entropy(weight=...)` computes). A batch with no known label gives 0.

This module imports only torch: `build_loss` takes any object with `LossSection`'s attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from alphaloom.model.batch import NUM_CLASSES

IGNORE_LABEL = -1


class LossSpec(Protocol):
    """The attributes `build_loss` reads; tasks.common.config.LossSection satisfies it."""

    kind: Literal["composite", "focal", "cross_entropy"]
    gamma: float
    alpha: Literal["batch", "batch_symmetric"] | Sequence[float] | None
    alpha_smoothing: float
    alpha_ema: float | None
    distance_weight: float
    distance_power: float
    distance_normalize: bool
    rank_weight: float
    rank_min_names: int


def _prepare(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float32 log-probs [B,K], labels with ignored rows set to 0, and the known-row mask [B]."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [B, K] and labels [B], got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    n_classes = logits.shape[1]
    known = labels != IGNORE_LABEL
    bad = known & ((labels < 0) | (labels >= n_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(f"label {value} is outside 0..{n_classes - 1} (and is not -1 = unknown)")
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    safe_labels = torch.where(known, labels, torch.zeros_like(labels))
    return log_probs, safe_labels, known


def _masked_mean(values: Tensor, known: Tensor) -> Tensor:
    """Plain mean of `values` over known rows; 0 (still attached to the graph) when none."""
    total = torch.where(known, values, torch.zeros_like(values)).sum()
    return total / known.sum().clamp_min(1).to(total.dtype)


def batch_class_weights(
    labels: Tensor, n_classes: int, smoothing: float, symmetric: bool = False
) -> Tensor:
    """Inverse class frequency 1 / (count_c + smoothing), normalised to mean 1 over the K classes.

    The additive smoothing keeps an absent class finite (its weight is then 1/smoothing before
    normalisation). Ignored labels (-1) are not counted. `symmetric` gives class k and class
    K-1-k the mean of their two weights: the rare top class is still up-weighted, but so is the
    bottom one by the same amount, so the weighting rewards neither tail over the other (plain
    inverse frequency up-weights only the top decile, which pays any stock with fat tails).
    """
    if smoothing <= 0:
        raise ValueError(f"alpha smoothing must be > 0 (absent classes stay finite): {smoothing}")
    known = labels[labels != IGNORE_LABEL]
    counts = torch.bincount(known, minlength=n_classes)[:n_classes].float()
    raw = 1.0 / (counts + smoothing)
    if symmetric:
        raw = (raw + raw.flip(0)) / 2.0
    return raw * (n_classes / raw.sum())


class FocalLoss(nn.Module):
    """Multi-class softmax focal loss FL = -alpha_y (1 - p_y)^gamma log p_y (plain mean).

    `alpha`: None (all 1), a per-class sequence of K weights, or "batch" (inverse class frequency
    of the current batch, see `batch_class_weights`, optionally smoothed across batches by an
    exponential moving average with decay `alpha_ema`), or "batch_symmetric" (the same with
    mirrored classes sharing one weight). A scalar alpha, which detection libraries
    apply as alpha for class 1 and 1-alpha for "background" class 0, is rejected: class 0 here is
    the worst return bucket, not background. The EMA advances only in training mode; in eval mode
    the current average is used as is. It is a buffer, so it is saved with the state_dict.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: Literal["batch", "batch_symmetric"] | Sequence[float] | None = None,
        alpha_smoothing: float = 1.0,
        alpha_ema: float | None = None,
        n_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        if isinstance(alpha, int | float):
            raise TypeError(
                "a scalar focal alpha treats class 0 as background; pass None, 'batch' or one "
                f"weight per class ({n_classes} values)"
            )
        if alpha_ema is not None and not 0.0 <= alpha_ema < 1.0:
            raise ValueError(f"alpha_ema must lie in [0, 1), got {alpha_ema}")
        self.gamma = float(gamma)
        self.n_classes = n_classes
        self.batch_alpha = alpha in ("batch", "batch_symmetric")
        self.symmetric_alpha = alpha == "batch_symmetric"
        self.alpha_smoothing = float(alpha_smoothing)
        self.alpha_ema = alpha_ema
        if self.batch_alpha:
            batch_class_weights(torch.zeros(0, dtype=torch.long), n_classes, alpha_smoothing)
            fixed = None
        elif alpha is None:
            fixed = None
        else:
            fixed = torch.as_tensor(list(alpha), dtype=torch.float32)
            if fixed.shape != (n_classes,) or bool((fixed < 0).any()):
                raise ValueError(f"alpha needs {n_classes} non-negative weights, got {list(alpha)}")
        self.register_buffer("fixed_alpha", fixed)
        self.register_buffer("alpha_average", torch.ones(n_classes))
        self.register_buffer("alpha_updates", torch.zeros((), dtype=torch.long))

    def class_weights(self, labels: Tensor) -> Tensor | None:
        """The per-class alpha used for this batch (advancing the EMA when training)."""
        if self.fixed_alpha is not None:
            return self.fixed_alpha
        if not self.batch_alpha:
            return None
        current = batch_class_weights(
            labels, self.n_classes, self.alpha_smoothing, self.symmetric_alpha
        )
        if self.alpha_ema is None:
            return current
        if not self.training:
            return self.alpha_average.clone() if int(self.alpha_updates) else current
        blended = self.alpha_ema * self.alpha_average + (1.0 - self.alpha_ema) * current
        updated = torch.where(self.alpha_updates > 0, blended, current)
        self.alpha_average.copy_(updated)
        self.alpha_updates += 1
        return updated

    def per_sample(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample focal terms [B] (0 for ignored rows) and the known-row mask [B]."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            log_probs, safe_labels, known = _prepare(logits, labels)
            log_p = log_probs.gather(1, safe_labels.unsqueeze(1)).squeeze(1)
            loss = -log_p
            if self.gamma > 0:
                # 1 - p via expm1 is exact near p = 1; the clamp keeps d/dp of x^gamma finite.
                one_minus_p = (-torch.expm1(log_p)).clamp_min(1e-30)
                loss = loss * one_minus_p.pow(self.gamma)
            alpha = self.class_weights(labels.to(logits.device))
            if alpha is not None:
                loss = loss * alpha.to(loss.device)[safe_labels]
            return torch.where(known, loss, torch.zeros_like(loss)), known

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Plain mean focal loss over the non-ignored samples (float32 scalar)."""
        loss, known = self.per_sample(logits, labels)
        return _masked_mean(loss, known)


class OrdinalDistanceLoss(nn.Module):
    """Expected distance to the true class: sum_k p_k |k - y|^power (power 2 by default).

    With power 2 this equals (E_p[k] - y)^2 + Var_p[k]: it punishes probability mass far from the
    truth and, through the variance, contradictory predictions (p0 = p3 = 0.5 is the worst spread).
    With `normalize` the per-sample value is divided by (K-1)^power, so it lies in [0, 1].
    """

    def __init__(
        self, power: float = 2.0, normalize: bool = True, n_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        if power <= 0:
            raise ValueError(f"distance power must be > 0, got {power}")
        self.power = float(power)
        self.normalize = normalize
        self.n_classes = n_classes

    def per_sample(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample expected distances [B] (0 for ignored rows) and the known-row mask [B]."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            log_probs, safe_labels, known = _prepare(logits, labels)
            classes = torch.arange(log_probs.shape[1], device=logits.device, dtype=torch.float32)
            gap = (classes.unsqueeze(0) - safe_labels.unsqueeze(1).float()).abs()
            distance = (log_probs.exp() * gap.pow(self.power)).sum(dim=1)
            if self.normalize:
                distance = distance / float(log_probs.shape[1] - 1) ** self.power
            return torch.where(known, distance, torch.zeros_like(distance)), known

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Plain mean expected distance over the non-ignored samples (float32 scalar)."""
        distance, known = self.per_sample(logits, labels)
        return _masked_mean(distance, known)


def day_rank_targets(returns: Tensor, group: Tensor, counts: Tensor) -> Tensor:
    """Each return's percentile rank within its group, centred: (rank + 1/2) / n - 1/2."""
    by_return = torch.argsort(returns)
    order = by_return[torch.argsort(group[by_return], stable=True)]  # by group, then return
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(group)
    position[order] = torch.arange(len(order), device=group.device)
    rank = (position - starts[group]).to(returns.dtype)
    return (rank + 0.5) / counts[group].to(returns.dtype) - 0.5


class DailyCorrelationLoss(nn.Module):
    """1 - the mean per-day Pearson correlation of the score with the rank of the forward return.

    Rows are grouped by `days` (a batch of whole days: the loader's `group_by_date` mode); a
    day's target is the centred percentile rank of its forward returns, so the term is a smooth
    stand-in for that day's Rank IC, the metric the product is judged by. Days are weighted by
    their size; days with fewer than `min_names` known returns (e.g. the part of a day cut off at
    a batch edge) are left out. Rows with a NaN return are ignored. A batch with no usable day
    gives 0 (attached to the graph).
    """

    def __init__(self, min_names: int = 10) -> None:
        super().__init__()
        if min_names < 2:
            raise ValueError(f"a correlation needs at least 2 names per day, got {min_names}")
        self.min_names = int(min_names)

    def forward(self, score: Tensor, returns: Tensor, days: Tensor) -> Tensor:
        with torch.autocast(device_type=score.device.type, enabled=False):
            score = score.float()
            known = torch.isfinite(returns)
            s, r = score[known], returns[known].float()
            _, group = torch.unique(days[known], return_inverse=True)
            counts = torch.bincount(group)
            target = day_rank_targets(r, group, counts)
            n_groups = len(counts)
            n = counts.to(s.dtype).clamp_min(1)

            def by_group(values: Tensor) -> Tensor:
                return torch.zeros(n_groups, device=s.device, dtype=s.dtype).index_add_(
                    0, group, values
                )

            ds = s - (by_group(s) / n)[group]
            dt = target - (by_group(target) / n)[group]
            cov, var_s, var_t = by_group(ds * dt), by_group(ds * ds), by_group(dt * dt)
            corr = cov / torch.sqrt(var_s * var_t + 1e-12)
            usable = (counts >= self.min_names).to(s.dtype)
            weight = usable * n
            total = weight.sum()
            mean_corr = (corr * weight).sum() / total.clamp_min(1.0)
            # no usable day: 0 with a zero gradient (a Python branch would sync the GPU)
            return torch.where(total > 0, 1.0 - mean_corr, score.sum() * 0.0)


class CompositeLoss(nn.Module):
    """loss = classification + distance_weight * distance + rank_weight * rank; each part is
    returned for logging.

    `distance=None` (kinds "focal" and "cross_entropy") reports a distance of 0, `rank=None` a
    rank term of 0. The rank term needs the score, forward returns and days of the batch.
    """

    def __init__(
        self,
        classification: FocalLoss,
        distance: OrdinalDistanceLoss | None = None,
        distance_weight: float = 0.0,
        rank: DailyCorrelationLoss | None = None,
        rank_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if distance_weight < 0 or rank_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got distance {distance_weight}, rank {rank_weight}"
            )
        self.focal = classification
        self.distance = distance
        self.distance_weight = float(distance_weight) if distance is not None else 0.0
        self.rank = rank
        self.rank_weight = float(rank_weight) if rank is not None else 0.0

    @property
    def needs_days(self) -> bool:
        """Whether forward() needs `score`, `returns` and `days` (the ranking term is on)."""
        return self.rank is not None

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        score: Tensor | None = None,
        returns: Tensor | None = None,
        days: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """{"loss", "focal", "distance", "rank"}: the total and each term (float32 scalars)."""
        focal = self.focal(logits, labels)
        zero = torch.zeros_like(focal)
        distance = zero if self.distance is None else self.distance(logits, labels)
        if self.rank is None:
            rank = zero
        elif score is None or returns is None or days is None:
            raise ValueError("the ranking term needs the batch's score, returns and days")
        else:
            rank = self.rank(score, returns, days)
        total = focal + self.distance_weight * distance + self.rank_weight * rank
        return {"loss": total, "focal": focal, "distance": distance, "rank": rank}


def build_loss(spec: LossSpec, n_classes: int = NUM_CLASSES) -> CompositeLoss:
    """The configured loss: "composite" (focal + lambda * distance), "focal", or "cross_entropy".

    "cross_entropy" is the focal loss with gamma 0 and no alpha, which is exactly plain CE. Any
    kind adds the per-day ranking term when `rank_weight` > 0.
    """
    rank = DailyCorrelationLoss(spec.rank_min_names) if spec.rank_weight > 0 else None
    if spec.kind == "cross_entropy":
        return CompositeLoss(
            FocalLoss(gamma=0.0, alpha=None, n_classes=n_classes),
            rank=rank,
            rank_weight=spec.rank_weight,
        )
    if spec.kind not in ("composite", "focal"):
        raise ValueError(f"loss.kind must be composite, focal or cross_entropy, got {spec.kind!r}")
    focal = FocalLoss(
        gamma=spec.gamma,
        alpha=spec.alpha,
        alpha_smoothing=spec.alpha_smoothing,
        alpha_ema=spec.alpha_ema,
        n_classes=n_classes,
    )
    if spec.kind == "focal":
        return CompositeLoss(focal, rank=rank, rank_weight=spec.rank_weight)
    distance = OrdinalDistanceLoss(spec.distance_power, spec.distance_normalize, n_classes)
    return CompositeLoss(focal, distance, spec.distance_weight, rank, spec.rank_weight)
