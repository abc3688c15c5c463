"""The fused FLoRA GEMM against its formula in float64 (CPU: TRITON_INTERPRET=1)."""

import pytest
import torch
from conftest import DEVICE

from loraflow.multi.triton_flora_gemm import flora_gemm

DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


def reference(x, weight, tok, row, start, count, a, c, bias):
    """y_t = Σ_{k < count_t} c[row_j] ∘ (W0 (a[row_j] ∘ x[tok_j])) + b, j = start_t + k, in float64."""
    x, weight, a, c = (t.double() for t in (x, weight, a, c))
    y = torch.zeros(len(start), weight.shape[0], dtype=torch.float64, device=x.device)
    for t in range(len(start)):
        for j in range(int(start[t]), int(start[t] + count[t])):
            y[t] += c[row[j]] * (weight @ (a[row[j]] * x[tok[j]]))
    return y if bias is None else y + bias.double()


def batch(counts, d_in, d_out, rows, dtype, gap_after=None, seed=0):
    """Token-major rows (``counts[t]`` of them for token t), one unowned row after token ``gap_after``."""
    g = torch.Generator().manual_seed(seed)
    n = len(counts)
    start, tok, j = [], [], 0
    for t, k in enumerate(counts):
        start.append(j)
        tok += [t] * k
        j += k
        if t == gap_after:
            tok.append(0)  # a row that no token owns: must not count
            j += 1
    row = torch.randint(0, rows, (len(tok),), generator=g)
    x = torch.randn(n, 2 * d_in, generator=g)[:, :d_in]  # a strided view, as the layers' inputs may be
    weight = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    a = 1 + 0.3 * torch.randn(rows, d_in, generator=g)
    c = 1 + 0.3 * torch.randn(rows, d_out, generator=g)
    bias = torch.randn(d_out, generator=g)

    index = (torch.tensor(tok), row, torch.tensor(start), torch.tensor(counts))
    return (*(t.to(DEVICE, dtype) for t in (x, weight)), *(t.to(DEVICE) for t in index),
            *(t.to(DEVICE, dtype) for t in (a, c, bias)))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "counts, d_in, d_out, gap_after",
    [
        ([2, 0, 3, 1, 4, 4, 0, 1, 2], 100, 70, 3),  # mixed ranks, tokens with no rows, an unowned row
        ([0, 1, 1, 1, 1], 96, 72, None),  # one row a token (the additive / base case), a first token of none
        ([3, 3, 3, 3, 3, 3, 3], 100, 72, None),  # every token of rank 3
    ],
)
def test_flora_gemm_equals_its_formula(dtype, counts, d_in, d_out, gap_after):
    x, weight, tok, row, start, count, a, c, bias = batch(counts, d_in, d_out, 11, dtype, gap_after)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for b in (None, bias):
        want = reference(x, weight, tok, row, start, count, a, c, b)
        y = flora_gemm(x, weight, tok, row, start, count, a, c, b)
        assert y.dtype == dtype and y.shape == want.shape
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
        for t in (t for t, k in enumerate(counts) if k == 0):  # exactly the bias (or zero)
            assert torch.equal(y[t], torch.zeros_like(y[t]) if b is None else b)


@pytest.mark.parametrize(
    "r_cap, config",
    [
        (1, (16, 16, 16, 1, 1)),  # a block's rows in several chunks of BLOCK_M, each K and d_out tile a tail
        (4, (16, 32, 64, 1, 1)),  # 4 tokens a block: 9 tokens end in a partial block
        (8, (64, 64, 128, 4, 1)),  # blocks wider than d_in and d_out, 8 tokens a block
    ],
)
def test_tilings_agree(r_cap, config):
    """Any tiling and any ``r_cap`` hint (too small or too large) gives the same y."""
    x, weight, tok, row, start, count, a, c, bias = batch([2, 0, 3, 1, 4, 4, 0, 1, 2], 100, 70, 11, torch.float32, 4)
    want = reference(x, weight, tok, row, start, count, a, c, bias)
    y = flora_gemm(x, weight, tok, row, start, count, a, c, bias, r_cap=r_cap, config=config)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)


def test_no_rows_at_all_gives_the_bias():
    x, weight, tok, row, start, count, a, c, bias = batch([0, 0, 0], 96, 72, 4, torch.float32)
    y = flora_gemm(x, weight, tok, row, start, count, a, c, bias)
    torch.testing.assert_close(y, bias.expand(3, -1))
