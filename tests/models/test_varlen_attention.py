"""The packed attention against dense SDPA with a block-diagonal causal mask: on the CPU its
row-by-row form, on CUDA PyTorch's FlashAttention varlen kernel (forward and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from loraflow.models.varlen_attention import _flash_varlen, _rows_sdpa

LENGTHS = [7, 1, 33, 16]
H, H_KV, D = 6, 2, 32


def _inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    t = sum(LENGTHS)
    q, k, v = (torch.randn(t, h, D, generator=g).to(device, dtype) for h in (H, H_KV, H_KV))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def _dense(q, k, v, scale):
    """Every token against every token, masked to its own row and the past: the definition."""
    row = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS)).to(q.device)
    pos = torch.arange(len(row), device=q.device)
    mask = (row[:, None] == row[None, :]) & (pos[:, None] >= pos[None, :])  # (T, T)
    out = F.scaled_dot_product_attention(
        *(x.transpose(0, 1).float() for x in (q, k, v)), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1)  # (T, H, D)


def test_rows_equal_the_block_diagonal_mask():
    q, k, v, cu = _inputs("cpu", torch.float32)
    torch.testing.assert_close(_rows_sdpa(q, k, v, cu, 0.3), _dense(q, k, v, 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's varlen kernel needs CUDA")
def test_flash_varlen_equals_the_block_diagonal_mask_with_gradients():
    q, k, v, cu = (x.requires_grad_() if x.is_floating_point() else x for x in _inputs("cuda", torch.bfloat16))
    scale = D**-0.5
    got = _flash_varlen(q, k, v, cu, max(LENGTHS), scale)
    g = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (q, k, v), g)
    want = _dense(q, k, v, scale)
    want_grads = torch.autograd.grad(want, (q, k, v), g.float())
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)
