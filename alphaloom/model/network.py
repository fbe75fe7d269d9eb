"""SequenceModel: LSTM + self-attention over a factor window, plus per-stock embeddings -> 4 logits.

Layout of one forward pass (every bracketed part can be switched off from the config):

    x [B,T,F] -> input projection -> LSTM -> [self-attention, residual, LayerNorm -> attention pool]
    [industry emb] [index emb] [calendar emb of the end day] [text projection (+ has_text flag)]
    concat(embeddings, last LSTM state, [attention pool]) -> MLP -> head -> logits [B, 4]

Heads. "softmax": the MLP gives 4 class logits; the stock score is sum_k v_k p_k over the
`class_values` buffer v (0, 1, 2, 3 unless fitted from the training split). "ordinal"
(cumulative link, CORAL-style): the MLP gives one latent utility u per stock and the head holds 3
ordered thresholds, P(y > k) = sigmoid(u - theta_k). It returns logits log p_k + u: softmax of
them is the model's class distribution, so every loss reads either head the same way, and
their logsumexp is u itself, which is the score (`score(logits)`): the stock ranks by its
utility alone, with no saturation at extreme utilities.

Left padding. Windows are left padded (`mask` False on the oldest days). An LSTM over zero inputs
still moves its state (biases), so zeroing the padding is not enough. Instead every row is rotated
so its valid days come first and the padding goes to the end; the LSTM is causal, so padded steps
after the last valid day cannot influence any valid output. The last state is gathered at the last
valid step, and attention and pooling mask the padded positions out. This keeps cuDNN's fused LSTM
(no Python loop over time) and no Python branch depends on tensor values, so the forward traces and
exports (`torch.export`).

This module imports only torch: the architecture comes from any object with `ModelSection`'s
attributes (see `ModelSpec`); the defaults live in tasks/common/config.py only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from alphaloom.model.batch import NUM_CLASSES, Batch

CALENDAR_SIZES = {"dow": 7, "month": 12}


class ModelSpec(Protocol):
    """The attributes SequenceModel reads; tasks.common.config.ModelSection satisfies it."""

    head: str
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


def expected_class_score(logits: Tensor, values: Tensor | None = None) -> Tensor:
    """sum_k v_k * p_k, [B] (v = 0, 1, 2, 3 unless `values` are given)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if values is None:
        values = torch.arange(logits.shape[-1], device=logits.device, dtype=probs.dtype)
    return probs @ values.to(device=probs.device, dtype=probs.dtype)


def _log_sigmoid_difference(upper: Tensor, lower: Tensor) -> Tensor:
    """log(sigmoid(upper) - sigmoid(lower)) for upper > lower, without cancellation."""
    log_upper = nn.functional.logsigmoid(upper)
    gap = (nn.functional.logsigmoid(lower) - log_upper).clamp_max(-1e-12)  # log ratio, < 0
    # log(1 - exp(gap)), accurate on both sides of -log 2 (Maechler's log1mexp). Each branch
    # gets inputs from its own side only: torch.where passes NaN gradients of the other one.
    split = -0.6931471805599453
    near = gap > split
    log1mexp = torch.where(
        near,
        torch.log(-torch.expm1(torch.where(near, gap, split))),
        torch.log1p(-torch.exp(torch.where(near, split, gap))),
    )
    return log_upper + log1mexp


class OrdinalHead(nn.Module):
    """Latent utility -> class log-probabilities of a cumulative logit model (K-1 thresholds).

    Thresholds are a free first one plus softplus increments (at least MIN_GAP), so they stay
    strictly ordered whatever the optimiser does; they start at the logistic quantiles of an
    even class split.
    """

    MIN_GAP = 1e-3

    def __init__(self, in_dim: int, n_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.utility = nn.Linear(in_dim, 1)
        start = torch.logit(torch.arange(1, n_classes) / n_classes)
        self.first = nn.Parameter(start[:1].clone())
        gaps = start.diff()
        self.raw_gaps = nn.Parameter(torch.log(torch.expm1(gaps)))  # softplus^-1

    def thresholds(self) -> Tensor:
        """theta_0 < theta_1 < ... (K-1 values)."""
        increments = nn.functional.softplus(self.raw_gaps) + self.MIN_GAP
        return torch.cat([self.first, self.first + torch.cumsum(increments, 0)])

    def forward(self, features: Tensor) -> Tensor:
        """log p_k + u, [B, K]: log_softmax gives log p_k and logsumexp gives u."""
        u = self.utility(features).float()  # [B, 1]
        theta = self.thresholds().float().unsqueeze(0)  # [1, K-1]
        z = u - theta  # z_0 > z_1 > ... ; P(y > k) = sigmoid(z_k)
        first = nn.functional.logsigmoid(-z[:, :1])  # log P(y = 0)
        last = nn.functional.logsigmoid(z[:, -1:])  # log P(y = K-1)
        middle = _log_sigmoid_difference(z[:, :-1], z[:, 1:])
        log_p = torch.cat([first, middle, last], dim=1)
        return log_p - torch.logsumexp(log_p, dim=1, keepdim=True) + u


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
    if spec.head not in ("softmax", "ordinal"):
        raise ValueError(f"model.head must be 'softmax' or 'ordinal', got {spec.head!r}")
    unknown = [name for name in spec.calendar_fields if name not in CALENDAR_SIZES]
    if spec.use_calendar and unknown:
        raise ValueError(
            f"model.calendar_fields has unknown entries {unknown}; known: {list(CALENDAR_SIZES)}"
        )


def _mlp(in_dim: int, hidden: int, layers: int, dropout: float, head: str) -> nn.Sequential:
    """`layers` hidden blocks (Linear, GELU, Dropout) followed by the output head."""
    blocks: list[nn.Module] = []
    width = in_dim
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
        width = hidden
    blocks.append(OrdinalHead(width) if head == "ordinal" else nn.Linear(width, NUM_CLASSES))
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
        self.head = _mlp(concat, spec.mlp_hidden, spec.mlp_layers, spec.mlp_dropout, spec.head)
        self.ordinal = spec.head == "ordinal"
        self.input_keys: tuple[str, ...] = tuple(keys)
        # What each class is worth when scoring (a buffer: saved with the weights and shipped with
        # the logged model); set_class_values() replaces 0..K-1 by values fitted on training data.
        self.register_buffer("class_values", torch.arange(NUM_CLASSES, dtype=torch.float32))

    def set_class_values(self, values: Sequence[float] | Tensor) -> None:
        """Score by these per-class values (increasing, one per class) instead of 0..K-1."""
        values = torch.as_tensor(values, dtype=torch.float32).flatten()
        if values.shape != self.class_values.shape or not bool((values.diff() > 0).all()):
            raise ValueError(f"class values must be {NUM_CLASSES} increasing numbers: {values}")
        self.class_values.copy_(values.to(self.class_values.device))

    def score(self, logits: Tensor) -> Tensor:
        """The ranking score [B] (float32): the ordinal head's utility, or sum_k v_k * p_k."""
        if self.ordinal:
            return torch.logsumexp(logits.float(), dim=-1)
        return expected_class_score(logits, self.class_values)

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
