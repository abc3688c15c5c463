"""LoRA: additive low-rank adapters (Hu et al., 2021, arXiv 2106.09685), PEFT-compatible.

    y = W0 x + s · B A x,      A: (r, d_in), B: (d_out, r),   s = alpha / r
                                                    (rsLoRA, arXiv 2312.03732: alpha / sqrt(r))

Initialised as PEFT does: A Kaiming-uniform, B zero, so a new adapter leaves the model
unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from loraflow.adapters.validate import check_positive, check_targets


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 8.0
    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = 0.0
    use_rslora: bool = False
    # Per-module overrides, keyed like PEFT's: a key matches the end of a module name.
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    kind: ClassVar[str] = "LORA"

    def __post_init__(self):
        check_positive("r", self.r, integer=True)
        check_positive("alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.target_modules = check_targets(self.target_modules)
        for key, r in self.rank_pattern.items():
            check_positive(f"rank_pattern[{key!r}]", r, integer=True)
        for key, a in self.alpha_pattern.items():
            check_positive(f"alpha_pattern[{key!r}]", a)


class LoRA(nn.Module):
    """One LoRA adapter on one linear layer."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.A = nn.Parameter(torch.empty(r, d_in, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(d_out, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters by their key suffix in PEFT's adapter file."""
        return {"lora_A.weight": self.A, "lora_B.weight": self.B}

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """y = W0 x + s · B (A dropout(x))."""
        # x: (..., d_in)
        h = F.linear(self.dropout(x), self.A)  # (..., r)
        return base(x) + self.scale * F.linear(h, self.B)  # (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)  # (d_out, d_in)

    def merge_into(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 + self.delta_weight().to(w0.dtype)

    def unmerge_from(self, w: torch.Tensor) -> torch.Tensor:
        return w - self.delta_weight().to(w.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}"
