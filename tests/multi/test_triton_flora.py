"""The FLoRA prologue and epilogue kernels against their formulas (CPU: TRITON_INTERPRET=1)."""

import pytest
import torch
from conftest import DEVICE

from loraflow.multi import triton_flora


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32])
def test_stack_and_combine_equal_their_formulas(dtype):
    """u_j = x[tok_j] ∘ a[row_j]; y_t = Σ_{k < count_t} z[start_t + k] ∘ c[row[start_t + k]] + b,
    on widths that are not powers of two nor multiples of the block, a token of no rows
    (bias alone), rows that no token owns, and x a strided view."""
    torch.manual_seed(0)
    d_in, d_out, rows = 1100, 37, 9
    x = torch.randn(5, 2 * d_in, device=DEVICE, dtype=dtype)[:, :d_in]  # row stride 2 · d_in
    a = torch.randn(rows, d_in, device=DEVICE, dtype=dtype)
    c = torch.randn(rows, d_out, device=DEVICE, dtype=dtype)
    tok = torch.tensor([0, 1, 1, 1, 2, 4, 4, 0, 0], device=DEVICE)
    row = torch.tensor([8, 0, 3, 5, 8, 2, 7, 1, 1], device=DEVICE)
    start = torch.tensor([0, 1, 4, 5, 5], device=DEVICE)
    count = torch.tensor([1, 3, 1, 0, 2], device=DEVICE)  # token 3 owns no row; rows 7, 8 no token's
    u = triton_flora.stack(x, tok, row, a)
    torch.testing.assert_close(u, x[tok] * a[row])
    z = torch.randn(len(tok), d_out, device=DEVICE, dtype=dtype)
    bias = torch.randn(d_out, device=DEVICE, dtype=dtype)
    for b in (None, bias):
        y = triton_flora.combine(z, c, row, start, count, b)
        want = torch.zeros(5, d_out, device=DEVICE, dtype=torch.float64)
        for t in range(5):
            for j in range(start[t], start[t] + count[t]):
                want[t] += z[j].double() * c[row[j]].double()
        if b is not None:
            want += b.double()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
        assert y.dtype == dtype
