"""Deep LoRA: a deep, overparameterized low-rank update that is compressed after one step
(Yaras, Wang, Balzano & Qu, "Compressible Dynamics in Deep Overparameterized Low-Rank
Learning & Adaptation", ICML 2024, arXiv 2406.04112, Sec. 3-4).

    y = W0 x + ΔW x,    ΔW = W_L ⋯ W_2 W_1,    every W_l orthogonal at init, times epsilon

Wide (before compression): W_1: (w, d_in), W_2..W_{L-1}: (w, w), W_L: (d_out, w), with
w = min(d_in, d_out). The paper shows that gradient descent from this small orthogonal init
only moves each factor inside a low-dimensional invariant subspace, fixed by the first
gradient. ``compress(model, batch)`` computes that gradient G = ∂loss/∂ΔW on one batch,
takes its top-r singular vectors U_r (d_out, r) and V_r (d_in, r), and replaces the factors
with the width-r network

    W_1 = eps · V_rᵀ,   W_l = eps · I_r,   W_L = -eps · U_r   (ΔW along -G: downhill)

which costs about as much as a rank-r LoRA. The end-to-end map stays O(eps^L) (1e-9 with
the defaults), so the model's outputs do not change. The outer factors W_1, W_L then learn
at ``gamma`` times the learning rate of the inner ones (the paper's discrepant learning
rate: the subspaces drift slowly in the wide network, and a small gamma keeps that; the
default 0.1 is loraflow's choice, not a value tuned on the paper's tasks);
``deep_lora_param_groups`` builds those optimizer groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from loraflow.adapters.validate import check_positive, check_targets


@dataclass
class DeepLoRAConfig:
    r: int = 8
    depth: int = 3
    epsilon: float = 1e-3
    gamma: float = 0.1
    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    kind: ClassVar[str] = "DEEP_LORA"

    def __post_init__(self):
        check_positive("r", self.r, integer=True)
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 2:
            raise ValueError(f"depth must be an integer >= 2 (the paper uses 3), got {self.depth!r}")
        check_positive("epsilon", self.epsilon)
        check_positive("gamma", self.gamma)
        self.target_modules = check_targets(self.target_modules)


class DeepLoRA(nn.Module):
    """One Deep LoRA adapter on one linear layer: factors W_1 .. W_L in ``self.factors``."""

    def __init__(
        self, d_in: int, d_out: int, depth: int, epsilon: float, width: int | None = None, device=None, dtype=None
    ):
        super().__init__()
        self.depth, self.epsilon = depth, epsilon
        w = min(d_in, d_out) if width is None else width
        shapes = [(w, d_in)] + [(w, w)] * (depth - 2) + [(d_out, w)]
        self.factors = nn.ParameterList()
        for shape in shapes:
            p = torch.empty(shape, device=device, dtype=torch.float32)
            nn.init.orthogonal_(p, gain=epsilon)
            self.factors.append(nn.Parameter(p.to(dtype)))

    @property
    def width(self) -> int:
        return self.factors[0].shape[0]

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {f"deep_lora.{i}.weight": p for i, p in enumerate(self.factors)}

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """y = W0 x + W_L (⋯ (W_1 x))."""
        h = x  # (..., d_in)
        for w in self.factors:
            h = F.linear(h, w)  # (..., width) ... (..., d_out)
        return base(x) + h

    def delta_weight(self) -> torch.Tensor:
        d = self.factors[0]
        for w in self.factors[1:]:
            d = w @ d
        return d  # (d_out, d_in)

    def merge_into(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 + self.delta_weight().to(w0.dtype)

    def unmerge_from(self, w: torch.Tensor) -> torch.Tensor:
        return w - self.delta_weight().to(w.dtype)

    @torch.no_grad()
    def compress_to(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """Replace the factors by the width-r network eps·U_r, eps·I, .., eps·V_rᵀ."""
        r = u.shape[1]
        ref = self.factors[0]
        eye = torch.eye(r, device=ref.device, dtype=ref.dtype)
        mats = [v.T] + [eye] * (self.depth - 2) + [u]
        grad = ref.requires_grad
        self.factors = nn.ParameterList(
            nn.Parameter((self.epsilon * m).to(ref.device, ref.dtype).contiguous(), requires_grad=grad) for m in mats
        )

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, epsilon={self.epsilon}"
