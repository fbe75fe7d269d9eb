"""SequenceModel: LSTM + self-attention over a factor window, plus per-stock embeddings -> 4 logits.

Layout of one forward pass (every bracketed part can be switched off from the config):

    x [B,T,F] -> input projection -> LSTM -> [self-attention, residual, LayerNorm -> attention pool]
    [industry emb] [index emb] [calendar emb of the end day] [text projection (+ has_text flag)]
    concat(embeddings, last LSTM state, [attention pool]) -> MLP -> logits [B, 4]

Left padding. Windows are left padded (`mask` False on the oldest days). An LSTM over zero inputs
still moves its state (biases), so zeroing the padding is not enough. Instead every row is rotated
so its valid days come first and the padding goes to the end; the LSTM is causal, so padded steps
after the last valid day cannot influence any valid output. The last state is gathered at the last
valid step, and attention and pooling mask the padded positions out. This keeps cuDNN's fused LSTM
(no Python loop over time) and no Python branch depends on tensor values, so the forward traces and
exports (`torch.export`).

This module imports only torch: the architecture comes from any object with `ModelSection`'s
attributes (see `ModelSpec`); the defaults live in tasks/config.py only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from alphaloom.model.batch import NUM_CLASSES, Batch

CALENDAR_SIZES = {"dow": 7, "month": 12}


class ModelSpec(Protocol):
    """The attributes SequenceModel reads; tasks.config.ModelSection satisfies it."""

    input_dim: int
    lstm_hidden: int
    lstm_layers: int
    lstm_dropout: float
    use_attention: bool
    attention_heads: int
    use_text: bool
    text_proj_dim: int
    use_industry: bool
    industry_dim: int
    use_index: bool
    index_dim: int
    use_calendar: bool
    calendar_fields: Sequence[str]
    calendar_dim: int
    mlp_layers: int
    mlp_hidden: int
    mlp_dropout: float


def expected_class_score(logits: Tensor) -> Tensor:
    """The stock score sum_k k * p_k, [B]: monotone in expected return, used for ranking."""
    probs = torch.softmax(logits.float(), dim=-1)
    classes = torch.arange(logits.shape[-1], device=logits.device, dtype=probs.dtype)
    return probs @ classes


def right_align(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation indices [B,T] that move each row's left padding to the end, and valid lengths [B].

    Positions before a row's first True are padding; everything from it on counts as the window
    (the LSTM sees interior gaps as zero inputs; attention still masks them). Pure index arithmetic.
    """
    steps = mask.shape[1]
    started = torch.cumsum(mask.to(torch.int32), dim=1) > 0
    lengths = started.sum(dim=1)
    n_pad = steps - lengths
    positions = torch.arange(steps, device=mask.device).unsqueeze(0)
    index = (positions + n_pad.unsqueeze(1)) % steps
    return index, lengths


def _check_spec(spec: ModelSpec, n_features: int, text_dim: int, n_industries: int, n_indices: int):
    """Fail at construction with a message naming the setting, not deep inside a forward pass."""
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if spec.use_attention and spec.lstm_hidden % spec.attention_heads:
        raise ValueError(
            f"model.lstm_hidden ({spec.lstm_hidden}) must be divisible by "
            f"model.attention_heads ({spec.attention_heads})"
        )
    if spec.use_text and text_dim < 1:
        raise ValueError(f"text_dim must be >= 1 when model.use_text is on, got {text_dim}")
    if spec.use_industry and n_industries < 1:
        raise ValueError(f"n_industries must be >= 1 (id 0 = unknown), got {n_industries}")
    if spec.use_index and n_indices < 1:
        raise ValueError(f"n_indices must be >= 1 (id 0 = none), got {n_indices}")
    unknown = [name for name in spec.calendar_fields if name not in CALENDAR_SIZES]
    if spec.use_calendar and unknown:
        raise ValueError(
            f"model.calendar_fields has unknown entries {unknown}; known: {list(CALENDAR_SIZES)}"
        )


def _mlp(in_dim: int, hidden: int, layers: int, dropout: float) -> nn.Sequential:
    """`layers` hidden blocks (Linear, GELU, Dropout) followed by the 4-way output layer."""
    blocks: list[nn.Module] = []
    width = in_dim
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
        width = hidden
    blocks.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*blocks)


class SequenceModel(nn.Module):
    """Window of factors + stock embeddings -> 4 class logits; see the module docstring."""

    def __init__(
        self,
        spec: ModelSpec,
        n_features: int,
        text_dim: int,
        n_industries: int,
        n_indices: int,
    ) -> None:
        """Sizes come from the shard manifest; `n_industries`/`n_indices` include id 0."""
        super().__init__()
        _check_spec(spec, n_features, text_dim, n_industries, n_indices)
        self.n_features = n_features
        hidden = spec.lstm_hidden
        self.input_proj = nn.Sequential(nn.Linear(n_features, spec.input_dim), nn.GELU())
        self.lstm = nn.LSTM(
            spec.input_dim,
            hidden,
            num_layers=spec.lstm_layers,
            batch_first=True,
            dropout=spec.lstm_dropout if spec.lstm_layers > 1 else 0.0,
        )
        self.use_attention = spec.use_attention
        concat = hidden
        if spec.use_attention:
            self.attention = nn.MultiheadAttention(hidden, spec.attention_heads, batch_first=True)
            self.attention_norm = nn.LayerNorm(hidden)
            self.pool_score = nn.Linear(hidden, 1)
            concat += hidden
        self.embeddings = nn.ModuleDict()
        keys = ["x", "mask"]
        if spec.use_industry:
            self.embeddings["industry"] = nn.Embedding(n_industries, spec.industry_dim)
            concat += spec.industry_dim
        if spec.use_index:
            self.embeddings["index"] = nn.Embedding(n_indices, spec.index_dim)
            concat += spec.index_dim
        if spec.use_calendar:
            for name in spec.calendar_fields:
                self.embeddings[name] = nn.Embedding(CALENDAR_SIZES[name], spec.calendar_dim)
                concat += spec.calendar_dim
        keys += list(self.embeddings.keys())
        self.use_text = spec.use_text
        if spec.use_text:
            self.text_proj = nn.Sequential(nn.Linear(text_dim + 1, spec.text_proj_dim), nn.GELU())
            concat += spec.text_proj_dim
            keys += ["text", "has_text"]
        self.head = _mlp(concat, spec.mlp_hidden, spec.mlp_layers, spec.mlp_dropout)
        self.input_keys: tuple[str, ...] = tuple(keys)

    def encode_window(self, x: Tensor, mask: Tensor) -> list[Tensor]:
        """[last LSTM state] (+ [attention pool]) of each window, padding-invariant."""
        steps = mask.shape[1]
        # The end day is always valid; forcing it keeps softmax rows non-empty (no NaN).
        end_valid = torch.ones_like(mask[:, :1])
        mask = torch.cat([mask[:, :-1], end_valid], dim=1)
        x = torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x))  # NaN garbage cannot leak
        h = self.input_proj(x)
        index, lengths = right_align(mask)
        h = h.gather(1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        mask = mask.gather(1, index)
        out, _ = self.lstm(h)
        last = out.gather(1, (lengths - 1).view(-1, 1, 1).expand(-1, 1, out.shape[-1])).squeeze(1)
        parts = [last]
        if self.use_attention:
            attended, _ = self.attention(out, out, out, key_padding_mask=~mask, need_weights=False)
            z = self.attention_norm(out + attended)
            scores = self.pool_score(z).squeeze(-1).float()
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=1).to(z.dtype)
            parts.append(torch.bmm(weights.view(-1, 1, steps), z).squeeze(1))
        return parts

    def forward(self, batch: Batch) -> Tensor:
        """Logits [B, 4] from a batch dict (only the keys in `self.input_keys` are read)."""
        parts = self.encode_window(batch["x"], batch["mask"])
        for name, table in self.embeddings.items():
            parts.append(table(batch[name]))
        if self.use_text:
            flag = batch["has_text"].to(batch["text"].dtype).unsqueeze(-1)
            parts.append(self.text_proj(torch.cat([batch["text"], flag], dim=-1)))
        dtype = parts[0].dtype
        return self.head(torch.cat([part.to(dtype) for part in parts], dim=-1))
