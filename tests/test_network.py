"""SequenceModel: padding invariance, switch-offs, export, overfitting a tiny batch, the score."""

from __future__ import annotations

import warnings

import pytest
import torch

from alphaloom.model.batch import NUM_CLASSES
from alphaloom.model.network import (
    OrdinalHead,
    SequenceModel,
    expected_class_score,
    right_align,
)
from alphaloom.tasks.common.config import ModelSection

F_DIM, TEXT_DIM, N_INDUSTRIES, N_INDICES = 6, 8, 5, 3
SMALL = {"input_dim": 16, "lstm_hidden": 16, "attention_heads": 2, "mlp_hidden": 16}


def make_batch(batch: int = 8, steps: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full batch per model/batch.py (no padding); tests add padding themselves."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, steps, F_DIM, generator=gen),
        "mask": torch.ones(batch, steps, dtype=torch.bool),
        "text": torch.randn(batch, TEXT_DIM, generator=gen),
        "has_text": (torch.arange(batch) % 2).float(),
        "industry": torch.randint(0, N_INDUSTRIES, (batch,), generator=gen),
        "index": torch.randint(0, N_INDICES, (batch,), generator=gen),
        "dow": torch.randint(0, 7, (batch,), generator=gen),
        "month": torch.randint(0, 12, (batch,), generator=gen),
        "label": torch.randint(0, NUM_CLASSES, (batch,), generator=gen),
    }


def make_model(**overrides) -> SequenceModel:
    torch.manual_seed(0)
    spec = ModelSection(**{**SMALL, **overrides})
    return SequenceModel(spec, F_DIM, TEXT_DIM, N_INDUSTRIES, N_INDICES)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def left_pad(batch: dict[str, torch.Tensor], pads: list[int], fill: float) -> dict:
    """Prepend max(pads) steps; row i keeps the last `pads[i]` of them masked out (filled)."""
    extra = max(pads)
    size, _, feats = batch["x"].shape
    x = torch.cat([torch.full((size, extra, feats), fill), batch["x"]], dim=1)
    mask = torch.cat([torch.zeros(size, extra, dtype=torch.bool), batch["mask"]], dim=1)
    return {**batch, "x": x, "mask": mask}


@pytest.mark.parametrize("fill", [0.0, 123.0, float("nan")])
def test_a_fully_padded_prefix_changes_no_output(fill):
    model = make_model(lstm_layers=2).eval()
    batch = make_batch()
    # rows that already have some padding inside the window, different per row
    batch["mask"][:, :4] = torch.arange(4).unsqueeze(0) >= torch.arange(8).unsqueeze(1) % 5
    batch["x"] = torch.where(batch["mask"].unsqueeze(-1), batch["x"], torch.zeros(()))
    with torch.no_grad():
        base = model(batch)
        padded = model(left_pad(batch, [5] * 8, fill))
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded, base, atol=1e-5, rtol=1e-5)


def test_padding_is_not_simply_ignored_by_a_model_that_sees_nothing():
    """Guard for the test above: the same window with padded days made valid does change."""
    model = make_model().eval()
    batch = make_batch()
    padded = left_pad(batch, [3] * 8, 1.0)
    unmasked = {**padded, "mask": torch.ones_like(padded["mask"])}
    with torch.no_grad():
        assert not torch.allclose(model(padded), model(unmasked), atol=1e-4)


def test_right_align_rotates_padding_to_the_end():
    mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    index, lengths = right_align(mask)
    assert lengths.tolist() == [2, 4]
    assert index.tolist() == [[2, 3, 0, 1], [0, 1, 2, 3]]


SWITCHES = {
    "use_attention": ["x", "mask"],
    "use_text": ["text", "has_text"],
    "use_industry": ["industry"],
    "use_index": ["index"],
    "use_calendar": ["dow", "month"],
}


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_every_switch_off_builds_runs_without_its_keys_and_drops_parameters(switch):
    full = make_model()
    reduced = make_model(**{switch: False})
    assert n_params(reduced) < n_params(full)
    batch = make_batch()
    if switch != "use_attention":
        for key in SWITCHES[switch]:
            batch.pop(key)
            assert key not in reduced.input_keys
    logits = reduced(batch)
    assert logits.shape == (8, NUM_CLASSES)
    assert torch.isfinite(logits).all()


def test_plain_lstm_needs_only_x_and_mask():
    off = {f"use_{name}": False for name in ("attention", "text", "industry", "index", "calendar")}
    model = make_model(**off)
    assert set(model.input_keys) == {"x", "mask"}
    batch = make_batch()
    logits = model({"x": batch["x"], "mask": batch["mask"]})
    assert logits.shape == (8, NUM_CLASSES)


def test_calendar_fields_choose_the_embeddings():
    only_dow = make_model(calendar_fields=["dow"])
    assert "dow" in only_dow.input_keys and "month" not in only_dow.input_keys
    batch = make_batch()
    batch.pop("month")
    assert only_dow(batch).shape == (8, NUM_CLASSES)


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="attention_heads"):
        SequenceModel(ModelSection(lstm_hidden=10, attention_heads=4), F_DIM, 8, 3, 2)
    with pytest.raises(ValueError, match="n_industries"):
        SequenceModel(ModelSection(), F_DIM, 8, 0, 2)


def test_expected_class_score_is_the_probability_weighted_class():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 1e-9, 1e-9, 1e-9]]))
    score = expected_class_score(logits)
    torch.testing.assert_close(score, torch.tensor([0.2 + 0.6 + 1.2, 0.0]), atol=1e-6, rtol=0)


def test_forward_exports_with_torch_export():
    model = make_model(lstm_layers=2).eval()
    batch = left_pad(make_batch(), [2] * 8, 0.0)
    inputs = {key: batch[key] for key in model.input_keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # LSTM flat-weight notice from torch.export
        exported = torch.export.export(model, (inputs,))
    other = left_pad(make_batch(seed=5), [2] * 8, 0.0)
    other = {key: other[key] for key in model.input_keys}
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(other), model(other), atol=1e-5, rtol=1e-5)


def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = make_model(mlp_dropout=0.0)
    batch = make_batch(batch=64, steps=8, seed=3)
    batch["mask"][:16, :3] = False  # some padded rows too
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(300):
        optimizer.zero_grad()
        loss = loss_fn(model(batch), batch["label"])
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(batch).argmax(1) == batch["label"]).float().mean().item()
    assert accuracy >= 0.98


def test_runs_under_bf16_autocast():
    model = make_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(make_batch())
    assert torch.isfinite(logits.float()).all()


# ----------------------------------------------------------------------------------------------
# the ordinal head and the score


def test_ordinal_logits_carry_class_probabilities_and_the_utility():
    model = make_model(head="ordinal").eval()
    batch = make_batch(batch=16)
    with torch.no_grad():
        logits = model(batch)
        features = torch.cat(
            [*model.encode_window(batch["x"], batch["mask"])]
            + [table(batch[name]) for name, table in model.embeddings.items()]
            + [model.text_proj(torch.cat([batch["text"], batch["has_text"][:, None]], -1))],
            dim=-1,
        )
        utility = model.head[-1].utility(model.head[:-1](features)).squeeze(1)
    torch.testing.assert_close(logits.softmax(dim=1).sum(dim=1), torch.ones(16))
    torch.testing.assert_close(model.score(logits), utility, atol=1e-5, rtol=1e-5)


def test_ordinal_thresholds_stay_ordered_and_the_score_ranks_by_utility():
    head = OrdinalHead(in_dim=1)
    with torch.no_grad():
        head.raw_gaps.copy_(torch.tensor([-30.0, 5.0]))  # any values: still increasing
        head.first.fill_(3.0)
        head.utility.weight.fill_(1.0)
        head.utility.bias.zero_()
    theta = head.thresholds()
    assert (theta.diff() > 0).all()
    u = torch.linspace(-40, 40, 81).unsqueeze(1)
    logits = head(u)
    assert torch.isfinite(logits).all()
    probs = logits.softmax(dim=1)
    # P(y > k) = sigmoid(u - theta_k): the cumulative link holds for every k
    above = torch.flip(torch.cumsum(torch.flip(probs, [1]), 1), [1])[:, 1:]
    torch.testing.assert_close(above, torch.sigmoid(u - theta), atol=1e-5, rtol=1e-4)
    model = make_model(head="ordinal")
    score = model.score(logits)
    torch.testing.assert_close(score, u.squeeze(1), atol=1e-4, rtol=1e-5)
    assert (score.diff() > 0).all()  # strictly monotone, no saturation at extreme utilities


def test_class_values_change_the_score_and_travel_with_the_weights():
    model = make_model(head="softmax")
    batch = make_batch()
    with torch.no_grad():
        logits = model.eval()(batch)
        by_index = model.score(logits)
        model.set_class_values([-0.35, -0.05, 0.25, 0.45])
        fitted = model.score(logits)
    assert not torch.allclose(by_index, fitted)
    copy = make_model(head="softmax")
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy.class_values, torch.tensor([-0.35, -0.05, 0.25, 0.45]))
    with pytest.raises(ValueError, match="increasing"):
        model.set_class_values([0.0, 2.0, 1.0, 3.0])


def test_ordinal_model_exports_and_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = make_model(head="ordinal", mlp_dropout=0.0)
    batch = make_batch(batch=64, steps=8, seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(batch), batch["label"]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(batch).argmax(1) == batch["label"]).float().mean().item()
    assert accuracy >= 0.9
    inputs = {key: batch[key] for key in model.input_keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        exported = torch.export.export(model, (inputs,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(inputs), model(inputs), atol=1e-5, rtol=1e-5)
