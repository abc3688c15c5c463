"""The GaLore paper's low-rank baseline: every targeted weight trained as W = B A from
scratch (no frozen W0), B: (d_out, r), A: (r, d_in) — far worse than full-rank training."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loraflow.modules import find_targets


class LowRankLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(d_out, rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype)) if bias else None
        nn.init.uniform_(self.A, -1 / math.sqrt(d_in), 1 / math.sqrt(d_in))
        nn.init.uniform_(self.B, -1 / math.sqrt(rank), 1 / math.sqrt(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = B (A x) + b."""
        return F.linear(F.linear(x, self.A), self.B, self.bias)


def to_low_rank(model: nn.Module, rank: int, target_modules="all-linear") -> list[str]:
    """Replace the targeted nn.Linear layers by ``LowRankLinear`` of ``rank``; returns their names."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    names = find_targets(model, target_modules)
    for name in names:
        old = model.get_submodule(name)
        new = LowRankLinear(
            old.in_features,
            old.out_features,
            min(rank, old.in_features, old.out_features),
            old.bias is not None,
            old.weight.device,
            old.weight.dtype,
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return names
