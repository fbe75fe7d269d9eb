"""Focal, ordinal distance and composite losses: values, gradients, stability, config kinds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alphaloom.model.losses import (
    CompositeLoss,
    DailyCorrelationLoss,
    FocalLoss,
    OrdinalDistanceLoss,
    batch_class_weights,
    build_loss,
    day_rank_targets,
)
from alphaloom.tasks.common.config import LossSection


def _logits_for(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is `probs` (zeros become a tiny probability)."""
    return torch.tensor(probs).clamp_min(1e-12).log()


def test_focal_with_gamma_zero_and_no_alpha_is_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(32, 4) * 3
    labels = torch.randint(0, 4, (32,))
    labels[::5] = -1
    focal = FocalLoss(gamma=0.0, alpha=None)(logits, labels)
    expected = F.cross_entropy(logits, labels, ignore_index=-1)
    torch.testing.assert_close(focal, expected)


def test_focal_gradient_matches_the_analytic_formula():
    gamma = 2.0
    logits = torch.tensor([[1.0, -0.5, 0.3, 2.0], [0.2, 0.1, -1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([2, 0])
    FocalLoss(gamma=gamma, alpha=None)(logits, labels).backward()

    with torch.no_grad():
        probs = torch.softmax(logits, dim=1)
        expected = torch.empty_like(probs)
        for row, y in enumerate(labels.tolist()):
            p = probs[row, y]
            # dL/dz_j = [gamma (1-p)^(gamma-1) p log p - (1-p)^gamma] (delta_jy - p_j), mean over B
            coef = gamma * (1 - p) ** (gamma - 1) * p * torch.log(p) - (1 - p) ** gamma
            onehot = F.one_hot(torch.tensor(y), 4).float()
            expected[row] = coef * (onehot - probs[row]) / len(labels)
    torch.testing.assert_close(logits.grad, expected)


def test_focal_down_weights_easy_examples():
    easy = torch.tensor([[4.0, 0.0, 0.0, 0.0]])
    label = torch.tensor([0])
    ce = FocalLoss(gamma=0.0)(easy, label)
    focal = FocalLoss(gamma=2.0)(easy, label)
    p = torch.softmax(easy, 1)[0, 0]
    torch.testing.assert_close(focal, ce * (1 - p) ** 2)


def test_batch_alpha_with_an_absent_class_is_finite_and_matches_hand_computation():
    labels = torch.tensor([0, 0, 0, 1, 2, 2, -1])  # class 3 absent, -1 ignored
    smoothing = 1.0
    raw = [1 / (3 + smoothing), 1 / (1 + smoothing), 1 / (2 + smoothing), 1 / (0 + smoothing)]
    hand = [w * 4 / sum(raw) for w in raw]
    weights = batch_class_weights(labels, 4, smoothing)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights, torch.tensor(hand))
    assert weights.mean().item() == pytest.approx(1.0)

    logits = torch.randn(7, 4)
    loss = FocalLoss(gamma=0.0, alpha="batch", alpha_smoothing=smoothing)(logits, labels)
    nll = -torch.log_softmax(logits, 1)[torch.arange(6), labels[:6]]
    expected = sum(hand[y] * nll[i] for i, y in enumerate(labels[:6].tolist())) / 6
    torch.testing.assert_close(loss, expected)


def test_fixed_alpha_scales_each_class_and_scalar_alpha_is_rejected():
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 3, 1])
    alpha = [0.5, 1.0, 2.0, 4.0]
    loss = FocalLoss(gamma=0.0, alpha=alpha)(logits, labels)
    nll = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(loss, (torch.tensor(alpha)[labels] * nll).mean())
    with pytest.raises(TypeError, match="background"):
        FocalLoss(alpha=0.25)
    with pytest.raises(ValueError, match="4 non-negative"):
        FocalLoss(alpha=[1.0, 2.0])


def test_batch_alpha_ema_blends_batches_in_training_and_freezes_in_eval():
    focal = FocalLoss(gamma=0.0, alpha="batch", alpha_ema=0.9)
    first = torch.tensor([0, 0, 1, 2, 3])
    second = torch.tensor([3, 3, 3, 3, 0])
    w1 = focal.class_weights(first)
    torch.testing.assert_close(w1, batch_class_weights(first, 4, 1.0))
    w2 = focal.class_weights(second)
    torch.testing.assert_close(w2, 0.9 * w1 + 0.1 * batch_class_weights(second, 4, 1.0))
    focal.eval()
    torch.testing.assert_close(focal.class_weights(first), w2)
    assert "alpha_average" in focal.state_dict()


def test_distance_loss_values():
    distance = OrdinalDistanceLoss(power=2.0, normalize=False)
    onehot_truth = _logits_for([[0.0, 0.0, 1.0, 0.0]])
    assert distance(onehot_truth, torch.tensor([2])).item() == pytest.approx(0.0, abs=1e-9)

    label = torch.tensor([1])
    contradictory = distance(_logits_for([[0.5, 0.0, 0.0, 0.5]]), label)
    adjacent = distance(_logits_for([[0.0, 0.5, 0.5, 0.0]]), label)
    assert contradictory.item() == pytest.approx(0.5 * 1 + 0.5 * 4, rel=1e-5)
    assert adjacent.item() == pytest.approx(0.5 * 1, rel=1e-5)
    assert contradictory > adjacent

    # (E[k] - y)^2 + Var[k] identity on a random distribution
    logits = torch.randn(1, 4)
    p = torch.softmax(logits, 1)[0]
    k = torch.arange(4.0)
    mean = (p * k).sum()
    identity = (mean - 3) ** 2 + (p * (k - mean) ** 2).sum()
    torch.testing.assert_close(distance(logits, torch.tensor([3])), identity)

    normalized = OrdinalDistanceLoss(power=1.0, normalize=True)(
        _logits_for([[1.0, 0.0, 0.0, 0.0]]), torch.tensor([3])
    )
    assert normalized.item() == pytest.approx(1.0, rel=1e-5)


def test_composite_returns_parts_and_build_loss_kinds():
    torch.manual_seed(1)
    logits = torch.randn(16, 4)
    labels = torch.randint(0, 4, (16,))
    spec = LossSection(kind="composite", alpha=None, distance_weight=0.7, rank_weight=0)
    parts = build_loss(spec)(logits, labels)
    assert set(parts) == {"loss", "focal", "distance", "rank"}
    assert parts["rank"].item() == 0.0  # off at loss.rank_weight = 0
    torch.testing.assert_close(parts["loss"], parts["focal"] + 0.7 * parts["distance"])
    assert parts["distance"] > 0

    focal_only = build_loss(LossSection(kind="focal", rank_weight=0))(logits, labels)
    assert focal_only["distance"].item() == 0.0
    torch.testing.assert_close(focal_only["loss"], parts["focal"])

    ce = build_loss(LossSection(kind="cross_entropy", rank_weight=0))(logits, labels)
    torch.testing.assert_close(ce["loss"], F.cross_entropy(logits, labels))
    assert isinstance(build_loss(LossSection()), CompositeLoss)


def test_all_ignored_batch_gives_zero_not_nan():
    logits = torch.randn(3, 4, requires_grad=True)
    parts = build_loss(LossSection(rank_weight=0))(logits, torch.full((3,), -1))
    assert parts["loss"].item() == 0.0
    parts["loss"].backward()
    assert torch.isfinite(logits.grad).all()


def test_out_of_range_label_is_a_clear_error():
    with pytest.raises(ValueError, match=r"label 4 is outside 0\.\.3"):
        build_loss(LossSection(rank_weight=0))(torch.randn(2, 4), torch.tensor([0, 4]))


@pytest.mark.parametrize("kind", ["composite", "focal", "cross_entropy"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_no_nan_at_extreme_logits_also_under_bf16_autocast(kind, gamma):
    big = 1e4
    logits32 = torch.tensor(
        [[big, -big, 0.0, -big], [-big, -big, -big, big], [big, big, -big, -big], [0.0] * 4]
    )
    labels = torch.tensor([0, 1, 3, 2])  # right with certainty, wrong with certainty, tie, flat
    loss_fn = build_loss(LossSection(kind=kind, gamma=gamma, rank_weight=0))
    for use_autocast in (False, True):
        weight = torch.ones(4, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            logits = torch.nn.functional.linear(logits32, torch.diag(weight))
            if use_autocast:
                assert logits.dtype == torch.bfloat16
            parts = loss_fn(logits, labels)
        assert all(torch.isfinite(value) for value in parts.values())
        assert parts["loss"].dtype == torch.float32
        parts["loss"].backward()
        assert torch.isfinite(weight.grad).all()
        if kind == "cross_entropy":  # two rows cost ~2e4 nats each: the mean is ~1e4, not inf
            assert parts["loss"].item() == pytest.approx(big, rel=0.02)


# ----------------------------------------------------------------------------------------------
# the per-day ranking term


def test_rank_targets_are_centred_percentiles_per_day():
    days = torch.tensor([5, 5, 5, 9, 9])
    returns = torch.tensor([0.3, -0.1, 0.2, 7.0, -7.0])
    _, group = torch.unique(days, return_inverse=True)
    targets = day_rank_targets(returns, group, torch.bincount(group))
    torch.testing.assert_close(targets, torch.tensor([1 / 3, -1 / 3, 0.0, 0.25, -0.25]))


def test_daily_correlation_loss_scores_each_day_by_rank():
    gen = torch.Generator().manual_seed(0)
    days = torch.repeat_interleave(torch.arange(4), 25)
    returns = torch.randn(100, generator=gen)
    _, group = torch.unique(days, return_inverse=True)
    ranks = day_rank_targets(returns, group, torch.bincount(group))
    loss = DailyCorrelationLoss(min_names=10)
    assert loss(ranks, returns, days).item() == pytest.approx(0.0, abs=1e-5)
    assert loss(-ranks, returns, days).item() == pytest.approx(2.0, abs=1e-5)
    # a per-day shift does not matter (a day's level is not ranked), a cross-day one neither
    shifted = ranks + days.float() * 10
    assert loss(shifted, returns, days).item() == pytest.approx(0.0, abs=1e-5)


def test_daily_correlation_loss_skips_small_days_and_unknown_returns():
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(30, generator=gen)
    score = torch.cat([big, torch.tensor([1.0, 2.0, 3.0])])
    returns = torch.cat([big, torch.tensor([3.0, 2.0, 1.0])])  # a perfectly wrong tiny day
    days = torch.cat([torch.zeros(30, dtype=torch.long), torch.ones(3, dtype=torch.long)])
    loss = DailyCorrelationLoss(min_names=10)
    alone = loss(big, big, torch.zeros(30, dtype=torch.long))
    torch.testing.assert_close(loss(score, returns, days), alone)
    returns_nan = returns.clone()
    returns_nan[:5] = float("nan")
    assert torch.isfinite(loss(score, returns_nan, days))
    none_usable = loss(score[30:], returns[30:], days[30:])
    assert none_usable.item() == 0.0


def test_one_gradient_step_on_the_ranking_term_raises_the_day_correlation():
    gen = torch.Generator().manual_seed(2)
    days = torch.repeat_interleave(torch.arange(3), 40)
    returns = torch.randn(120, generator=gen)
    score = torch.randn(120, generator=gen, requires_grad=True)
    loss = DailyCorrelationLoss()
    before = loss(score, returns, days)
    before.backward()
    with torch.no_grad():
        after = loss(score - 5.0 * score.grad, returns, days)
    assert after < before


def test_composite_adds_the_weighted_rank_term_and_needs_its_inputs():
    torch.manual_seed(3)
    logits = torch.randn(40, 4)
    labels = torch.randint(0, 4, (40,))
    returns = torch.randn(40)
    days = torch.repeat_interleave(torch.arange(2), 20)
    composite = build_loss(LossSection(alpha=None, rank_weight=0.5, rank_min_names=5))
    assert composite.needs_days
    score = logits.softmax(-1) @ torch.arange(4.0)
    parts = composite(logits, labels, score, returns, days)
    expected = parts["focal"] + 0.5 * parts["distance"] + 0.5 * parts["rank"]
    torch.testing.assert_close(parts["loss"], expected)
    assert 0.0 < parts["rank"].item() < 2.0
    with pytest.raises(ValueError, match="score, returns and days"):
        composite(logits, labels)
    assert not build_loss(LossSection(rank_weight=0)).needs_days


def test_symmetric_batch_alpha_weights_both_tails_alike():
    labels = torch.tensor([0] * 30 + [1] * 30 + [2] * 30 + [3] * 10)
    plain = batch_class_weights(labels, 4, smoothing=1.0)
    symmetric = batch_class_weights(labels, 4, smoothing=1.0, symmetric=True)
    assert plain[3] > 2 * plain[0]  # inverse frequency: only the top decile is up-weighted
    torch.testing.assert_close(symmetric[0], symmetric[3])
    torch.testing.assert_close(symmetric[1], symmetric[2])
    assert symmetric[3] > symmetric[1]  # the rare class is still up-weighted
    assert symmetric.mean().item() == pytest.approx(1.0)
    loss = FocalLoss(gamma=0.0, alpha="batch_symmetric")
    torch.testing.assert_close(loss.class_weights(labels), symmetric)
