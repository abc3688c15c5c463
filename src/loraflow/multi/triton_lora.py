"""Triton kernels for per-row LoRA at inference: shrink (h = A_s x) and expand
(Δy = B_s h), reading each row's adapter by slot id (the SGMV/BGMV idea of Punica, MLSys'24).

The expand writes every row of Δy (zeros, or the bias, for rows without an adapter), so the
layer is one more GEMM that reads Δy in its epilogue, y = addmm(Δy, x, W0ᵀ), and the add-on
never re-reads the base output: its memory traffic is x, the A and B in use, and Δy once.

Adapters of mixed ranks are packed without padding the weights: all A_i stacked by rows
into ``a`` (Σ r_i, d_in), all scale_i · B_iᵀ into ``bt`` (Σ r_i, d_out); adapter i owns rows
``offsets[i] : offsets[i] + ranks[i]``. Only the small per-token buffer h is padded to r_max.

Two variants of each kernel:
- rows (decode): one program per token and slice of d_in (shrink; partial sums, no atomics,
  no memset) or block of d_out (expand, which adds the partials); each token reads its
  adapter's rows directly, so 64 tokens with 64 adapters read each adapter once.
- tiles (prefill): tokens sorted by slot, cut into tiles of BLOCK_M tokens of one adapter;
  each tile is a small matrix product on the tensor cores (``tl.dot``), split over d_in.

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

    a: torch.Tensor  # (Σ r_i, d_in)
    bt: torch.Tensor  # (Σ r_i, d_out), scale folded in
    offsets: torch.Tensor  # (n,) int32
    ranks: torch.Tensor  # (n,) int32
    r_max: int

    @staticmethod
    def pack(A, B, scales) -> PackedLoRA:
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
            r_max=max(ranks),
        )


@triton.jit
def _slot_info(slot_ptr_or_val, rank_ptr, off_ptr):
    valid = slot_ptr_or_val >= 0
    s = tl.where(valid, slot_ptr_or_val, 0)
    r = tl.where(valid, tl.load(rank_ptr + s), 0)
    return r, tl.load(off_ptr + s)


@triton.jit
def _shrink_chunk(
    x_ptr, a_ptr, m, k_lo, K, K_SPLIT, r, off, stride_x, stride_a, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr
):
    """A_s[:, k_lo : k_lo + K_SPLIT] · x_m[k_lo : k_lo + K_SPLIT] as (BLOCK_R,) float32."""
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K_SPLIT, BLOCK_K):
        ks = k_lo + k0 + tl.arange(0, BLOCK_K)
        kmask = (ks < K) & (ks < k_lo + K_SPLIT) & (r > 0)
        xk = tl.load(x_ptr + m * stride_x + ks, mask=kmask, other=0.0).to(tl.float32)
        a = tl.load(
            a_ptr + (off + rs)[:, None] * stride_a + ks[None, :], mask=(rs[:, None] < r) & kmask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(a * xk[None, :], axis=1)
    return acc


@triton.jit
def _expand_block(h, bt_ptr, bias_ptr, out_ptr, m, off, r, rs, ns, N, stride_b, stride_o, HAS_BIAS: tl.constexpr):
    """out[m, ns] = h · (scale · B_s)ᵀ[:, ns] (+ bias[ns]) for one token and one block of d_out."""
    b = tl.load(
        bt_ptr + (off + rs)[:, None] * stride_b + ns[None, :], mask=(rs[:, None] < r) & (ns[None, :] < N), other=0.0
    ).to(tl.float32)
    out = tl.sum(h[:, None] * b, axis=0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + ns, mask=ns < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_o + ns, out.to(out_ptr.dtype.element_ty), mask=ns < N)


@triton.jit
def _shrink_rows(
    x_ptr,
    slot_ptr,
    a_ptr,
    off_ptr,
    rank_ptr,
    hp_ptr,
    K,
    K_SPLIT,
    stride_x,
    stride_a,
    stride_hs,
    stride_hm,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """hp[split, m, :r] = A_s[:, chunk] · x_m[chunk] for one token m and one chunk of d_in."""
    m = tl.program_id(0)
    split = tl.program_id(1)
    r, off = _slot_info(tl.load(slot_ptr + m), rank_ptr, off_ptr)
    rs = tl.arange(0, BLOCK_R)
    acc = _shrink_chunk(x_ptr, a_ptr, m, split * K_SPLIT, K, K_SPLIT, r, off, stride_x, stride_a, BLOCK_R, BLOCK_K)
    tl.store(hp_ptr + split * stride_hs + m * stride_hm + rs, acc, mask=rs < r)


@triton.jit
def _expand_rows(
    hp_ptr,
    slot_ptr,
    bt_ptr,
    off_ptr,
    rank_ptr,
    bias_ptr,
    out_ptr,
    N,
    SPLIT_K,
    stride_hs,
    stride_hm,
    stride_b,
    stride_o,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """out[m, block] = Σ_split hp[split, m] · B_sᵀ[:, block] (+ bias); every element written."""
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r, off = _slot_info(tl.load(slot_ptr + m), rank_ptr, off_ptr)
    rs = tl.arange(0, BLOCK_R)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for sp in range(0, SPLIT_K):
        h += tl.load(hp_ptr + sp * stride_hs + m * stride_hm + rs, mask=rs < r, other=0.0)
    _expand_block(h, bt_ptr, bias_ptr, out_ptr, m, off, r, rs, ns, N, stride_b, stride_o, HAS_BIAS)


@triton.jit
def _lora_rows_fused(
    x_ptr,
    slot_ptr,
    a_ptr,
    bt_ptr,
    off_ptr,
    rank_ptr,
    bias_ptr,
    out_ptr,
    hp_ptr,
    count_ptr,
    K,
    N,
    K_SPLIT,
    SPLIT_K,
    stride_x,
    stride_a,
    stride_b,
    stride_hs,
    stride_hm,
    stride_o,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Shrink and expand in one launch: each (token, d_in chunk) program writes its partial h;
    the last of a token's programs to finish (an atomic counter) adds the partials and writes
    the token's whole output row, then resets the counter for the next launch."""
    m = tl.program_id(0)
    split = tl.program_id(1)
    r, off = _slot_info(tl.load(slot_ptr + m), rank_ptr, off_ptr)
    rs = tl.arange(0, BLOCK_R)
    acc = _shrink_chunk(x_ptr, a_ptr, m, split * K_SPLIT, K, K_SPLIT, r, off, stride_x, stride_a, BLOCK_R, BLOCK_K)
    tl.store(hp_ptr + split * stride_hs + m * stride_hm + rs, acc, mask=rs < r)
    done = tl.atomic_add(count_ptr + m, 1, sem="acq_rel")
    if done == SPLIT_K - 1:
        h = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for sp in range(0, SPLIT_K):
            h += tl.load(hp_ptr + sp * stride_hs + m * stride_hm + rs, mask=rs < r, other=0.0, volatile=True)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            _expand_block(h, bt_ptr, bias_ptr, out_ptr, m, off, r, rs, ns, N, stride_b, stride_o, HAS_BIAS)
        tl.atomic_xchg(count_ptr + m, 0)


@triton.jit
def _shrink_tiles(
    x_ptr,
    tok_ptr,
    tslot_ptr,
    tstart_ptr,
    tend_ptr,
    a_ptr,
    off_ptr,
    rank_ptr,
    h_ptr,
    K,
    K_SPLIT,
    stride_x,
    stride_a,
    stride_h,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """h[tile tokens, :r] += x_tile[:, chunk] · A_s[:, chunk]ᵀ (atomics over the d_in chunks)."""
    t = tl.program_id(0)
    split = tl.program_id(1)
    r, off = _slot_info(tl.load(tslot_ptr + t), rank_ptr, off_ptr)
    start = tl.load(tstart_ptr + t)
    end = tl.load(tend_ptr + t)
    ms = start + tl.arange(0, BLOCK_M)
    mmask = (ms < end) & (r > 0)
    toks = tl.load(tok_ptr + ms, mask=mmask, other=0)
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_lo = split * K_SPLIT
    for k0 in range(0, K_SPLIT, BLOCK_K):
        ks = k_lo + k0 + tl.arange(0, BLOCK_K)
        kmask = (ks < K) & (ks < k_lo + K_SPLIT)
        xt = tl.load(x_ptr + toks[:, None] * stride_x + ks[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        at = tl.load(
            a_ptr + (off + rs)[None, :] * stride_a + ks[:, None], mask=(rs[None, :] < r) & kmask[:, None], other=0.0
        )
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    tl.atomic_add(h_ptr + toks[:, None] * stride_h + rs[None, :], acc, mask=mmask[:, None] & (rs[None, :] < r))


@triton.jit
def _expand_tiles(
    h_ptr,
    tok_ptr,
    tslot_ptr,
    tstart_ptr,
    tend_ptr,
    bt_ptr,
    off_ptr,
    rank_ptr,
    bias_ptr,
    out_ptr,
    N,
    stride_h,
    stride_b,
    stride_o,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """out[tile tokens, block] = h_tile · B_sᵀ[:, block] (+ bias); base tiles get zeros (+ bias)."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    r, off = _slot_info(tl.load(tslot_ptr + t), rank_ptr, off_ptr)
    start = tl.load(tstart_ptr + t)
    end = tl.load(tend_ptr + t)
    ms = start + tl.arange(0, BLOCK_M)
    mmask = ms < end
    toks = tl.load(tok_ptr + ms, mask=mmask, other=0)
    rs = tl.arange(0, BLOCK_R)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.load(h_ptr + toks[:, None] * stride_h + rs[None, :], mask=mmask[:, None] & (rs[None, :] < r), other=0.0)
    b = tl.load(
        bt_ptr + (off + rs)[:, None] * stride_b + ns[None, :], mask=(rs[:, None] < r) & (ns[None, :] < N), other=0.0
    ).to(tl.float32)
    out = tl.dot(h, b, input_precision=PRECISION)
    if HAS_BIAS:
        out += tl.load(bias_ptr + ns, mask=ns < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + toks[:, None] * stride_o + ns[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mmask[:, None] & (ns[None, :] < N),
    )


def _block_r(r_max: int, minimum: int) -> int:
    return max(minimum, triton.next_power_of_2(r_max))


def _rows_split(K: int, N: int, cfg: dict) -> tuple[int, int, int]:
    """(block_k, split_k, k_split) of the per-row shrink: d_in in split_k chunks of k_split,
    a multiple of block_k (split_k 0 in ``cfg``: enough programs to fill the GPU)."""
    block_k = min(cfg["block_k"], triton.next_power_of_2(K))
    split_k = cfg["split_k"] or max(1, min(triton.cdiv(K, block_k), triton.cdiv(1024, N)))
    k_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    return block_k, triton.cdiv(K, k_split), k_split


@dataclass
class TilePlan:
    """Tokens sorted by slot, each segment (base tokens too) cut into tiles of ``block_m``
    tokens. Computed once per batch (one host sync) and shared by every layer."""

    order: torch.Tensor  # (N,) int32 token ids, sorted by slot
    tslot: torch.Tensor  # (tiles,) int32 adapter of each tile, -1: base tokens
    tstart: torch.Tensor  # (tiles,) int32 first position in ``order``
    tend: torch.Tensor  # (tiles,) int32 one past the last
    block_m: int


def tile_plan(slots: torch.Tensor, n: int, block_m: int = 32) -> TilePlan:
    """Plan for token slots (N,) in [-1, n)."""
    order = torch.argsort(slots, stable=True).to(torch.int32)
    counts = torch.bincount(slots.long() + 1, minlength=n + 1).tolist()  # one host sync
    tslot, tstart, tend = [], [], []
    start = 0
    for i, c in enumerate(counts):
        for s in range(start, start + c, block_m):
            tslot.append(i - 1), tstart.append(s), tend.append(min(s + block_m, start + c))
        start += c
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=slots.device)
    return TilePlan(order, as_t(tslot), as_t(tstart), as_t(tend), block_m)


DECODE_VARIANT = "rows"  # or "fused"; set from the benchmark sweep


def choose_variant(n_tokens: int, n_adapters: int) -> str:
    """Tiles when the average segment fills a tile (prefill), a decode variant otherwise."""
    return "tiles" if n_tokens >= 64 and n_tokens >= 32 * n_adapters else DECODE_VARIANT


# Launch parameters; ``lora_delta(config=...)`` overrides them. Chosen by
# ``loraflow bench kernels --sweep`` on an H200 (decode 64 x r16, prefill 4096 tokens x r16).
# On 2026-11-28: rows 12.3 us, fused 13.9 us (decode); tiles 34.7 us (prefill). "rows" (also
# the sibling launches) re-chosen on 2026-11-29 over 180 configurations at Llama-2-7B's
# decoder blocks (benchmarks/scripts/lora_sweep.py): 67.8 us a block against 72.3 us before.
DEFAULTS = {
    "rows": {"block_k": 128, "split_k": 8, "block_n": 2048, "warps": 8},
    "fused": {"block_k": 512, "split_k": 16, "block_n": 1024, "warps": 4},
    "tiles": {"block_m": 32, "block_k": 128, "split_k": 4, "block_n": 256, "warps": 8},
}
_COUNTERS: dict = {}


def _counters(device, n: int) -> torch.Tensor:
    """Zeroed int32 counters for the fused kernel, kept between launches (it resets them)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def lora_delta(
    x: torch.Tensor,
    slots: torch.Tensor,
    packed: PackedLoRA,
    variant: str | None = None,
    plan: TilePlan | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Δy (+ bias) for tokens x: (N, d_in) with slots (N,) (-1: none): (N, d_out), every
    element written. ``variant``: "rows" (decode), "tiles" (prefill) or None
    (``choose_variant``); the tiles variant takes a precomputed ``plan`` or makes one."""
    N, K = x.shape
    D = packed.bt.shape[1]
    n = packed.ranks.numel()
    out = torch.empty(N, D, device=x.device, dtype=x.dtype) if out is None else out
    if N == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    variant = variant or ("tiles" if plan is not None else choose_variant(N, n))
    cfg = {**DEFAULTS.get(variant, {}), **(config or {})}
    has_bias = bias is not None
    bias = bias if has_bias else out  # a valid pointer, never read
    if variant in ("rows", "fused"):
        slots = slots.to(torch.int32)
        block_r = _block_r(packed.r_max, 1)
        block_k, split_k, k_split = _rows_split(K, N, cfg)
        hp = torch.empty(split_k, N, packed.r_max, device=x.device, dtype=torch.float32)
    if variant == "fused":
        block_n = min(cfg["block_n"], triton.next_power_of_2(D))
        _lora_rows_fused[(N, split_k)](
            x,
            slots,
            packed.a,
            packed.bt,
            packed.offsets,
            packed.ranks,
            bias,
            out,
            hp,
            _counters(x.device, N),
            K,
            D,
            k_split,
            split_k,
            x.stride(0),
            packed.a.stride(0),
            packed.bt.stride(0),
            hp.stride(0),
            hp.stride(1),
            out.stride(0),
            BLOCK_R=block_r,
            BLOCK_K=block_k,
            BLOCK_N=block_n,
            HAS_BIAS=has_bias,
            num_warps=cfg["warps"],
        )
    elif variant == "rows":
        _shrink_rows[(N, split_k)](
            x,
            slots,
            packed.a,
            packed.offsets,
            packed.ranks,
            hp,
            K,
            k_split,
            x.stride(0),
            packed.a.stride(0),
            hp.stride(0),
            hp.stride(1),
            BLOCK_R=block_r,
            BLOCK_K=block_k,
            num_warps=cfg["warps"],
        )
        block_n = min(cfg["block_n"], triton.next_power_of_2(D))
        _expand_rows[(N, triton.cdiv(D, block_n))](
            hp,
            slots,
            packed.bt,
            packed.offsets,
            packed.ranks,
            bias,
            out,
            D,
            split_k,
            hp.stride(0),
            hp.stride(1),
            packed.bt.stride(0),
            out.stride(0),
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            HAS_BIAS=has_bias,
            num_warps=cfg["warps"],
        )
    elif variant == "tiles":
        plan = plan or tile_plan(slots, n, cfg["block_m"])
        tiles = plan.tslot.numel()
        block_r = _block_r(packed.r_max, 16)
        block_k = cfg["block_k"]
        split_k = cfg["split_k"] or max(1, min(triton.cdiv(K, 4 * block_k), triton.cdiv(1024, tiles)))
        k_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
        split_k = triton.cdiv(K, k_split)
        h = torch.zeros(N, packed.r_max, device=x.device, dtype=torch.float32)
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        _shrink_tiles[(tiles, split_k)](
            x,
            plan.order,
            plan.tslot,
            plan.tstart,
            plan.tend,
            packed.a,
            packed.offsets,
            packed.ranks,
            h,
            K,
            k_split,
            x.stride(0),
            packed.a.stride(0),
            h.stride(0),
            BLOCK_M=plan.block_m,
            BLOCK_R=block_r,
            BLOCK_K=block_k,
            PRECISION=precision,
            num_warps=cfg["warps"],
        )
        block_n = cfg["block_n"]
        _expand_tiles[(tiles, triton.cdiv(D, block_n))](
            h,
            plan.order,
            plan.tslot,
            plan.tstart,
            plan.tend,
            packed.bt,
            packed.offsets,
            packed.ranks,
            bias,
            out,
            D,
            h.stride(0),
            packed.bt.stride(0),
            out.stride(0),
            BLOCK_M=plan.block_m,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            PRECISION=precision,
            HAS_BIAS=has_bias,
            num_warps=cfg["warps"],
        )
    else:
        raise ValueError(f"variant must be 'rows', 'fused', 'tiles' or None, got {variant!r}")
    return out
