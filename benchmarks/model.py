"""Forward + backward throughput of the default SequenceModel against a plain LSTM.

The plain LSTM is the same network with attention and every embedding switched off (input
projection -> LSTM -> last state -> MLP), so the ratio is the price of the extra components.
Each timed step is forward, the default composite loss (with its per-day ranking term, fed by
the training loop's own `batch_loss`; the synthetic batch holds whole days of 300 names, as the
date-grouped loader gives on the default market), and backward (no optimizer step).

    .venv/bin/python benchmarks/model.py [--batch 1024 --steps 60 --features 158 --iters 5]

Prints samples/s per variant and device (CPU, plus CUDA when available) and, last,
`overhead=<full time per sample / plain time per sample>` of the last device measured.
"""

from __future__ import annotations

import argparse
import time

import torch

from alphaloom.model.losses import build_loss
from alphaloom.model.network import SequenceModel
from alphaloom.tasks.common.config import LossSection, ModelSection
from alphaloom.tasks.training.train import batch_loss

TEXT_DIM, N_INDUSTRIES, N_INDICES = 384, 11, 4
NAMES_PER_DAY = 300  # the default synthetic market's symbols: one day of a date-grouped batch
START_DAY = 14613  # 2010-01-04 as days since 1970-01-01
PLAIN = {f"use_{part}": False for part in ("attention", "text", "industry", "index", "calendar")}


def make_batch(batch: int, steps: int, features: int, device: torch.device) -> dict:
    """A synthetic batch in the model/batch.py layout, a quarter of the rows left padded, rows
    grouped into whole days of NAMES_PER_DAY (as `loader.group_by_date` gives)."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, steps, dtype=torch.bool)
    mask[: batch // 4, : steps // 3] = False
    data = {
        "x": torch.randn(batch, steps, features, generator=gen) * mask.unsqueeze(-1),
        "mask": mask,
        "text": torch.randn(batch, TEXT_DIM, generator=gen),
        "has_text": torch.ones(batch),
        "industry": torch.randint(0, N_INDUSTRIES, (batch,), generator=gen),
        "index": torch.randint(0, N_INDICES, (batch,), generator=gen),
        "dow": torch.randint(0, 5, (batch,), generator=gen),
        "month": torch.randint(0, 12, (batch,), generator=gen),
        "label": torch.randint(0, 4, (batch,), generator=gen),
        "fwd_return": torch.randn(batch, generator=gen) * 0.02,
        "date": START_DAY + torch.arange(batch) // NAMES_PER_DAY,
    }
    return {key: value.to(device) for key, value in data.items()}


def seconds_per_step(spec: ModelSection, batch: dict, features: int, iters: int, warmup: int):
    """Median wall time of forward + loss + backward, and the parameter count."""
    device = batch["x"].device
    torch.manual_seed(0)
    model = SequenceModel(spec, features, TEXT_DIM, N_INDUSTRIES, N_INDICES).to(device).train()
    loss_fn = build_loss(LossSection()).to(device).train()
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        batch_loss(model, loss_fn, model(batch).float(), batch)["loss"].backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    n_params = sum(p.numel() for p in model.parameters())
    return sorted(times)[len(times) // 2], n_params


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--features", type=int, default=158)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cpu-only", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    print(
        f"batch={args.batch} T={args.steps} F={args.features} iters={args.iters} "
        f"cpu_threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    ratio = float("nan")
    for device in devices:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        batch = make_batch(args.batch, args.steps, args.features, device)
        results = {}
        for variant, spec in (("full", ModelSection()), ("plain_lstm", ModelSection(**PLAIN))):
            sec, n_params = seconds_per_step(spec, batch, args.features, args.iters, args.warmup)
            results[variant] = sec
            print(
                f"[{name}] {variant:10s} params={n_params:7d} {sec * 1e3:9.1f} ms/step "
                f"{args.batch / sec:10.0f} samples/s (forward+backward)"
            )
        ratio = results["full"] / results["plain_lstm"]
        print(f"[{name}] overhead={ratio:.3f}")
    print(f"overhead={ratio:.3f}")


if __name__ == "__main__":
    main()
