"""Decode attention over a paged KV cache: one new query token per sequence, keys and
values read through the sequence's block table (the PagedAttention idea of vLLM, SOSP'23),
with the context split across programs (flash-decoding, Dao et al. 2023).

For sequence b with context length L_b and query head h (KV head g(h) = h // (H / H_kv)):

    o_{b,h} = Σ_{j < L_b} softmax_j(q_{b,h} · k_{b,j,g} / √d) v_{b,j,g},
    k_{b,j} = cache_k[table[b, j // block] · block + j % block]

One Triton program per (sequence, KV head, split c of ``splits``) handles that KV head's group
of query heads over its chunk of the context (c·C_b up to (c+1)·C_b, C_b = L_b / splits
rounded up to the key block) with an online softmax, and writes its partial result: the
running maximum m_c, the sum l_c = Σ exp(s - m_c) and the unnormalised acc_c = Σ exp(s - m_c) v.
A second launch combines the chunks of each (sequence, head):

    M = max_c m_c,   o = Σ_c exp(m_c - M) acc_c / Σ_c exp(m_c - M) l_c

Splitting the context is what keeps the GPU's memory busy: a decode step of 64 sequences
has only 64 · H_kv (sequence, head) pairs, each a chain of dependent loads, too few to hide
the memory's latency when each walks its whole context alone. With ``splits=1`` each
program walks the whole context and writes o directly (one launch). Shapes do not depend on
the context lengths (each sequence's chunk length is computed in the kernel from its
length), so the decode step can be captured in a CUDA graph and replayed. Runs on CPU
tensors under ``TRITON_INTERPRET=1`` for tests; ``paged_decode_reference`` is the PyTorch
reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    lens_ptr,
    out_ptr,
    m_ptr,
    l_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_kr,
    stride_kh,
    stride_tb,
    stride_ot,
    stride_oh,
    stride_oc,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """SPLITS > 1: partial (acc, m, l) of chunk c into out[b, h, c], m[b, h, c], l[b, h, c];
    else the normalised output into out[b, h]."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    c = tl.program_id(2)
    length = tl.load(lens_ptr + b)
    if SPLITS > 1:
        chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        start = c * chunk
        end = tl.minimum(start + chunk, length)
    else:
        start = 0
        end = length
    gs = tl.arange(0, BLOCK_G)
    ds = tl.arange(0, BLOCK_D)
    heads = g * GROUP + gs
    live = start < end  # chunks past the context read and write nothing
    qmask = (gs < GROUP)[:, None] & (ds < HEAD_DIM)[None, :] & live
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + ds[None, :], mask=qmask, other=0.0)
    q = q.to(tl.float32) * scale  # (G, D), scale = log2(e) / √d: scores in base 2
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for pos0 in range(start, end, BLOCK_N):
        pos = pos0 + tl.arange(0, BLOCK_N)
        pmask = pos < end
        page = tl.load(table_ptr + b * stride_tb + pos // PAGE, mask=pmask, other=0)
        rows = page.to(tl.int64) * PAGE + pos % PAGE
        kvmask = pmask[:, None] & (ds < HEAD_DIM)[None, :]
        kv_off = rows[:, None] * stride_kr + g * stride_kh + ds[None, :]
        k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)  # (N, D)
        v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)  # (N, D)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (G, N)
        s = tl.where(pmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    if SPLITS > 1:
        o_off = b * stride_ot + heads[:, None] * stride_oh + c * stride_oc + ds[None, :]
        tl.store(out_ptr + o_off, acc, mask=qmask)
        ml_off = (b * GROUP * tl.num_programs(1) + heads) * tl.num_programs(2) + c
        tl.store(m_ptr + ml_off, m, mask=(gs < GROUP) & live)
        tl.store(l_ptr + ml_off, denom, mask=(gs < GROUP) & live)
    else:
        out = acc / denom[:, None]
        o_off = b * stride_ot + heads[:, None] * stride_oh + ds[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _combine(
    part_ptr,
    m_ptr,
    l_ptr,
    lens_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    N_HEADS: tl.constexpr,
    N_CHUNKS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """o[b, h] = Σ_c exp(m_c - M) acc_c / Σ_c exp(m_c - M) l_c over the chunks that hold context."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    length = tl.load(lens_ptr + b)
    cs = tl.arange(0, BLOCK_C)
    ds = tl.arange(0, BLOCK_D)
    chunk = tl.cdiv(tl.cdiv(length, N_CHUNKS), BLOCK_N) * BLOCK_N  # as the partial launch cut it
    live = (cs < N_CHUNKS) & (cs * chunk < length)
    base = (b * N_HEADS + h) * N_CHUNKS
    m = tl.load(m_ptr + base + cs, mask=live, other=float("-inf"))  # (C,)
    denom = tl.load(l_ptr + base + cs, mask=live, other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # chunk 0 always holds context: the maximum is finite
    w = tl.where(live, w, 0.0)
    acc = tl.load(
        part_ptr + (base + cs[:, None]) * HEAD_DIM + ds[None, :], mask=live[:, None] & (ds < HEAD_DIM)[None, :], other=0
    )  # (C, D)
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(denom * w, axis=0)
    tl.store(out_ptr + b * stride_ot + h * stride_oh + ds, o.to(out_ptr.dtype.element_ty), mask=ds < HEAD_DIM)


def paged_decode_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    page: int,
    *,
    splits: int = 1,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    q: (B, H, D); cache_k, cache_v: (rows, H_kv, D) with rows = pages · page; table:
    (B, max_pages) int32 page ids; lengths: (B,) context length of each sequence (>= 1, the
    new token's keys and values already written). ``splits``: programs per (sequence, KV
    head), each over 1/splits of that sequence's context (then a combine launch); 1: one
    program walks a whole context. Measured on an H100, 64 sequences of 32 heads of 128
    (``benchmarks/scripts/decode_attention.py``, ``results/decode-attention-h100.json``): one
    program a context with 32 keys a step takes 99 us at 176 positions and 503 us at 1,088
    (61% and 75% of the keys' and values' time at the copy bandwidth; 128 and 675 us with 64
    keys a step, before); chunks of 128 positions with 2 warps took 89 and 419 us (68%, 90%)
    when the launch held no chunk past the context. Fixed-size chunks over the engine's
    max_len-wide tables replayed a decode step slower (9.72 against 8.62 ms), hence chunks
    that follow each sequence's length; their speed in the engine is not measured yet.
    ``block_n``, ``num_warps``, ``num_stages``: the kernel's tiling (benchmarks). Returns (B, H, D)."""
    B, H, D = q.shape
    h_kv = cache_k.shape[1]
    assert H % h_kv == 0 and cache_k.stride(2) == 1 and q.stride(2) == 1, "bad shapes or strides"
    group = H // h_kv
    block_g, block_d = triton.next_power_of_2(group), triton.next_power_of_2(D)
    if block_n is None:  # (G, N, D) of 4,096 elements: 32 keys a step for one head of 128 (fastest measured)
        block_n = max(16, min(32, 4096 // (block_g * block_d)))
    n_chunks = splits
    split = splits > 1
    out = torch.empty_like(q)
    part = torch.empty(B, H, n_chunks, D, dtype=torch.float32, device=q.device) if split else out
    m = torch.empty(B, H, n_chunks, dtype=torch.float32, device=q.device) if split else out
    l_sum = torch.empty_like(m) if split else out
    opts = {"num_warps": num_warps} | ({"num_stages": num_stages} if num_stages else {})
    _paged_decode[(B, h_kv, n_chunks)](
        q,
        cache_k,
        cache_v,
        table,
        lengths,
        part,
        m,
        l_sum,
        LOG2E / math.sqrt(D),
        q.stride(0),
        q.stride(1),
        cache_k.stride(0),
        cache_k.stride(1),
        table.stride(0),
        part.stride(0),
        part.stride(1),
        part.stride(2) if split else 0,
        GROUP=group,
        BLOCK_G=block_g,
        HEAD_DIM=D,
        BLOCK_D=block_d,
        PAGE=page,
        BLOCK_N=block_n,
        SPLITS=splits,
        **opts,
    )
    if split:
        _combine[(B, H)](
            part,
            m,
            l_sum,
            lengths,
            out,
            out.stride(0),
            out.stride(1),
            N_HEADS=H,
            N_CHUNKS=n_chunks,
            BLOCK_C=triton.next_power_of_2(n_chunks),
            HEAD_DIM=D,
            BLOCK_D=block_d,
            BLOCK_N=block_n,
            num_warps=4,
        )
    return out


def paged_decode_reference(q, cache_k, cache_v, table, lengths, page: int) -> torch.Tensor:
    """The same attention in PyTorch, one sequence at a time (tests)."""
    out = []
    for b in range(q.shape[0]):
        L = int(lengths[b])
        pos = torch.arange(L, device=q.device)
        rows = table[b, pos // page].long() * page + pos % page
        k, v = cache_k[rows].transpose(0, 1), cache_v[rows].transpose(0, 1)  # (H_kv, L, D)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[b][:, None].float(), k.float(), v.float(), enable_gqa=True
        )  # (H, 1, D)
        out.append(o[:, 0].to(q.dtype))
    return torch.stack(out)
