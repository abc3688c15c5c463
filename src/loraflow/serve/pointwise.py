"""The decoder's element-wise work, written once in PyTorch and, on CUDA, fused by
``torch.compile`` into one kernel each.

A decode step of 64 tokens spends little time per element-wise op but runs many of them:
in eager PyTorch an RMSNorm is five kernels (cast, square, mean, rsqrt, scale), rotary
embeddings four a tensor, SwiGLU two; on an H200 a Llama-2-7B step of 64 sequences spent
2.7 ms of its 11 ms replay in such kernels (``benchmarks/NOTES-serve.md``, session 11).
Each function below becomes one fused kernel, so a block runs four of them:

    n = RMSNorm(x)                              rms_norm
    h = x + a,  n = RMSNorm(h)                  add_rms_norm
    q, k = rope(q), rope(k)                     rope_qk
    s = silu(g) ∘ u                             silu_mul

with RMSNorm(x) = w ∘ x / √(mean(x²) + ε) in float32 and rope(x) = x cos θ + rot(x) sin θ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: (N, dim)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float):
    """(h, RMSNorm(h)) for h = x + a: the residual and the next sub-layer's input."""
    h = x + a
    return h, rms_norm(h, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (N, heads, head_dim); cos, sin: (N, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return rope(q, cos, sin), rope(k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclass(frozen=True)
class Pointwise:
    """The functions a forward calls: eager, or each compiled into one fused kernel."""

    rms_norm: Callable
    add_rms_norm: Callable
    rope_qk: Callable
    silu_mul: Callable

    @staticmethod
    def make(compiled: bool) -> Pointwise:
        """``compiled``: through ``torch.compile`` (CUDA; shapes dynamic, so every decode
        bucket and prefill size shares one compilation), else the functions as written."""
        fns = (rms_norm, add_rms_norm, rope_qk, silu_mul)
        if compiled:
            fns = tuple(torch.compile(f, dynamic=True, fullgraph=True) for f in fns)
        return Pointwise(*fns)


EAGER = Pointwise.make(False)
