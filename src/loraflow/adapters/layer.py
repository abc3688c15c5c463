"""The adapter layer: a linear layer that carries named adapters, one of them active.

y = base(x)                       no active adapter, or the active one merged into W0
y = adapter(x, base)              otherwise (LoRA adds s·BAx, FLoRA scales W0, ...)
y_i = adapter_{s_i}(x_i, base)    inside ``use_adapters``: row i with its own adapter
"""

from __future__ import annotations

import torch
from torch import nn

from loraflow.modules import base_weight, is_conv1d, linear_shape
from loraflow.multi.rows import RowPlan, mixed_forward


class AdapterLinear(nn.Module):
    """Wraps an ``nn.Linear`` (or GPT-2 ``Conv1D``) as ``self.base``; adapters by name."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: str | None = None
        self.rows: RowPlan | None = None  # set by use_adapters
        self.d_out, self.d_in = linear_shape(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return mixed_forward(self, x, self.rows)
        name = self.active
        if name is None or name == self.merged:
            return self.base(x)
        return self.adapters[name](x, self.base)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight as stored (for code that reads ``layer.weight``)."""
        return self.base.weight

    @torch.no_grad()
    def merge(self, name: str) -> None:
        assert self.merged is None, "one merged adapter per layer"
        self._write_weight(self.adapters[name].merge_into(base_weight(self.base).float()))
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        assert self.merged is not None
        self._write_weight(self.adapters[self.merged].unmerge_from(base_weight(self.base).float()))
        self.merged = None

    def _write_weight(self, w: torch.Tensor) -> None:
        # w: (d_out, d_in) in float32; stored back in the base layer's orientation and dtype
        target = self.base.weight
        target.copy_((w.T if is_conv1d(self.base) else w).to(target.dtype))

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, active={self.active!r}, merged={self.merged!r}"


def adapter_layers(
    model: nn.Module, name: str | None = None, kind: type | None = None
) -> list[tuple[str, AdapterLinear]]:
    """(module name, layer) of every adapter layer, only those holding ``name`` if given,
    and only adapters of class ``kind`` if given."""
    out = []
    for mname, module in model.named_modules():
        if not isinstance(module, AdapterLinear):
            continue
        held = module.adapters.items()
        if name is not None:
            held = [(n, a) for n, a in held if n == name]
        if kind is not None:
            held = [(n, a) for n, a in held if isinstance(a, kind)]
        if held:
            out.append((mname, module))
    return out
