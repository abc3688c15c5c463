"""The adapter bank: adapters resident on the device, in fixed slots, read by slot id.

Every linear layer of the served model is a ``BankedLinear``: its base weight plus, per
slot, the rows A_s (r_s, d_in) and (scale · B_s)ᵀ (r_s, d_out) in a packed buffer of
``slots × r_max`` rows (the Triton kernels read only the first r_s rows of a slot, so
compute and bandwidth follow each adapter's own rank). A layer that an adapter does not
target has rank 0 in that slot.

    y_t = W0 x_t + b + B_{s_t} A_{s_t} x_t      (s_t = −1: nothing added)

A slot may hold a multiplicative adapter instead (FLoRA: Wen & Chaudhuri, ICLR 2024), its
rows a_k and c_kᵀ = (b_k / r)ᵀ in the same buffers; its tokens take

    y_t = Σ_k c_k ∘ (W0 (a_k ∘ x_t)) + b

In a step with FLoRA tokens, every layer's GEMM runs over the stacked rows u_j = s_j ∘ x_{tok_j}
(``RowCopies``): a FLoRA token's r scaled copies (s = a_k), one row of any other token (s = 1,
the bank's row of ones), so one GEMM reads W0 for all of them, and y_t sums its rows' outputs
times c_k (1 for the others); the FLoRA tokens are left out of the additive path (slot −1
there). A FLoRA slot's layer that its adapter leaves alone holds a_0 = c_0 = 1: W0 x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    from loraflow.multi import triton_flora, triton_lora
    from loraflow.multi.triton_siblings import lora_delta_siblings
except ImportError:
    triton_flora = triton_lora = lora_delta_siblings = None


@dataclass
class RowCopies:
    """The GEMM rows of a step with FLoRA tokens: row j is u_j = s_{row_j} ∘ x_{tok_j}, s a bank
    row (slot · r_max + k for a FLoRA token's k-th copy, ``AdapterBank.ones_row`` for any other
    token); token t owns rows ``start[t] : start[t] + count[t]``. Decode graphs pad the rows
    to a bucket (``valid`` 0 there, owned by no token)."""

    tok: torch.Tensor  # (M,) long
    row: torch.Tensor  # (M,) long
    valid: torch.Tensor  # (M, 1) the activations' dtype
    start: torch.Tensor  # (N,) long
    count: torch.Tensor  # (N,) long


@dataclass
class TokenSlots:
    """Each token's adapter slot, and the per-step work that every layer shares: the tile
    plan of the GPU prefill kernels, or the tokens of each slot for the CPU path."""

    ids: torch.Tensor  # (N,) slot of each token, -1: none
    used: list[int]  # distinct slots >= 0 in the batch
    groups: list[tuple[int, torch.Tensor]]  # CPU: (slot, token indices)
    variant: str | None = None  # GPU: "rows" | "tiles"; decode graphs also "fused" | "siblings"
    plan: object | None = None  # GPU: triton_lora.TilePlan for "tiles"
    rows: torch.Tensor | None = None  # CPU, few tokens per slot: (N, r_max) bank rows to gather
    valid: torch.Tensor | None = None  # (N, 1) 1.0 for tokens with an adapter
    mask: torch.Tensor | None = None  # decode, bank mostly in use: (N, slots · r_max) 1 on each token's rows
    copies: RowCopies | None = None  # the GEMM's rows when some tokens carry FLoRA adapters

    @staticmethod
    def build(slots: list[int], bank: AdapterBank, device, dtype=torch.float32) -> TokenSlots:
        if any(s >= 0 and bank.slot_flora[s] for s in slots):  # their tokens leave the additive path
            ts = TokenSlots.build([-1 if s >= 0 and bank.slot_flora[s] else s for s in slots], bank, device, dtype)
            tok, row, start, count = (torch.from_numpy(v).to(device) for v in bank.flora_rows(slots))
            ts.copies = RowCopies(tok, row, torch.ones(len(tok), 1, dtype=dtype, device=device), start, count)
            return ts
        used = sorted({s for s in slots if s >= 0})
        n_slots, r_max = bank.n_slots, bank.r_max
        decode_like = len(used) > 1 and len(slots) <= 8 * len(used)
        if torch.device(device).type == "cuda" and triton_lora is not None:
            ids = torch.tensor(slots, dtype=torch.int32, device=device)  # the kernels' slot type
            variant = triton_lora.choose_variant(len(slots), len(used)) if used else None
            plan = triton_lora.tile_plan(ids, n_slots) if variant == "tiles" else None
            return TokenSlots(ids, used, [], variant, plan)
        ids = torch.tensor(slots, dtype=torch.long, device=device)
        if decode_like and bank.dense_pays(used):  # the bank is mostly in use: read it whole
            return TokenSlots(ids, used, [], mask=TokenSlots.slot_mask(ids, n_slots, r_max, dtype))
        if decode_like:  # CPU: gather each token's rows
            return TokenSlots(ids, used, [], rows=TokenSlots.bank_rows(ids, r_max), valid=(ids >= 0).float()[:, None])
        groups = [(u, torch.tensor([i for i, s in enumerate(slots) if s == u], device=device)) for u in used]
        return TokenSlots(ids, used, groups)

    @staticmethod
    def bank_rows(ids: torch.Tensor, r_max: int) -> torch.Tensor:
        """(N, r_max): the bank rows of each token's slot (slot 0's for -1; mask those out)."""
        return ids.clamp_min(0)[:, None] * r_max + torch.arange(r_max, device=ids.device)

    @staticmethod
    def slot_mask(ids: torch.Tensor, n_slots: int, r_max: int, dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """(N, n_slots · r_max): 1 on the bank rows of each token's slot, 0 elsewhere (and for -1)."""
        valid = (ids >= 0).to(dtype)[:, None].expand(-1, r_max)
        out = torch.zeros(len(ids), n_slots * r_max, dtype=dtype, device=ids.device) if out is None else out.zero_()
        return out.scatter_(1, TokenSlots.bank_rows(ids, r_max), valid)


class BankedLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.weight = nn.Parameter(torch.empty(d_out, d_in), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(d_out), requires_grad=False) if bias else None
        self.packed = None  # a BankView over the bank's buffers, set by AdapterBank
        self.shard = None  # tensor_parallel.Shard: the 1/N of the layer (and of its adapters) held here

    def forward(self, x: torch.Tensor, slots: TokenSlots) -> torch.Tensor:
        """y = W0 x + b + B_s A_s x for each token's slot s; a FLoRA slot's tokens take
        y = Σ_k c_k ∘ (W0 (a_k ∘ x)) + b instead (``_copies``)."""
        # x: (N, d_in)
        if slots.copies is not None and self.packed is not None:
            return self._additive(x, slots, self._copies(x, slots.copies))
        return self._additive(x, slots)

    def _copies(self, x: torch.Tensor, c: RowCopies) -> torch.Tensor:
        """W0 x + b for the tokens without a FLoRA adapter, Σ_k c_k ∘ (W0 (a_k ∘ x)) + b for the
        others, through one GEMM over the stacked rows u_j = s_j ∘ x_{tok_j} (``RowCopies``);
        on CUDA the stacking and the sum are one Triton kernel each (``multi/triton_flora.py``)."""
        p, n = self.packed, len(x)
        if x.is_cuda and triton_flora is not None:
            u = triton_flora.stack(x, c.tok, c.row, p.flora_a)  # (M, d_in)
            z = F.linear(u, self.weight)  # (M, d_out): W0 read once for every row
            return triton_flora.combine(z, p.flora_c, c.row, c.start, c.count, self.bias)  # (N, d_out)
        u = x.index_select(0, c.tok) * p.flora_a.index_select(0, c.row)  # (M, d_in)
        z = F.linear(u, self.weight) * p.flora_c.index_select(0, c.row) * c.valid  # (M, d_out)
        y = torch.zeros(n, self.d_out, device=x.device, dtype=z.dtype).index_add_(0, c.tok, z)  # (N, d_out)
        return y if self.bias is None else y + self.bias

    def _additive(self, x: torch.Tensor, slots: TokenSlots, base: torch.Tensor | None = None) -> torch.Tensor:
        """W0 x + b (or ``base``, given) + each token's B_s A_s x."""
        p = self.packed
        if p is None or not slots.used or not p.any_active:
            return F.linear(x, self.weight, self.bias) if base is None else base
        if slots.mask is not None:  # decode over a mostly used bank: two dense matmuls, no gathers
            h = F.linear(x, p.a) * slots.mask.to(x.dtype)  # (N, slots · r_max): own slot's rows only
            y = F.linear(x, self.weight, self.bias) if base is None else base
            return torch.addmm(y, h, p.bt)  # W0 x + b + Σ_r h_r (s·B)ᵀ_r
        if slots.variant is not None:  # CUDA: Triton kernels
            variant = "rows" if slots.variant == "siblings" else slots.variant  # a layer alone
            bias = self.bias if base is None else None
            delta = triton_lora.lora_delta(x, slots.ids, p, variant, slots.plan, bias=bias)
            return delta.addmm_(x, self.weight.T) if base is None else delta.add_(base)  # in place: no copy of Δ
        y = F.linear(x, self.weight, self.bias) if base is None else base
        if slots.rows is not None:  # CPU, decode: gather + bmm
            h = torch.bmm(p.a[slots.rows], x.unsqueeze(2))  # (N, r_max, 1)
            delta = torch.bmm(p.bt[slots.rows].transpose(1, 2), h)[:, :, 0]  # (N, d_out)
            return y + delta * slots.valid.to(delta.dtype)
        for slot, idx in slots.groups:  # CPU: matmuls per slot
            r = p.ranks_host[slot]
            if r:
                lo = slot * p.r_max
                h = F.linear(x.index_select(0, idx), p.a[lo : lo + r])  # (n_s, r)
                y.index_add_(0, idx, h @ p.bt[lo : lo + r])  # (n_s, d_out)
        return y


@dataclass
class Fused:
    """The base weights of sibling layers (q/k/v, gate/up) as one matrix: each layer's weight
    is a view of its rows (``fuse_siblings``), so one GEMM reads them all."""

    weight: torch.Tensor  # (Σ_j d_out_j, d_in)
    bias: torch.Tensor | None  # (Σ_j d_out_j,)
    sizes: list[int]  # d_out_j


def fuse_siblings(layers: tuple[BankedLinear, ...]) -> Fused:
    """Concatenate the layers' weights (and biases) and make each layer's a view of the result."""
    weight = torch.cat([m.weight.data for m in layers])
    bias = torch.cat([m.bias.data for m in layers]) if layers[0].bias is not None else None
    sizes = [m.d_out for m in layers]
    for j, (m, w) in enumerate(zip(layers, weight.split(sizes))):
        m.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias.split(sizes)[j], requires_grad=False)
    return Fused(weight, bias, sizes)


def banked_siblings(
    x: torch.Tensor, slots: TokenSlots, layers: tuple[BankedLinear, ...], fused: Fused | None = None
) -> list[torch.Tensor]:
    """[m(x, slots) for m in layers] for layers that read the same input (q/k/v, gate/up).

    With ``fused`` base weights, the base (and the "siblings" decode kernel's adapters) take
    one GEMM for all of them: y = [W_q; W_k; W_v] x + b + [Δ_q; Δ_k; Δ_v], the adapters'
    deltas written into the output's column blocks first (``multi/triton_siblings.py``: one
    shrink and one expand launch), then the GEMM accumulates onto them. Under the "siblings"
    kernel without ``fused``, the adapters share launches and each base GEMM runs alone;
    otherwise each layer runs alone."""
    views = [m.packed for m in layers]
    active = [p is not None and p.any_active for p in views]
    base_only = not slots.used or not any(active)
    if slots.copies is not None or not (base_only or (all(active) and slots.variant == "siblings")):
        return [m(x, slots) for m in layers]  # FLoRA rows, some siblings adapted, or prefill kernels
    if fused is None:
        if base_only:
            return [m(x, slots) for m in layers]
        deltas = lora_delta_siblings(x, slots.ids, views, [m.bias for m in layers])
        return [d.addmm_(x, m.weight.T) for d, m in zip(deltas, layers)]  # W0 x + b + Δ, in place
    if base_only:
        return list(F.linear(x, fused.weight, fused.bias).split(fused.sizes, dim=1))  # (N, d_out_j) views
    y = torch.empty(len(x), sum(fused.sizes), device=x.device, dtype=x.dtype)  # (N, Σ d_out_j)
    parts = list(y.split(fused.sizes, dim=1))
    lora_delta_siblings(x, slots.ids, views, [m.bias for m in layers], out=parts)  # Δ_j + b_j into y's blocks
    y.addmm_(x, fused.weight.T)  # + W x, one GEMM
    return parts


class BankView:
    """What a BankedLinear reads: the PackedLoRA fields over this layer's bank buffers (``a``,
    ``bt``: the slots' rows), and the FLoRA path's (``flora_a``, ``flora_c``: the same buffers
    with their last row, ``AdapterBank.ones_row``, of ones)."""

    def __init__(self, a, bt, offsets, ranks, r_max):
        self.flora_a, self.flora_c = a, bt  # (n_slots · r_max + 1, d_in), (..., d_out)
        self.a, self.bt, self.offsets, self.ranks, self.r_max = a[:-1], bt[:-1], offsets, ranks, r_max
        self.ranks_host = [0] * ranks.numel()
        self.any_active = False  # some slot has an adapter on this layer (stays True once set)


class AdapterBank:
    """``n_slots`` device slots of rank up to ``r_max`` on every linear layer of ``model``."""

    def __init__(self, model: nn.Module, n_slots: int, r_max: int):
        self.n_slots, self.r_max = n_slots, r_max
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.slot_ranks = [0] * n_slots  # each slot's largest rank over the layers
        self.slot_flora = [False] * n_slots  # the slot holds a multiplicative adapter (FLoRA)
        self.slot_flora_ranks = [0] * n_slots  # ... and its largest rank over the layers
        self.layout = 0  # bumped when a layer first gets an adapter: CUDA graphs of older layouts are stale
        self.layers: dict[str, BankedLinear] = {n: m for n, m in model.named_modules() if isinstance(m, BankedLinear)}
        self.ones_row = n_slots * r_max  # the FLoRA path's scale-1 row, after the slots' rows (``RowCopies``)
        for m in self.layers.values():
            w = m.weight
            offsets = torch.arange(n_slots, dtype=torch.int32, device=w.device) * r_max
            a = torch.zeros(n_slots * r_max + 1, m.d_in, device=w.device, dtype=w.dtype)
            bt = torch.zeros(n_slots * r_max + 1, m.d_out, device=w.device, dtype=w.dtype)
            a[-1], bt[-1] = 1, 1
            m.packed = BankView(a, bt, offsets, torch.zeros(n_slots, dtype=torch.int32, device=w.device), r_max)

    def dense_pays(self, used) -> bool:
        """Whether to read the whole bank (``n_slots · r_max`` rows a layer, by two dense
        matmuls and a slot mask) instead of each token's rows: on the CPU when it is at most
        twice the rows of the adapters in use (4.5x faster than gathering them there,
        ``results/bank-decode-paths-cpu.txt``); never on CUDA, where the per-row Triton
        kernels were faster even with all 64 slots in use (a Llama-2-7B decode step 14.4 ms
        against 15.5, ``results/engine-steps-h200-v2.json``)."""
        if self.device.type == "cuda":
            return False
        return self.n_slots * self.r_max <= 2 * sum(self.slot_ranks[s] for s in used)

    def flora_rows(self, slots) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The GEMM rows of a step whose tokens carry ``slots`` (``RowCopies``): (tok, row) of each
        row, (start, count) of each token; a FLoRA token gets one row per rank term (at least one),
        any other token one row of scale 1."""
        s = np.asarray(slots, dtype=np.int64)
        on = s >= 0
        flora = np.zeros(len(s), dtype=bool)
        flora[on] = np.asarray(self.slot_flora)[s[on]]
        count = np.where(flora, np.maximum(1, np.asarray(self.slot_flora_ranks)[s.clip(0)]), 1)
        start = np.cumsum(count) - count
        tok = np.repeat(np.arange(len(s)), count)
        k = np.arange(len(tok)) - start[tok]
        row = np.where(flora[tok], s[tok] * self.r_max + k, self.ones_row)
        return tok, row, start, count

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every adapted layer, by module name: the whole layer's, as adapter
        files hold it, also when this process holds a tensor-parallel shard of it."""
        return {n: m.shard.whole(m.d_out, m.d_in) if m.shard else (m.d_out, m.d_in) for n, m in self.layers.items()}

    @torch.no_grad()
    def write(
        self, slot: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], multiplicative: bool = False
    ) -> None:
        """Put an adapter in ``slot``: module name -> (A (r, d_in), C (d_out, r)), C = scale·B
        (additive) or B / r (``multiplicative``: FLoRA), of the whole layer: a tensor-parallel
        shard keeps its part (``Shard.factors``)."""
        self.slot_ranks[slot] = 0 if multiplicative else max((a.shape[0] for a, _ in factors.values()), default=0)
        self.slot_flora[slot] = multiplicative
        self.slot_flora_ranks[slot] = max((a.shape[0] for a, _ in factors.values()), default=0) if multiplicative else 0
        for name, m in self.layers.items():
            p = m.packed
            lo = slot * self.r_max
            p.a[lo : lo + self.r_max].zero_()  # rows past the rank stay zero (read by gathers)
            p.bt[lo : lo + self.r_max].zero_()
            if name in factors:
                a, b = factors[name] if m.shard is None else m.shard.factors(*factors[name])
                r = a.shape[0]
                p.a[lo : lo + r].copy_(a, non_blocking=a.is_pinned())  # page-locked: queued, not waited for
                p.bt[lo : lo + r].copy_(b.T, non_blocking=b.is_pinned())
            else:
                r = 0
                if multiplicative:  # a layer the adapter leaves alone: W0 ∘ 1
                    p.a[lo], p.bt[lo] = 1, 1
            p.ranks[slot] = r
            p.ranks_host[slot] = r
            if r and not p.any_active:
                p.any_active = True
                self.layout += 1
