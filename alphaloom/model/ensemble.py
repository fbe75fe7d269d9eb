"""A seed ensemble: K networks of one architecture, trained with seeds seed .. seed+K-1.

Its score is not a function of one window: it is the per-day mean of the members' cross-sectional
percentile ranks (tasks/evaluation/ensemble.py), so the ensemble has no `forward`. A caller scores
each member over a whole cross-section and combines the frames. Held as one `nn.Module` so its
weights are one state dict (`members.<i>.<name>`) that saves and loads with `weights_only=True`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class SeedEnsemble(nn.Module):
    """Two or more trained networks with the same inputs, scored as one model."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a seed ensemble needs 2 or more members, got {len(members)}")
        keys = {tuple(member.input_keys) for member in members}
        if len(keys) != 1:
            raise ValueError(f"ensemble members read different inputs: {sorted(keys)}")
        self.members = nn.ModuleList(members)
        self.input_keys: tuple[str, ...] = keys.pop()

    def forward(self, batch: object) -> None:
        raise TypeError(
            "a SeedEnsemble has no per-batch score: score each member over the whole "
            "cross-section and combine per day (tasks/evaluation/ensemble.py)"
        )


def members_of(model: nn.Module) -> list[nn.Module]:
    """The networks a model scores with: an ensemble's members, else the model itself."""
    return list(model.members) if isinstance(model, SeedEnsemble) else [model]
