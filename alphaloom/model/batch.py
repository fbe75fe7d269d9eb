"""The batch contract between the loader (model/dataset.py), the network and the training loop.

A batch is a plain dict of tensors, all with leading dimension B (one row per window):

| key          | dtype   | shape     | meaning                                                     |
| ------------ | ------- | --------- | ----------------------------------------------------------- |
| `x`          | float32 | [B, T, F] | normalised factors of the window's T days; 0 where padded  |
| `mask`       | bool    | [B, T]    | True on days with a bar; False on the left padding and on   |
|              |         |           | the symbol's gap days (T positions = T trading days)        |
| `text`       | float32 | [B, D]    | description vector valid on the end day (zeros without one) |
| `has_text`   | float32 | [B]       | 1.0 when the symbol has a description then, else 0.0        |
| `industry`   | int64   | [B]       | industry id on the end day, 0 = unknown                     |
| `index`      | int64   | [B]       | index-membership id on the end day, 0 = in no index         |
| `dow`        | int64   | [B]       | day of week of the end day, 0 = Monday                      |
| `month`      | int64   | [B]       | month of the end day, 0 = January                           |
| `label`      | int64   | [B]       | ordered class 0..3 (3 = best), -1 when not yet known        |
| `fwd_return` | float32 | [B]       | continuous forward return, NaN when not yet known           |
| `symbol`     | int64   | [B]       | symbol id (row of the shard set's symbol table)             |
| `date`       | int64   | [B]       | end day as days since 1970-01-01                            |

Windows end at day t; the label is the return from t+1 to t+1+horizon, so nothing in `x` sees it.
"""

from __future__ import annotations

import torch

Batch = dict[str, torch.Tensor]

NUM_CLASSES = 4

BATCH_KEYS = (
    "x",
    "mask",
    "text",
    "has_text",
    "industry",
    "index",
    "dow",
    "month",
    "label",
    "fwd_return",
    "symbol",
    "date",
)


def move_batch(batch: Batch, device: torch.device, non_blocking: bool = False) -> Batch:
    """Move every tensor of a batch to `device`."""
    return {key: value.to(device, non_blocking=non_blocking) for key, value in batch.items()}
