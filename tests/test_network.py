"""SequenceModel: padding invariance, switch-offs, export, overfitting a tiny batch, the score."""

from __future__ import annotations

import warnings

import pytest
import torch

from alphaloom.model.batch import NUM_CLASSES
from alphaloom.model.network import SequenceModel, expected_class_score, right_align
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
