"""FLoRA: multiplicative low-rank adapters (Wen & Chaudhuri, "Batched Low-Rank Adaptation of
Foundation Models", ICLR 2024, arXiv 2312.05677, Sec. 3).

The adapted weight is the base weight scaled element-wise by a rank-r matrix whose rank
terms are averaged:

    W = W0 ∘ M,   M = (1/r) B A = (1/r) Σ_k b_k a_kᵀ,      A: (r, d_in), B: (d_out, r)

so that the layer needs one dense product with W0 per rank term and element-wise work:

    y = W x = (1/r) Σ_k b_k ∘ (W0 (a_k ∘ x))

(The paper writes row vectors, y = A ∘ ((B ∘ x) W0): there B scales the input and A the
output. Here, in PyTorch's (d_out, d_in) orientation, A scales the input and B the output,
so the shapes match LoRA's lora_A / lora_B.)

Initialised with B = 1 and A = 1 + noise, the noise centred over the r terms so that M is
exactly all ones: a new adapter equals the base model, and the r terms are not identical
(identical terms would get identical gradients and never separate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from loraflow.adapters.validate import check_positive, check_targets
from loraflow.modules import base_weight


@dataclass
class FLoRAConfig:
    r: int = 1
    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Standard deviation of the centred noise on A at init; 0 makes all rank terms equal.
    init_noise: float = 0.02
    rank_pattern: dict[str, int] = field(default_factory=dict)

    kind: ClassVar[str] = "FLORA"

    def __post_init__(self):
        check_positive("r", self.r, integer=True)
        if self.init_noise < 0:
            raise ValueError(f"init_noise must be >= 0, got {self.init_noise}")
        self.target_modules = check_targets(self.target_modules)
        for key, r in self.rank_pattern.items():
            check_positive(f"rank_pattern[{key!r}]", r, integer=True)


class FLoRA(nn.Module):
    """One FLoRA adapter on one linear layer."""

    # |M| below this cannot be divided out again exactly, so such a merge is refused.
    MIN_MERGE_SCALE: ClassVar[float] = 1e-4

    def __init__(self, d_in: int, d_out: int, r: int, init_noise: float = 0.02, device=None, dtype=None):
        super().__init__()
        self.r = r
        noise = torch.randn(r, d_in, device=device, dtype=torch.float32) * init_noise
        noise = noise - noise.mean(0, keepdim=True)  # Σ_k noise_k = 0, so (1/r) B A = 1
        self.A = nn.Parameter((1.0 + noise).to(dtype))
        self.B = nn.Parameter(torch.ones(d_out, r, device=device, dtype=dtype))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"flora_A.weight": self.A, "flora_B.weight": self.B}

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """y = (1/r) Σ_k b_k ∘ (W0 (a_k ∘ x)) + bias."""
        w0 = base_weight(base)
        if torch.is_grad_enabled() and not w0.requires_grad and (self.A.requires_grad or self.B.requires_grad):
            # training: r-fold activations not kept; one GEMM with W0 ∘ M instead of r, unless the
            # weight-sized element-wise work outweighs the token-sized one (rank 1, a few tokens)
            d_out, d_in = w0.shape
            dense = self.r > 1 or x.numel() // d_in * (d_in + d_out) > d_in * d_out
            y = (FLoRAWeight if dense else FLoRAProducts).apply(x, self.A, self.B, w0)
        else:
            y = flora_products(x, self.A, self.B, w0)
        return y if base.bias is None else y + base.bias

    def multiplier(self) -> torch.Tensor:
        return (self.B @ self.A) / self.r  # M: (d_out, d_in)

    def merge_into(self, w0: torch.Tensor) -> torch.Tensor:
        m = self.multiplier()
        if m.abs().min() < self.MIN_MERGE_SCALE:
            raise ValueError(
                "this FLoRA adapter scales some weights by ~0, so merging it could not be undone "
                "(unmerge divides by the multiplier); keep it unmerged"
            )
        return w0 * m.to(w0.dtype)

    def unmerge_from(self, w: torch.Tensor) -> torch.Tensor:
        return w / self.multiplier().to(w.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}"


def flora_products(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """(1/r) Σ_k b_k ∘ (W0 (a_k ∘ x)), without the bias."""
    # x: (..., d_in), a: (r, d_in), b: (d_out, r), w0: (d_out, d_in)
    xs = x.unsqueeze(-2) * a  # (..., r, d_in)
    z = F.linear(xs, w0)  # (..., r, d_out)
    return (z * b.T).mean(-2)  # (..., d_out)


class FLoRAProducts(torch.autograd.Function):
    """``flora_products`` for training with a frozen W0, keeping only x, A and B for the backward
    pass: autograd would keep the r products z_k = W0 (a_k ∘ x), r times a layer's output per
    token (rank 8 on every linear layer of SmolLM2, ten runs sharing an H200: out of memory). Backward
    recomputes them (one more r-row GEMM) for B's gradient:

        g_z = g ∘ b_k / r,   ∂x = Σ_k a_k ∘ (W0ᵀ g_z),   ∂A_k = Σ_t x ∘ (W0ᵀ g_z),   ∂B_k = Σ_t g ∘ z_k / r

    Under autocast the products run in the autocast dtype, as plain autograd would run them."""

    @staticmethod
    def forward(ctx, x, a, b, w0):
        device = x.device.type
        ctx.mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.save_for_backward(x, a, b, w0)
        return flora_products(x, a, b, w0)

    @staticmethod
    def backward(ctx, g):
        x, a, b, w0 = ctx.saved_tensors
        dtype = ctx.mm_dtype or torch.promote_types(torch.promote_types(x.dtype, a.dtype), w0.dtype)
        r, d_in = a.shape
        gz = g.unsqueeze(-2) * (b.T / r)  # (..., r, d_out)
        gxs = (gz.to(dtype) @ w0.to(dtype)).to(gz.dtype)  # (..., r, d_in): W0ᵀ g_z
        grad_x = (gxs * a).sum(-2).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_a = (gxs * x.unsqueeze(-2)).reshape(-1, r, d_in).sum(0).to(a.dtype) if ctx.needs_input_grad[1] else None
        grad_b = None
        if ctx.needs_input_grad[2]:
            xs = (x.unsqueeze(-2) * a).to(dtype)  # (..., r, d_in)
            z = (xs @ w0.to(dtype).T).to(gz.dtype)  # (..., r, d_out): recomputed
            grad_b = (g.unsqueeze(-2) * z / r).reshape(-1, r, z.shape[-1]).sum(0).T.to(b.dtype)  # (d_out, r)
        return grad_x, grad_a, grad_b, None


class FLoRAWeight(torch.autograd.Function):
    """The same layer for training at rank r > 1 with a frozen W0, through the materialised
    weight W = W0 ∘ M, M = (1/r) B A: one GEMM a pass instead of r (``FLoRAProducts`` runs r
    products with W0 forward and 2r backward; this runs 1 and 2, plus element-wise work on
    the (d_out, d_in) weight, small against the GEMMs once a batch has more than a few tokens):

        y = W x,   ∂x = Wᵀ g,   G_W = Σ_t g_t x_tᵀ,   G_M = G_W ∘ W0,
        ∂B = G_M Aᵀ / r,   ∂A = Bᵀ G_M / r

    Keeps x, A and B for the backward pass (W is recomputed), as ``FLoRAProducts`` does."""

    @staticmethod
    def forward(ctx, x, a, b, w0):
        device = x.device.type
        ctx.mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.save_for_backward(x, a, b, w0)
        dtype = ctx.mm_dtype or torch.promote_types(torch.promote_types(x.dtype, a.dtype), w0.dtype)
        return F.linear(x.to(dtype), _weight(a, b, w0, dtype))  # (..., d_out)

    @staticmethod
    def backward(ctx, g):
        x, a, b, w0 = ctx.saved_tensors
        dtype = ctx.mm_dtype or torch.promote_types(torch.promote_types(x.dtype, a.dtype), w0.dtype)
        r, d_in = a.shape
        g2, x2 = g.reshape(-1, g.shape[-1]).to(dtype), x.reshape(-1, d_in).to(dtype)  # (T, d_out), (T, d_in)
        grad_x = (g2 @ _weight(a, b, w0, dtype)).view(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_a = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            acc = torch.promote_types(dtype, torch.float32)  # the small products: float32 at least
            gm = (g2.T @ x2).to(acc) * w0.to(acc)  # (d_out, d_in): ∂L/∂M
            grad_a = (b.to(acc).T @ gm / r).to(a.dtype) if ctx.needs_input_grad[1] else None  # (r, d_in)
            grad_b = (gm @ a.to(acc).T / r).to(b.dtype) if ctx.needs_input_grad[2] else None  # (d_out, r)
        return grad_x, grad_a, grad_b, None


def _weight(a: torch.Tensor, b: torch.Tensor, w0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W0 ∘ (B A / r) in ``dtype`` (formed in float32 at least): (d_out, d_in)."""
    acc = torch.promote_types(dtype, torch.float32)
    return (w0.to(acc) * (b.to(acc) @ a.to(acc)) / a.shape[0]).to(dtype)
