"""Decode attention over a paged KV cache: one new query token per sequence, keys and
values read through the sequence's block table (the PagedAttention idea of vLLM, SOSP'23).

For sequence b with context length L_b and query head h (KV head g(h) = h // (H / H_kv)):

    o_{b,h} = Σ_{j < L_b} softmax_j(q_{b,h} · k_{b,j,g} / √d) v_{b,j,g},
    k_{b,j} = cache_k[table[b, j // block] · block + j % block]

One Triton program per (sequence, KV head) handles that KV head's group of query heads with
an online softmax over chunks of the context, so no context is gathered or padded. Shapes
do not depend on the context lengths (they are read from a tensor), which lets the decode
step be captured once in a CUDA graph and replayed. Runs on CPU tensors under
``TRITON_INTERPRET=1`` for tests; ``paged_decode_reference`` is the PyTorch reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    lens_ptr,
    out_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_kr,
    stride_kh,
    stride_tb,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    length = tl.load(lens_ptr + b)
    gs = tl.arange(0, BLOCK_G)
    ds = tl.arange(0, BLOCK_D)
    heads = g * GROUP + gs
    qmask = (gs < GROUP)[:, None] & (ds < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + ds[None, :], mask=qmask, other=0.0)
    q = q.to(tl.float32) * scale  # (G, D)
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for start in range(0, length, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pmask = pos < length
        page = tl.load(table_ptr + b * stride_tb + pos // PAGE, mask=pmask, other=0)
        rows = page.to(tl.int64) * PAGE + pos % PAGE
        kvmask = pmask[:, None] & (ds < HEAD_DIM)[None, :]
        kv_off = rows[:, None] * stride_kr + g * stride_kh + ds[None, :]
        k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)  # (N, D)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (G, N)
        s = tl.where(pmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)  # (N, D)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / denom[:, None]
    tl.store(
        out_ptr + b * stride_ot + heads[:, None] * stride_oh + ds[None, :], out.to(out_ptr.dtype.element_ty), mask=qmask
    )


def paged_decode_attention(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor, page: int
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    q: (B, H, D); cache_k, cache_v: (rows, H_kv, D) with rows = pages · page; table:
    (B, max_pages) int32 page ids; lengths: (B,) context length of each sequence (>= 1, the
    new token's keys and values already written). Returns (B, H, D)."""
    B, H, D = q.shape
    h_kv = cache_k.shape[1]
    assert H % h_kv == 0 and cache_k.stride(2) == 1 and q.stride(2) == 1, "bad shapes or strides"
    group = H // h_kv
    block_g, block_d = triton.next_power_of_2(group), triton.next_power_of_2(D)
    block_n = max(16, min(64, 8192 // (block_g * block_d)))  # keeps (G, N, D) in registers
    out = torch.empty_like(q)
    _paged_decode[(B, h_kv)](
        q,
        cache_k,
        cache_v,
        table,
        lengths,
        out,
        1.0 / math.sqrt(D),
        q.stride(0),
        q.stride(1),
        cache_k.stride(0),
        cache_k.stride(1),
        table.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        BLOCK_G=block_g,
        HEAD_DIM=D,
        BLOCK_D=block_d,
        PAGE=page,
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
