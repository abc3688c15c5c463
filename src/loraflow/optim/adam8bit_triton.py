"""One fused Triton kernel for an 8-bit Adam step (the CUDA path of ``GaLoreAdamW8bit``).

Per block of 256 values, in one pass over memory: dequantize the two moments (``quant8``'s
block-wise dynamic-exponent code), update them with the (projected) gradient g,

    m = b1 m + (1 - b1) g,    v = b2 v + (1 - b2) g²,    u = (m / c1) / (√(v / c2) + eps)

write the direction u, and store m and v re-quantized: each block's new absolute maximum,
and for each value the nearest code level (a binary search over the 255 midpoints between
levels, the same comparisons as ``torch.bucketize`` in ``quant8.quantize``). The PyTorch
path does the same in about ten kernels, each reading and writing the full state in float32.
Runs on CPU tensors under ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraflow.optim import quant8


@triton.jit
def _nearest(y, mids_ptr):
    """Index of the level nearest y: how many of the (256, +inf padded) midpoints are < y."""
    pos = tl.zeros(y.shape, dtype=tl.int32)
    step = 128
    for _ in tl.static_range(8):
        mid = tl.load(mids_ptr + pos + step - 1)
        pos = tl.where(mid < y, pos + step, pos)
        step = step // 2
    return pos


@triton.jit
def _adam8bit(
    g_ptr,
    m_codes,
    m_absmax,
    v_codes,
    v_absmax,
    out_ptr,
    n,
    m_levels,
    m_mids,
    v_levels,
    v_mids,
    w1,
    b2,
    w2,
    eps,
    c1,
    c2,
    FIRST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FIRST:
        m = tl.zeros((BLOCK,), dtype=tl.float32)
        v = tl.zeros((BLOCK,), dtype=tl.float32)
    else:
        mc = tl.load(m_codes + offs, mask=mask, other=0).to(tl.int32)
        vc = tl.load(v_codes + offs, mask=mask, other=0).to(tl.int32)
        m = tl.load(m_levels + mc) * tl.load(m_absmax + blk)
        v = tl.load(v_levels + vc) * tl.load(v_absmax + blk)
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
    m = m + w1 * (g - m)
    v = v * b2 + w2 * (g * g)
    # IEEE division and square root (Triton's defaults on the GPU are approximate), so the
    # codes match quant8's: a value near a midpoint between levels must round the same way
    u = tl.math.div_rn(tl.math.div_rn(m, c1), tl.sqrt_rn(tl.math.div_rn(v, c2)) + eps)
    tl.store(out_ptr + offs, u, mask=mask)
    am = tl.maximum(tl.max(tl.abs(m), axis=0), 1e-30)
    av = tl.maximum(tl.max(v, axis=0), 1e-30)
    tl.store(m_absmax + blk, am)
    tl.store(v_absmax + blk, av)
    tl.store(m_codes + offs, _nearest(tl.math.div_rn(m, am), m_mids).to(tl.uint8), mask=mask)
    tl.store(v_codes + offs, _nearest(tl.math.div_rn(v, av), v_mids).to(tl.uint8), mask=mask)


def _tables(signed: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    levels, mids = quant8.codebook(signed, device)
    return levels, torch.cat([mids, torch.full((1,), float("inf"), device=device)])  # 256 for the search


def adam8bit_direction(state: dict, g: torch.Tensor, b1: float, b2: float, eps: float, step: int) -> torch.Tensor:
    """The Adam direction u (float32, g's shape) for gradient g, updating the 8-bit moments in
    ``state`` (``exp_avg_codes``/``_absmax``, ``exp_avg_sq_codes``/``_absmax``, the layout of
    ``quant8.quantize``) in place; ``step`` counts from 1."""
    g = g.contiguous()
    n = g.numel()
    blocks = triton.cdiv(n, quant8.BLOCK)
    first = "exp_avg_codes" not in state
    if first:
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{key}_codes"] = torch.empty(n, dtype=torch.uint8, device=g.device)
            state[f"{key}_absmax"] = torch.empty(blocks, dtype=torch.float32, device=g.device)
    out = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    (ml, mm), (vl, vm) = _tables(True, g.device), _tables(False, g.device)
    _adam8bit[(blocks,)](
        g,
        state["exp_avg_codes"],
        state["exp_avg_absmax"],
        state["exp_avg_sq_codes"],
        state["exp_avg_sq_absmax"],
        out,
        n,
        ml,
        mm,
        vl,
        vm,
        1 - b1,
        b2,
        1 - b2,
        eps,
        1 - b1**step,
        1 - b2**step,
        FIRST=first,
        BLOCK=quant8.BLOCK,
    )
    return out
