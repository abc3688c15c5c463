"""Triton kernels around the base GEMM for multiplicative (FLoRA) rows at inference.

A FLoRA adapter of rank r (Wen & Chaudhuri, ICLR 2024, §3) turns W0 into W0 ∘ (C A), so

    y_t = Σ_k c_k ∘ (W0 (a_k ∘ x_t)) + b

and a batch in which every token may carry its own FLoRA adapter (or an additive one, or
none) needs only one GEMM with the shared W0, over the stacked inputs u_j = s_j ∘ x_{tok_j}:
r rows for a FLoRA token (s = a_k), one for any other token (s = 1). The GEMM z = W0 u is
cuBLAS's; these two kernels are what lies on either side of it:

- ``stack`` (prologue): u_j = x_{tok_j} ∘ a_{row_j}, one program per row j and block of d_in;
- ``combine`` (epilogue): y_t = Σ_{j in rows(t)} z_j ∘ c_{row_j} + b, one program per token and
  block of d_out, summing its ``count[t]`` rows from ``start[t]`` in fp32.

The bank row ``row_j`` of a scale-1 row is a row of ones (``AdapterBank.ones_row``), so no
row is a special case. Inference only; runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stack(x_ptr, x_stride, tok_ptr, row_ptr, a_ptr, out_ptr, d_in, BLOCK: tl.constexpr):
    j = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < d_in
    t = tl.load(tok_ptr + j).to(tl.int64)
    r = tl.load(row_ptr + j).to(tl.int64)
    x = tl.load(x_ptr + t * x_stride + cols, mask=inside)
    a = tl.load(a_ptr + r * d_in + cols, mask=inside)
    tl.store(out_ptr + j.to(tl.int64) * d_in + cols, (x * a).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _combine(
    z_ptr, c_ptr, row_ptr, start_ptr, count_ptr, bias_ptr, out_ptr, d_out,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < d_out
    first = tl.load(start_ptr + t).to(tl.int64)
    count = tl.load(count_ptr + t)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, count):
        j = first + k
        r = tl.load(row_ptr + j).to(tl.int64)
        z = tl.load(z_ptr + j * d_out + cols, mask=inside, other=0.0)
        c = tl.load(c_ptr + r * d_out + cols, mask=inside, other=0.0)
        acc += z.to(tl.float32) * c.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * d_out + cols, acc.to(out_ptr.dtype.element_ty), mask=inside)


def stack(x: torch.Tensor, tok: torch.Tensor, row: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """u (M, d_in): u_j = x[tok_j] ∘ a[row_j]. x: (N, d_in) rows of unit stride; a: (rows, d_in)."""
    assert x.stride(1) == 1 and a.is_contiguous() and x.shape[1] == a.shape[1]
    m, d_in = len(tok), x.shape[1]
    out = torch.empty(m, d_in, device=x.device, dtype=x.dtype)
    block = min(1024, triton.next_power_of_2(d_in))
    _stack[(m, triton.cdiv(d_in, block))](x, x.stride(0), tok, row, a, out, d_in, BLOCK=block)
    return out


def combine(
    z: torch.Tensor, c: torch.Tensor, row: torch.Tensor, start: torch.Tensor, count: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """y (N, d_out): y_t = Σ_{k < count_t} z[start_t + k] ∘ c[row[start_t + k]] + b.
    z: (M, d_out) contiguous; c: (rows, d_out)."""
    assert z.is_contiguous() and c.is_contiguous() and z.shape[1] == c.shape[1]
    n, d_out = len(start), z.shape[1]
    out = torch.empty(n, d_out, device=z.device, dtype=z.dtype)
    block = min(1024, triton.next_power_of_2(d_out))
    has_bias = bias is not None
    _combine[(n, triton.cdiv(d_out, block))](
        z, c, row, start, count, bias if has_bias else z, out, d_out, HAS_BIAS=has_bias, BLOCK=block
    )
    return out
