"""The network and losses on CUDA (cuDNN LSTM, bf16 autocast); skipped where there is no GPU."""

from __future__ import annotations

import pytest
import torch

from alphaloom.model.losses import build_loss
from alphaloom.tasks.common.config import LossSection
from tests.test_network import left_pad, make_batch, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def on_cuda(batch: dict) -> dict:
    return {key: value.to(CUDA) for key, value in batch.items()}


def test_cuda_matches_cpu_and_padding_changes_nothing():
    model = make_model(lstm_layers=2).eval()
    batch = make_batch()
    with torch.no_grad():
        cpu = model(batch)
        model = model.to(CUDA)
        gpu = model(on_cuda(batch))
        padded = model(on_cuda(left_pad(batch, [7] * 8, float("nan"))))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded, gpu, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_training_step_is_finite():
    model = make_model().to(CUDA)
    loss_fn = build_loss(LossSection()).to(CUDA)
    batch = on_cuda(make_batch(batch=64))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(batch)
        parts = loss_fn(logits * 1e4, batch["label"])  # extreme logits too
    assert parts["loss"].dtype == torch.float32
    parts["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
