"""The chunked linear cross-entropy equals F.cross_entropy on the full logits: losses and
gradients, with ignored targets, uneven chunks, float64 gradcheck and bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F

from loraflow.losses import linear_cross_entropy


def _inputs(n=37, d=16, v=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_equals_cross_entropy_on_full_logits(chunk):
    h, w, y = _inputs()
    weights = torch.rand(len(y))  # a per-token weighting of the losses reaches the gradients
    want = F.cross_entropy(h @ w.T, y, reduction="none")
    want_grads = torch.autograd.grad((want * weights).sum(), (h, w))
    got = linear_cross_entropy(h, w, y, chunk=chunk)
    got_grads = torch.autograd.grad((got * weights).sum(), (h, w))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert bool((got[::5] == 0).all())
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradcheck_in_float64_and_batch_shapes():
    h, w, y = _inputs(n=9, d=4, v=7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, y, chunk=4), (h, w))
    hb = torch.randn(2, 5, 4, dtype=torch.float64)
    yb = torch.randint(0, 7, (2, 5))
    got = linear_cross_entropy(hb, w.detach(), yb, chunk=3)
    assert got.shape == (2, 5)
    torch.testing.assert_close(got, F.cross_entropy((hb @ w.detach().T).transpose(1, 2), yb, reduction="none"))


def test_bf16_autocast_matches_the_models_own_head():
    h, w, y = _inputs(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(h, w).float(), y, reduction="none")
        got = linear_cross_entropy(h, w, y, chunk=10)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        linear_cross_entropy(h, w, y, chunk=0)
