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

the r scaled copies of x_t stacked under the batch's rows, so one GEMM reads W0 for all of
them (``BankedLinear.forward``), and are left out of the additive path (slot −1 there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

try:
    from loraflow.multi import triton_lora
    from loraflow.multi.triton_siblings import lora_delta_siblings
except ImportError:
    triton_lora = lora_delta_siblings = None


@dataclass
class FloraCopies:
    """The FLoRA tokens' scaled copies in fixed shapes, for a decode graph: copy j is
    a_{row_j} ∘ x_{tok_j} (``row``: slot · r_max + k), ``valid`` 0 on padding copies; ``slot``
    (N,) each token's FLoRA slot, -1 for the others (their slots are -1 in ``ids`` instead)."""

    tok: torch.Tensor  # (C,) long
    row: torch.Tensor  # (C,) long
    valid: torch.Tensor  # (C, 1) the activations' dtype
    slot: torch.Tensor  # (N,) long


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
    flora: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # multiplicative: (slot, token indices)
    copies: FloraCopies | None = None  # multiplicative, in fixed shapes (decode graphs)

    @staticmethod
    def build(slots: list[int], bank: AdapterBank, device, dtype=torch.float32) -> TokenSlots:
        flora_slots = sorted({s for s in slots if s >= 0 and bank.slot_flora[s]})
        if flora_slots:  # their tokens leave the additive path
            flora = [(u, torch.tensor([i for i, s in enumerate(slots) if s == u], device=device)) for u in flora_slots]
            ts = TokenSlots.build([-1 if s >= 0 and bank.slot_flora[s] else s for s in slots], bank, device, dtype)
            ts.flora = flora
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
        y = Σ_k c_k ∘ (W0 (a_k ∘ x)) + b instead, their r scaled copies stacked under the
        batch's rows so that one GEMM reads W0 for all of them."""
        # x: (N, d_in)
        if slots.copies is not None and self.packed is not None:
            return self._copies(x, slots)
        jobs = flora_jobs(self, slots)
        if not jobs:
            return self._additive(x, slots)
        z = F.linear(torch.cat([x, flora_inputs(self, x, jobs)]), self.weight)  # (N + Σ n·r, d_out)
        base = z[: len(x)] if self.bias is None else z[: len(x)] + self.bias  # W0 x + b
        return flora_outputs(self, self._additive(x, slots, base), z[len(x) :], jobs)

    def _copies(self, x: torch.Tensor, slots: TokenSlots) -> torch.Tensor:
        """``forward`` in fixed shapes (``FloraCopies``): the copies a_k ∘ x_t stacked under the
        batch's rows for one GEMM with W0, y_t = Σ_k c_k ∘ z_{t,k} + b summed back with an
        index_add; a token whose FLoRA slot does not adapt this layer keeps W0 x + b. Rank terms
        k past a slot's rank hold zeros in the bank, so their copies add nothing."""
        c, p, n = slots.copies, self.packed, len(x)
        xs = x.index_select(0, c.tok) * p.a.index_select(0, c.row) * c.valid  # (C, d_in)
        z = F.linear(torch.cat([x, xs]), self.weight)  # (N + C, d_out)
        base = z[:n] if self.bias is None else z[:n] + self.bias  # W0 x + b
        y = self._additive(x, slots, base)  # the additive slots' rows
        out = torch.zeros_like(base).index_add_(0, c.tok, z[n:] * p.bt.index_select(0, c.row))  # (N, d_out)
        if self.bias is not None:
            out += self.bias
        adapted = (c.slot >= 0) & (p.ranks.index_select(0, c.slot.clamp_min(0)) > 0)  # (N,)
        return torch.where(adapted[:, None], out, y)

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


def flora_jobs(layer: BankedLinear, slots: TokenSlots) -> list[tuple[int, torch.Tensor, int]]:
    """(slot, token indices, rank) of the step's FLoRA slots that adapt this layer."""
    p = layer.packed
    if not slots.flora or p is None:
        return []
    return [(slot, idx, p.ranks_host[slot]) for slot, idx in slots.flora if p.ranks_host[slot]]


def flora_inputs(layer: BankedLinear, x: torch.Tensor, jobs) -> torch.Tensor:
    """Each FLoRA token's r scaled copies a_k ∘ x_t, slot after slot: (Σ n·r, d_in)."""
    p = layer.packed
    return torch.cat(
        [
            (x.index_select(0, idx).unsqueeze(1) * p.a[slot * p.r_max : slot * p.r_max + r]).reshape(-1, layer.d_in)
            for slot, idx, r in jobs
        ]
    )


def flora_outputs(layer: BankedLinear, y: torch.Tensor, z: torch.Tensor, jobs) -> torch.Tensor:
    """Write y_t = Σ_k c_k ∘ z_{t,k} + b for the FLoRA tokens, z_{t,k} = W0 (a_k ∘ x_t)."""
    p, start = layer.packed, 0
    for slot, idx, r in jobs:
        lo, n = slot * p.r_max, len(idx)
        out = (z[start : start + n * r].view(n, r, layer.d_out) * p.bt[lo : lo + r]).sum(1)  # (n, d_out)
        y.index_copy_(0, idx, out if layer.bias is None else out + layer.bias)
        start += n * r
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
    if slots.flora or slots.copies is not None or not (base_only or (all(active) and slots.variant == "siblings")):
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
    """What a BankedLinear reads: the PackedLoRA fields over this layer's bank buffers."""

    def __init__(self, a, bt, offsets, ranks, r_max):
        self.a, self.bt, self.offsets, self.ranks, self.r_max = a, bt, offsets, ranks, r_max
        self.ranks_host = [0] * ranks.numel()
        self.any_active = False  # some slot has an adapter on this layer (stays True once set)


class AdapterBank:
    """``n_slots`` device slots of rank up to ``r_max`` on every linear layer of ``model``."""

    def __init__(self, model: nn.Module, n_slots: int, r_max: int):
        self.n_slots, self.r_max = n_slots, r_max
        self.device = next(model.parameters()).device
        self.slot_ranks = [0] * n_slots  # each slot's largest rank over the layers
        self.slot_flora = [False] * n_slots  # the slot holds a multiplicative adapter (FLoRA)
        self.slot_flora_ranks = [0] * n_slots  # ... and its largest rank over the layers
        self.layout = 0  # bumped when a layer first gets an adapter: CUDA graphs of older layouts are stale
        self.layers: dict[str, BankedLinear] = {n: m for n, m in model.named_modules() if isinstance(m, BankedLinear)}
        for m in self.layers.values():
            w = m.weight
            offsets = torch.arange(n_slots, dtype=torch.int32, device=w.device) * r_max
            m.packed = BankView(
                torch.zeros(n_slots * r_max, m.d_in, device=w.device, dtype=w.dtype),
                torch.zeros(n_slots * r_max, m.d_out, device=w.device, dtype=w.dtype),
                offsets,
                torch.zeros(n_slots, dtype=torch.int32, device=w.device),
                r_max,
            )

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
                p.a[lo : lo + r].copy_(a)
                p.bt[lo : lo + r].copy_(b.T)
            else:
                r = 0
            p.ranks[slot] = r
            p.ranks_host[slot] = r
            if r and not p.any_active:
                p.any_active = True
                self.layout += 1
