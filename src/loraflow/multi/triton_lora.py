"""Triton kernels for per-row LoRA at inference: shrink (h = A_s x) and expand
(y += B_s h), reading each row's adapter by slot id (the SGMV/BGMV idea of Punica, MLSys'24).

Adapters of mixed ranks are packed without padding the weights: all A_i stacked by rows
into ``a`` (Σ r_i, d_in), all scale_i · B_iᵀ into ``bt`` (Σ r_i, d_out); adapter i owns rows
``offsets[i] : offsets[i] + ranks[i]``. Only the small per-token buffer h is padded to r_max.

Two variants of each kernel:
- rows (decode): one program per token (and split of d_in or block of d_out); each token
  reads its adapter's rows directly, so a batch of 64 tokens with 64 adapters costs one read
  of each adapter.
- tiles (prefill): tokens sorted by slot, cut into tiles of BLOCK_M tokens of one adapter;
  each tile is a small matrix product on the tensor cores (``tl.dot``).

Inference only (no autograd): training uses the PyTorch ops. Runs on CPU tensors under
``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class PackedLoRA:
    """One layer's additive adapters, packed for the kernels (see module docstring)."""
    a: torch.Tensor          # (Σ r_i, d_in)
    bt: torch.Tensor         # (Σ r_i, d_out), scale folded in
    offsets: torch.Tensor    # (n,) int32
    ranks: torch.Tensor      # (n,) int32
    r_max: int

    @staticmethod
    def pack(A, B, scales) -> "PackedLoRA":
        ranks = [a.shape[0] for a in A]
        offsets = [0]
        for r in ranks[:-1]:
            offsets.append(offsets[-1] + r)
        dev = A[0].device
        return PackedLoRA(
            a=torch.cat([a.detach() for a in A]).contiguous(),
            bt=torch.cat([(s * b.detach()).T for b, s in zip(B, scales)]).contiguous(),
            offsets=torch.tensor(offsets, dtype=torch.int32, device=dev),
            ranks=torch.tensor(ranks, dtype=torch.int32, device=dev),
            r_max=max(ranks))


@triton.jit
def _shrink_rows(x_ptr, slot_ptr, a_ptr, off_ptr, rank_ptr, h_ptr, K, stride_x, stride_a, stride_h,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    m = tl.program_id(0)
    pid_k = tl.program_id(1)
    slot = tl.load(slot_ptr + m)
    valid = slot >= 0
    s = tl.where(valid, slot, 0)
    r = tl.where(valid, tl.load(rank_ptr + s), 0)
    off = tl.load(off_ptr + s)
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K * SPLIT_K):
        ks = k0 + pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + m * stride_x + ks, mask=(ks < K) & valid, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + (off + rs)[:, None] * stride_a + ks[None, :],
                    mask=(rs[:, None] < r) & (ks[None, :] < K), other=0.0).to(tl.float32)
        acc += tl.sum(a * xk[None, :], axis=1)
    if SPLIT_K == 1:
        tl.store(h_ptr + m * stride_h + rs, acc, mask=rs < r)
    else:
        tl.atomic_add(h_ptr + m * stride_h + rs, acc, mask=rs < r)


@triton.jit
def _expand_rows(h_ptr, slot_ptr, bt_ptr, off_ptr, rank_ptr, y_ptr, N, stride_h, stride_b, stride_y,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(slot_ptr + m)
    valid = slot >= 0
    s = tl.where(valid, slot, 0)
    r = tl.where(valid, tl.load(rank_ptr + s), 0)
    off = tl.load(off_ptr + s)
    rs = tl.arange(0, BLOCK_R)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = (ns < N) & valid
    h = tl.load(h_ptr + m * stride_h + rs, mask=rs < r, other=0.0)
    b = tl.load(bt_ptr + (off + rs)[:, None] * stride_b + ns[None, :],
                mask=(rs[:, None] < r) & nmask[None, :], other=0.0).to(tl.float32)
    out = tl.sum(h[:, None] * b, axis=0)
    y = tl.load(y_ptr + m * stride_y + ns, mask=nmask, other=0.0)
    tl.store(y_ptr + m * stride_y + ns, (y.to(tl.float32) + out).to(y.dtype), mask=nmask)


@triton.jit
def _shrink_tiles(x_ptr, tok_ptr, tslot_ptr, tstart_ptr, tend_ptr, a_ptr, off_ptr, rank_ptr, h_ptr,
                  K, stride_x, stride_a, stride_h,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                  PRECISION: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(tslot_ptr + t)
    start = tl.load(tstart_ptr + t)
    end = tl.load(tend_ptr + t)
    r = tl.load(rank_ptr + slot)
    off = tl.load(off_ptr + slot)
    ms = start + tl.arange(0, BLOCK_M)
    mmask = ms < end
    toks = tl.load(tok_ptr + ms, mask=mmask, other=0)
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + toks[:, None] * stride_x + ks[None, :],
                     mask=mmask[:, None] & (ks[None, :] < K), other=0.0)
        at = tl.load(a_ptr + (off + rs)[None, :] * stride_a + ks[:, None],
                     mask=(rs[None, :] < r) & (ks[:, None] < K), other=0.0)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    tl.store(h_ptr + toks[:, None] * stride_h + rs[None, :], acc,
             mask=mmask[:, None] & (rs[None, :] < r))


@triton.jit
def _expand_tiles(h_ptr, tok_ptr, tslot_ptr, tstart_ptr, tend_ptr, bt_ptr, off_ptr, rank_ptr, y_ptr,
                  N, stride_h, stride_b, stride_y,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(tslot_ptr + t)
    start = tl.load(tstart_ptr + t)
    end = tl.load(tend_ptr + t)
    r = tl.load(rank_ptr + slot)
    off = tl.load(off_ptr + slot)
    ms = start + tl.arange(0, BLOCK_M)
    mmask = ms < end
    toks = tl.load(tok_ptr + ms, mask=mmask, other=0)
    rs = tl.arange(0, BLOCK_R)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.load(h_ptr + toks[:, None] * stride_h + rs[None, :],
                mask=mmask[:, None] & (rs[None, :] < r), other=0.0)
    b = tl.load(bt_ptr + (off + rs)[:, None] * stride_b + ns[None, :],
                mask=(rs[:, None] < r) & (ns[None, :] < N), other=0.0).to(tl.float32)
    out = tl.dot(h, b, input_precision=PRECISION)
    ymask = mmask[:, None] & (ns[None, :] < N)
    yp = y_ptr + toks[:, None] * stride_y + ns[None, :]
    y = tl.load(yp, mask=ymask, other=0.0)
    tl.store(yp, (y.to(tl.float32) + out).to(y.dtype), mask=ymask)


def _block_r(r_max: int, minimum: int) -> int:
    return max(minimum, triton.next_power_of_2(r_max))


@dataclass
class TilePlan:
    """Tokens sorted by slot, each adapter's segment cut into tiles of ``block_m`` tokens.
    Computed once per batch (one host sync) and shared by every layer."""
    order: torch.Tensor      # (N,) int32 token ids, sorted by slot
    tslot: torch.Tensor      # (tiles,) int32 adapter of each tile
    tstart: torch.Tensor     # (tiles,) int32 first position in ``order``
    tend: torch.Tensor       # (tiles,) int32 one past the last
    block_m: int


def tile_plan(slots: torch.Tensor, n: int, block_m: int = 32) -> TilePlan:
    """Plan for token slots (N,) in [-1, n); tiles of base tokens (-1) are left out."""
    order = torch.argsort(slots, stable=True).to(torch.int32)
    counts = torch.bincount(slots.long() + 1, minlength=n + 1).tolist()    # one host sync
    tslot, tstart, tend = [], [], []
    start = counts[0]
    for i, c in enumerate(counts[1:]):
        for s in range(start, start + c, block_m):
            tslot.append(i), tstart.append(s), tend.append(min(s + block_m, start + c))
        start += c
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=slots.device)
    return TilePlan(order, as_t(tslot), as_t(tstart), as_t(tend), block_m)


def choose_variant(n_tokens: int, n_adapters: int) -> str:
    """Tiles when the average segment fills a tile (prefill), rows otherwise (decode)."""
    return "tiles" if n_tokens >= 64 and n_tokens >= 32 * n_adapters else "rows"


def lora_add_(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, packed: PackedLoRA,
              variant: str | None = None, plan: TilePlan | None = None) -> torch.Tensor:
    """y += Δy for tokens x: (N, d_in) with slots (N,) (−1: none), in place on y: (N, d_out).

    ``variant``: "rows" (decode), "tiles" (prefill) or None (``choose_variant``). The tiles
    variant takes a precomputed ``plan`` (``tile_plan``), or makes one."""
    N, K = x.shape
    D = y.shape[1]
    n = packed.ranks.numel()
    if N == 0:
        return y
    x = x if x.stride(1) == 1 else x.contiguous()
    variant = variant or ("tiles" if plan is not None else choose_variant(N, n))
    if variant == "rows":
        slots = slots.to(torch.int32)
        block_r = _block_r(packed.r_max, 1)
        block_k = max(32, min(512, 8192 // block_r))
        split_k = max(1, min(triton.cdiv(K, block_k), triton.cdiv(512, N)))
        alloc = torch.zeros if split_k > 1 else torch.empty      # split-K accumulates atomically
        h = alloc(N, packed.r_max, device=x.device, dtype=torch.float32)
        _shrink_rows[(N, split_k)](x, slots, packed.a, packed.offsets, packed.ranks, h, K,
                                   x.stride(0), packed.a.stride(0), h.stride(0),
                                   BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=split_k)
        block_n = max(32, min(512, 8192 // block_r))
        _expand_rows[(N, triton.cdiv(D, block_n))](h, slots, packed.bt, packed.offsets, packed.ranks, y,
                                                    D, h.stride(0), packed.bt.stride(0), y.stride(0),
                                                    BLOCK_R=block_r, BLOCK_N=block_n)
    elif variant == "tiles":
        plan = plan or tile_plan(slots, n)
        tiles = plan.tslot.numel()
        if tiles == 0:
            return y
        block_r = _block_r(packed.r_max, 16)
        h = torch.empty(N, packed.r_max, device=x.device, dtype=torch.float32)
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        _shrink_tiles[(tiles,)](x, plan.order, plan.tslot, plan.tstart, plan.tend, packed.a,
                                packed.offsets, packed.ranks, h, K, x.stride(0), packed.a.stride(0),
                                h.stride(0), BLOCK_M=plan.block_m, BLOCK_R=block_r, BLOCK_K=64,
                                PRECISION=precision)
        block_n = 64
        _expand_tiles[(tiles, triton.cdiv(D, block_n))](
            h, plan.order, plan.tslot, plan.tstart, plan.tend, packed.bt, packed.offsets, packed.ranks,
            y, D, h.stride(0), packed.bt.stride(0), y.stride(0),
            BLOCK_M=plan.block_m, BLOCK_R=block_r, BLOCK_N=block_n, PRECISION=precision)
    else:
        raise ValueError(f"variant must be 'rows', 'tiles' or None, got {variant!r}")
    return y
