"""Cross-entropy of a linear head without the whole logits matrix: the head and the loss
taken a chunk of tokens at a time, forward and backward.

For hidden states H (N, d), a head W (V, d) and targets y (N,), token i's loss is

    ℓ_i = logsumexp(W h_i) - (W h_i)[y_i]          (0 where y_i = ignore_index)

and its gradients, with p_i = softmax(W h_i) and g_i the incoming gradient of ℓ_i,

    ∂h_i = g_i (p_i - e_{y_i})ᵀ W,     ∂W = Σ_i g_i (p_i - e_{y_i}) h_iᵀ

A model's last step usually builds the (N, V) logits in float32 (a 4,096-token batch with
LLaMA-3's 128,256-word vocabulary: 2.1 GB, and as much again for their gradient); here at
most ``chunk`` rows of them exist at a time, and the backward pass recomputes each chunk's
logits (one more head GEMM) instead of keeping them.
"""

from __future__ import annotations

import torch


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 4096, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token losses ℓ (N,) of ``hidden`` (..., d) through ``weight`` (V, d) against
    ``targets`` (...); equal to ``F.cross_entropy(hidden @ weight.T, targets, reduction="none")``
    with the logits in float32."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
    return _LinearCrossEntropy.apply(h, weight, targets.reshape(-1), chunk, ignore_index).view(shape)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, y, chunk: int, ignore_index: int):
        # h: (N, d), w: (V, d), y: (N,)
        dtype = _mm_dtype(h, w)
        acc = torch.promote_types(dtype, torch.float32)  # logits and their softmax: float32 at least
        losses = torch.empty(len(h), dtype=acc, device=h.device)
        for s in range(0, len(h), chunk):
            logits = (h[s : s + chunk].to(dtype) @ w.to(dtype).T).to(acc)  # (c, V)
            yc = y[s : s + chunk]
            keep = yc != ignore_index
            picked = logits.gather(1, yc.clamp(min=0).unsqueeze(1)).squeeze(1)  # (c,)
            losses[s : s + chunk] = torch.where(keep, logits.logsumexp(-1) - picked, 0.0)
        ctx.save_for_backward(h, w, y)
        ctx.chunk, ctx.ignore_index, ctx.dtype = chunk, ignore_index, dtype
        return losses

    @staticmethod
    def backward(ctx, g):
        h, w, y = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        acc = torch.promote_types(dtype, torch.float32)
        wd = w.to(dtype)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if ctx.needs_input_grad[1] else None
        for s in range(0, len(h), chunk):
            hc, yc = h[s : s + chunk].to(dtype), y[s : s + chunk]
            keep = yc != ctx.ignore_index
            dlogits = (hc @ wd.T).to(acc).softmax(-1)  # (c, V): p
            dlogits[torch.arange(len(yc), device=yc.device), yc.clamp(min=0)] -= 1.0  # p - e_y
            dlogits *= torch.where(keep, g[s : s + chunk].to(acc), 0.0).unsqueeze(1)
            if grad_h is not None:
                grad_h[s : s + chunk] = (dlogits.to(dtype) @ wd).to(h.dtype)
            if grad_w is not None:
                grad_w += (dlogits.to(dtype).T @ hc).to(acc)
        return grad_h, grad_w.to(w.dtype) if grad_w is not None else None, None, None, None


def _mm_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on (the head's GEMM runs in it, as in the model), else
    the inputs' common dtype."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(h.dtype, w.dtype)
