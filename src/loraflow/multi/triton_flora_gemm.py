"""One Triton kernel for the whole FLoRA layer at inference: prologue, GEMM and epilogue fused.

A FLoRA adapter of rank r (Wen & Chaudhuri, ICLR 2024, §3) turns W0 into W0 ∘ (C A), so

    y_t = Σ_k c_k ∘ (W0 (a_k ∘ x_t)) + b

``triton_flora`` computes this in three launches (``stack``, cuBLAS's GEMM, ``combine``);
``flora_gemm`` does it in one, with the same inputs: token t owns the ``count[t]`` contiguous
stacked rows from ``start[t]``; stacked row j scales x[tok_j] by a[row_j] and its output by c[row_j].

Each program owns a block of d_out columns (BLOCK_N) and a block of BLOCK_T tokens, whose rows
lie in [lo, hi) (the smallest start and the largest end of its tokens that own rows). It walks
that range in chunks of BLOCK_M rows (BLOCK_T = BLOCK_M // R_CAP: one chunk when the rows are
packed and no token has more than R_CAP): for each chunk, a loop over d_in gathers x[tok_j] and a[row_j],
multiplies them (rounded to the input dtype, as ``stack`` does) and ``tl.dot``s them with the W0
tile into an fp32 accumulator z (BLOCK_M × BLOCK_N); the epilogue scales z by the gathered
c[row_j] and sums rows into tokens with y += S z, where S[t, j] = 1 iff start_t <= j < start_t +
count_t (an fp32 ``tl.dot``: tf32 inputs for 16-bit x, IEEE for fp32). The bias is added once, the tile
stored in x's dtype.

Rows of a chunk that no token of the block owns contribute nothing, so any layout is correct;
R_CAP only sets how many tokens share a chunk (how often W0 tiles are read). Inference only;
on CPU tensors (``TRITON_INTERPRET=1``) a fixed tiling is used, on CUDA ``triton.autotune``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INT_MAX = tl.constexpr(2**31 - 1)


@triton.jit
def _flora_gemm_kernel(
    x_ptr, w_ptr, tok_ptr, row_ptr, start_ptr, count_ptr, a_ptr, c_ptr, bias_ptr, out_ptr,
    N, d_in, d_out, sx, sw, sa, sc,
    R_CAP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr, T_PAD: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)  # fastest: the token blocks that share a W0 tile run side by side
    pid_n = tl.program_id(1)
    ti = tl.arange(0, T_PAD)
    tokens = pid_t * BLOCK_T + ti
    tmask = (ti < BLOCK_T) & (tokens < N)
    first = tl.load(start_ptr + tokens, mask=tmask, other=0).to(tl.int32)
    count = tl.load(count_ptr + tokens, mask=tmask, other=0).to(tl.int32)
    owns = tmask & (count > 0)
    end = first + count
    lo = tl.min(tl.where(owns, first, _INT_MAX), axis=0)
    hi = tl.max(tl.where(owns, end, 0), axis=0)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < d_out
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * sw  # W0 is (d_out, d_in): B[k, n] = W0[n, k]
    offs_k = tl.arange(0, BLOCK_K)
    y = tl.zeros([T_PAD, BLOCK_N], dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < hi
        tk = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
        rw = tl.load(row_ptr + rows, mask=rmask, other=0).to(tl.int64)
        x_rows = x_ptr + tk[:, None] * sx
        a_rows = a_ptr + rw[:, None] * sa
        z = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < d_in
            umask = rmask[:, None] & kmask[None, :]
            xv = tl.load(x_rows + kk[None, :], mask=umask, other=0.0)
            av = tl.load(a_rows + kk[None, :], mask=umask, other=0.0)
            u = (xv.to(tl.float32) * av.to(tl.float32)).to(w_ptr.dtype.element_ty)
            wv = tl.load(w_cols + kk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
            if IEEE:
                z = tl.dot(u, wv, z, input_precision="ieee")
            else:
                z = tl.dot(u, wv, z)
        cv = tl.load(c_ptr + rw[:, None] * sc + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        z = z * cv.to(tl.float32)
        s = (rows[None, :] >= first[:, None]) & (rows[None, :] < end[:, None]) & owns[:, None]
        if IEEE:
            y = tl.dot(s.to(tl.float32), z, y, input_precision="ieee")
        else:  # z rounded to tf32 (11 bits), finer than the bf16 z of the three-launch path
            y = tl.dot(s.to(tl.float32), z, y, input_precision="tf32")
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    optrs = out_ptr + tokens.to(tl.int64)[:, None] * d_out + cols[None, :]
    tl.store(optrs, y.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


def _tokens_per_block(meta) -> int:
    return max(1, meta["BLOCK_M"] // meta["R_CAP"])


def _tokens_padded(meta) -> int:  # tl.dot's operands are at least 16 rows
    return max(16, _tokens_per_block(meta))


_kernel = triton.heuristics({"BLOCK_T": _tokens_per_block, "T_PAD": _tokens_padded})(_flora_gemm_kernel)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): few enough that tuning a shape takes seconds
CONFIGS = [
    (64, 64, 128, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (32, 64, 128, 4, 4),
    (64, 32, 128, 4, 5),
    (128, 32, 128, 4, 4),
    (256, 64, 64, 8, 3),
]
CPU_CONFIG = (32, 32, 32, 4, 1)


def _fitting(configs, named_args, **kwargs):
    """Drop the configs whose BLOCK_M exceeds the rows of all N tokens (BLOCK_M wasted on masked rows)."""
    rows = max(32, triton.next_power_of_2(named_args["N"] * kwargs["R_CAP"]))
    kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_M"] <= rows]
    return kept or [min(configs, key=lambda cfg: cfg.kwargs["BLOCK_M"])]


_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in CONFIGS
    ],
    key=["N", "d_in", "d_out", "R_CAP", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _fitting},
)(_kernel)


def flora_gemm(
    x: torch.Tensor, weight: torch.Tensor, tok: torch.Tensor, row: torch.Tensor, start: torch.Tensor,
    count: torch.Tensor, a: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None = None,
    r_cap: int | None = None, config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """y (N, d_out): y_t = Σ_{k < count_t} (W0 (x[tok_j] ∘ a[row_j])) ∘ c[row_j] + b, j = start_t + k.

    Equals ``combine(F.linear(stack(x, tok, row, a), weight), c, row, start, count, bias)`` of
    ``triton_flora`` (there z is rounded to x's dtype before the epilogue, here not).
    x: (N, d_in) of unit column stride; weight: (d_out, d_in); a: (rows, d_in); c: (rows, d_out);
    tok, row: (M,); start, count: (N,); bias: (d_out,) or None. ``r_cap``: the most rows a token
    has (a hint, rounded up to a power of two; by default ceil(M / N), which needs no sync);
    ``config``: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) instead of autotuning on CUDA.
    """
    n, d_in = x.shape
    d_out = weight.shape[0]
    assert weight.shape[1] == d_in and a.shape[1] == d_in and c.shape[1] == d_out
    assert x.stride(1) == 1 and weight.stride(1) == 1 and a.stride(1) == 1 and c.stride(1) == 1
    assert weight.dtype == x.dtype and len(start) == len(count) == n and len(tok) == len(row)
    out = torch.empty(n, d_out, device=x.device, dtype=x.dtype)
    if n == 0 or d_out == 0:
        return out
    m = len(tok)
    if r_cap is None:
        r_cap = -(-m // n) if m else 1
    r_cap = triton.next_power_of_2(max(1, r_cap))
    has_bias = bias is not None
    if has_bias:
        assert bias.shape == (d_out,) and bias.is_contiguous()
    args = (
        x, weight, tok, row, start, count, a, c, bias if has_bias else out, out,
        n, d_in, d_out, x.stride(0), weight.stride(0), a.stride(0), c.stride(0),
    )  # fmt: skip
    consts = {"R_CAP": r_cap, "HAS_BIAS": has_bias, "IEEE": x.dtype == torch.float32}

    def grid(meta):
        return (triton.cdiv(n, _tokens_per_block(meta)), triton.cdiv(d_out, meta["BLOCK_N"]))

    if config is None and x.is_cuda:
        _tuned[grid](*args, **consts)
    else:
        bm, bn, bk, warps, stages = config or CPU_CONFIG
        _kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out
