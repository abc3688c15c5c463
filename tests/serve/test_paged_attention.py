"""The paged decode-attention kernel equals attention over the gathered context (Triton's
interpreter on the CPU, the GPU when there is one)."""

import pytest
import torch
from conftest import DEVICE

from loraflow.serve.paged_attention import paged_decode_attention, paged_decode_reference


@pytest.mark.parametrize("splits", [1, 2, 3, 8])  # one program a context; the context split in chunks
@pytest.mark.parametrize("heads,kv_heads,head_dim,page", [(4, 4, 16, 4), (9, 3, 64, 16), (8, 2, 32, 8)])
def test_paged_decode_equals_gathered_attention(heads, kv_heads, head_dim, page, splits):
    g = torch.Generator().manual_seed(heads)
    pages, lengths = 24, torch.tensor([1, page, 37, 5 * page + 3])
    k = torch.randn(pages * page, kv_heads, head_dim, generator=g)
    v = torch.randn(pages * page, kv_heads, head_dim, generator=g)
    table = torch.stack([torch.randperm(pages, generator=g) for _ in lengths]).int()  # scattered pages
    q = torch.randn(len(lengths), heads, head_dim, generator=g)
    args = [t.to(DEVICE) for t in (q, k, v, table, lengths)]
    out = paged_decode_attention(*args, page, splits=splits, block_n=16)
    ref = paged_decode_reference(*args, page)
    assert out.shape == (len(lengths), heads, head_dim)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # a one-token context returns that token's value, head by head
    group = heads // kv_heads
    first = v[table[0, 0].long() * page]  # (kv_heads, D)
    torch.testing.assert_close(out[0].cpu(), first.repeat_interleave(group, 0), atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernel accuracy is checked on the GPU")
def test_paged_decode_bf16_on_the_gpu():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(64, 32, 128, generator=g).cuda().bfloat16()
    k = torch.randn(4096, 32, 128, generator=g).cuda().bfloat16()
    v = torch.randn(4096, 32, 128, generator=g).cuda().bfloat16()
    table = torch.stack([torch.randperm(256, generator=g) for _ in range(64)]).int().cuda()
    lengths = torch.randint(1, 4096, (64,), generator=g).cuda()
    ref = paged_decode_reference(q, k, v, table, lengths, 16)
    for splits in (1, 4, 16):
        out = paged_decode_attention(q, k, v, table, lengths, 16, splits=splits)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
