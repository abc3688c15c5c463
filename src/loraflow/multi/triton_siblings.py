"""Per-row LoRA for sibling layers, layers that read the same input (q/k/v, gate/up), in
one shrink launch and one expand launch instead of one of each per layer.

For token t with slot s and sibling j (up to three):

    h_tj = A_{j,s} x_t              (r_j,)       one launch: grid (tokens, d_in splits, siblings)
    Δy_tj = (scale · B_{j,s}) h_tj  (d_out_j,)   one launch: grid (tokens, d_out blocks, siblings)

The maths and the packed layout are those of ``triton_lora`` (each sibling its own
PackedLoRA); only the launches are shared. A decode step of a Llama runs 7 adapted layers a
block, so 14 LoRA launches become 8: each launch pays a few microseconds to start and
drain, and at decode sizes a layer's adapters take only 2-6 us to read. On an H200 a
Llama-2-7B decode step of 64 tokens on 64 adapters replayed in 12.92 ms this way against
13.49 ms with a launch pair per layer (``benchmarks/scripts/engine_steps.py``,
``results/engine-steps-h200-v7.json``); it is the serving engine's decode kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraflow.multi.triton_lora import (
    DEFAULTS,
    PackedLoRA,
    _block_r,
    _expand_block,
    _rows_split,
    _shrink_chunk,
    _slot_info,
)


@triton.jit
def _pick(j, v0, v1, v2):
    """The value of sibling j (0, 1 or 2): pointers and strides of three layers in one launch."""
    v = v0
    if j == 1:
        v = v1
    if j == 2:
        v = v2
    return v


@triton.jit
def _shrink_siblings(
    x_ptr,
    slot_ptr,
    a0,
    a1,
    a2,
    off0,
    off1,
    off2,
    rank0,
    rank1,
    rank2,
    hp_ptr,
    K,
    K_SPLIT,
    R_MAX,
    stride_x,
    sa0,
    sa1,
    sa2,
    stride_hs,
    stride_hm,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """hp[split, m, j·R_MAX : j·R_MAX + r] = A_{j,s}[:, chunk] · x_m[chunk]."""
    m = tl.program_id(0)
    split = tl.program_id(1)
    j = tl.program_id(2)
    r, off = _slot_info(tl.load(slot_ptr + m), _pick(j, rank0, rank1, rank2), _pick(j, off0, off1, off2))
    rs = tl.arange(0, BLOCK_R)
    acc = _shrink_chunk(
        x_ptr,
        _pick(j, a0, a1, a2),
        m,
        split * K_SPLIT,
        K,
        K_SPLIT,
        r,
        off,
        stride_x,
        _pick(j, sa0, sa1, sa2),
        BLOCK_R,
        BLOCK_K,
    )
    tl.store(hp_ptr + split * stride_hs + m * stride_hm + j * R_MAX + rs, acc, mask=rs < r)


@triton.jit
def _expand_siblings(
    hp_ptr,
    slot_ptr,
    b0,
    b1,
    b2,
    off0,
    off1,
    off2,
    rank0,
    rank1,
    rank2,
    bias0,
    bias1,
    bias2,
    out0,
    out1,
    out2,
    N0,
    N1,
    N2,
    SPLIT_K,
    R_MAX,
    stride_hs,
    stride_hm,
    sb0,
    sb1,
    sb2,
    so0,
    so1,
    so2,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """out_j[m, block] = Σ_split hp[split, m, j's rows] · B_{j,s}ᵀ[:, block] (+ bias_j); every
    element of every sibling's output written (blocks past a narrower sibling's d_out idle)."""
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    j = tl.program_id(2)
    N = _pick(j, N0, N1, N2)
    if pid_n * BLOCK_N < N:
        r, off = _slot_info(tl.load(slot_ptr + m), _pick(j, rank0, rank1, rank2), _pick(j, off0, off1, off2))
        rs = tl.arange(0, BLOCK_R)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        h = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for sp in range(0, SPLIT_K):
            h += tl.load(hp_ptr + sp * stride_hs + m * stride_hm + j * R_MAX + rs, mask=rs < r, other=0.0)
        _expand_block(
            h,
            _pick(j, b0, b1, b2),
            _pick(j, bias0, bias1, bias2),
            _pick(j, out0, out1, out2),
            m,
            off,
            r,
            rs,
            ns,
            N,
            _pick(j, sb0, sb1, sb2),
            _pick(j, so0, so1, so2),
            HAS_BIAS,
        )


def lora_delta_siblings(
    x: torch.Tensor,
    slots: torch.Tensor,
    packed: list[PackedLoRA],
    biases: list[torch.Tensor | None] | None = None,
    config: dict | None = None,
    out: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """[Δy_j (+ bias_j)] for tokens x: (N, d_in) with slots (N,) (-1: none) through 2 or 3
    sibling layers' adapters: each (N, d_out_j), every element written; into ``out`` when
    given (each (N, d_out_j) with unit column stride, e.g. column blocks of one tensor)."""
    n_sib = len(packed)
    if n_sib not in (2, 3):
        raise ValueError(f"2 or 3 sibling layers share a launch, got {n_sib}")
    biases = biases or [None] * n_sib
    if len({b is None for b in biases}) > 1:
        raise ValueError("sibling layers must all have a bias or all have none")
    N, K = x.shape
    outs = out or [torch.empty(N, p.bt.shape[1], device=x.device, dtype=x.dtype) for p in packed]
    assert all(o.shape == (N, p.bt.shape[1]) and o.stride(1) == 1 for o, p in zip(outs, packed)), "bad out"
    if N == 0:
        return outs
    x = x if x.stride(1) == 1 else x.contiguous()
    slots = slots.to(torch.int32)
    cfg = {**DEFAULTS["rows"], **(config or {})}
    r_max = max(p.r_max for p in packed)
    block_r = _block_r(r_max, 1)
    block_k, split_k, k_split = _rows_split(K, N, cfg)
    hp = torch.empty(split_k, N, n_sib * r_max, device=x.device, dtype=torch.float32)
    three = lambda v: list(v) + [v[-1]] * (3 - n_sib)  # pad to three arguments (never read)
    P = three(packed)
    has_bias = biases[0] is not None
    B = three([b if has_bias else o for b, o in zip(biases, outs)])  # valid pointers, read only with a bias
    Y = three(outs)
    _shrink_siblings[(N, split_k, n_sib)](
        x,
        slots,
        *[p.a for p in P],
        *[p.offsets for p in P],
        *[p.ranks for p in P],
        hp,
        K,
        k_split,
        r_max,
        x.stride(0),
        *[p.a.stride(0) for p in P],
        hp.stride(0),
        hp.stride(1),
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        num_warps=cfg["warps"],
    )
    d_max = max(p.bt.shape[1] for p in packed)
    block_n = min(cfg["block_n"], triton.next_power_of_2(d_max))
    _expand_siblings[(N, triton.cdiv(d_max, block_n), n_sib)](
        hp,
        slots,
        *[p.bt for p in P],
        *[p.offsets for p in P],
        *[p.ranks for p in P],
        *B,
        *Y,
        *[p.bt.shape[1] for p in P],
        split_k,
        r_max,
        hp.stride(0),
        hp.stride(1),
        *[p.bt.stride(0) for p in P],
        *[o.stride(0) for o in Y],
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        HAS_BIAS=has_bias,
        num_warps=cfg["warps"],
    )
    return outs
