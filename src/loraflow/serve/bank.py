"""The adapter bank: adapters resident on the device, in fixed slots, read by slot id.

Every linear layer of the served model is a ``BankedLinear``: its base weight plus, per
slot, the rows A_s (r_s, d_in) and (scale · B_s)ᵀ (r_s, d_out) in a packed buffer of
``slots × r_max`` rows (the Triton kernels read only the first r_s rows of a slot, so
compute and bandwidth follow each adapter's own rank). A layer that an adapter does not
target has rank 0 in that slot.

    y_t = W0 x_t + b + B_{s_t} A_{s_t} x_t      (s_t = −1: nothing added)
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from loraflow.multi import ops

try:
    from loraflow.multi import triton_lora
except ImportError:
    triton_lora = None


class BankedLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.weight = nn.Parameter(torch.empty(d_out, d_in), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(d_out), requires_grad=False) if bias else None
        self.packed = None    # triton_lora.PackedLoRA-shaped views into the bank, set by the bank

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        # x: (N, d_in), slots: (N,)
        p = self.packed
        if p is None or not bool(p.any_active):
            return F.linear(x, self.weight, self.bias)
        if x.is_cuda and triton_lora is not None or os.environ.get("LORAFLOW_SERVE_TRITON") == "1":
            delta = triton_lora.lora_delta(x, slots, p, bias=self.bias)
            return torch.addmm(delta, x, self.weight.T)                  # W0 x + b + Δ
        return F.linear(x, self.weight, self.bias) + _segmented(x, slots, p)


def _segmented(x: torch.Tensor, slots: torch.Tensor, p) -> torch.Tensor:
    """CPU path: one pair of matmuls per slot present in the batch."""
    used = sorted(set(slots[slots >= 0].tolist()))
    ranks = p.ranks_host
    used = [s for s in used if ranks[s] > 0]
    if not used:
        return x.new_zeros(x.shape[0], p.bt.shape[1])
    A = [p.a[s * p.r_max: s * p.r_max + ranks[s]] for s in used]
    B = [p.bt[s * p.r_max: s * p.r_max + ranks[s]].T for s in used]
    remap = torch.full((p.ranks.numel() + 1,), -1, dtype=torch.long, device=x.device)
    remap[torch.tensor(used, device=x.device)] = torch.arange(len(used), device=x.device)
    local = remap[slots.clamp_min(-1)]        # -1 stays -1 (index -1 reads the last entry: -1)
    return ops.segmented(x[:, None], local, A, B, [1.0] * len(used))[:, 0]


class BankView:
    """What a BankedLinear reads: the PackedLoRA fields over this layer's bank buffers."""

    def __init__(self, a, bt, offsets, ranks, r_max):
        self.a, self.bt, self.offsets, self.ranks, self.r_max = a, bt, offsets, ranks, r_max
        self.ranks_host = [0] * ranks.numel()
        self.any_active = False


class AdapterBank:
    """``n_slots`` device slots of rank up to ``r_max`` on every linear layer of ``model``."""

    def __init__(self, model: nn.Module, n_slots: int, r_max: int):
        self.n_slots, self.r_max = n_slots, r_max
        self.layers: dict[str, BankedLinear] = {n: m for n, m in model.named_modules()
                                                if isinstance(m, BankedLinear)}
        for m in self.layers.values():
            w = m.weight
            offsets = torch.arange(n_slots, dtype=torch.int32, device=w.device) * r_max
            m.packed = BankView(torch.zeros(n_slots * r_max, m.d_in, device=w.device, dtype=w.dtype),
                                torch.zeros(n_slots * r_max, m.d_out, device=w.device, dtype=w.dtype),
                                offsets, torch.zeros(n_slots, dtype=torch.int32, device=w.device), r_max)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every adapted layer, by module name."""
        return {n: (m.d_out, m.d_in) for n, m in self.layers.items()}

    def bytes_per_slot(self) -> int:
        return sum(self.r_max * (m.d_in + m.d_out) * m.weight.element_size() for m in self.layers.values())

    @torch.no_grad()
    def write(self, slot: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put an adapter in ``slot``: module name -> (A (r, d_in), scale·B (d_out, r))."""
        for name, m in self.layers.items():
            p = m.packed
            lo = slot * self.r_max
            if name in factors:
                a, b = factors[name]
                r = a.shape[0]
                p.a[lo:lo + r].copy_(a)
                p.bt[lo:lo + r].copy_(b.T)
            else:
                r = 0
            p.ranks[slot] = r
            p.ranks_host[slot] = r
            p.any_active = any(p.ranks_host)

    def clear(self, slot: int) -> None:
        self.write(slot, {})
