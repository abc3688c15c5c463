"""GaLore's gradient projector (Zhao et al., "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", ICML 2024, arXiv 2403.03507, Sec. 4 and Algorithm 1).

For a weight gradient G (m x n) the optimizer keeps its states for R = Pᵀ G (left, m < n)
or R = G Q (right, m >= n), where P (m x r) / Q (n x r) hold the top-r singular vectors of
G, recomputed every ``update_proj_gap`` steps; the update goes back as P N or N Qᵀ, times
``scale`` (the paper's alpha).

The basis is plain tensors in the optimizer state, so ``state_dict()`` loads with
``torch.load(..., weights_only=True)``. SVD runs in float32; if it does not converge it is
retried in float64 on the CPU, and failing that the previous basis is kept (with a warning):
never NaNs in the weights.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

ProjType = Literal["std", "reverse_std", "left", "right"]


def side(shape: tuple[int, int], proj_type: ProjType) -> str:
    """"left" (P: m x r, R = PᵀG) or "right" (Q: n x r, R = GQ): std compresses the larger side."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"proj_type must be std, reverse_std, left or right, got {proj_type!r}")


def top_singular(g: torch.Tensor, rank: int, which: str, randomized: bool = False,
                 previous: torch.Tensor | None = None) -> torch.Tensor:
    """Top-``rank`` left (m x r) or right (n x r) singular vectors of g, in float32."""
    g32 = g.detach().float()
    for attempt in ("float32", "float64-cpu"):
        try:
            x = g32 if attempt == "float32" else g32.double().cpu()
            if randomized:
                u, _, v = torch.svd_lowrank(x, q=min(rank + 8, min(x.shape)), niter=2)
            else:
                u, _, vh = torch.linalg.svd(x, full_matrices=False)
                v = vh.T
            basis = (u if which == "left" else v)[:, :rank]
            if torch.isfinite(basis).all():
                return basis.to(g.device, torch.float32).contiguous()
        except RuntimeError:        # torch.linalg.LinAlgError: SVD did not converge
            pass
    if previous is not None:
        warnings.warn("GaLore: SVD of the gradient failed; keeping the previous projection", RuntimeWarning)
        return previous
    raise RuntimeError("GaLore: SVD of the gradient failed and there is no previous projection "
                       "(is the gradient finite?)")


def project(g: torch.Tensor, basis: torch.Tensor, which: str) -> torch.Tensor:
    """R = Pᵀ G (left) or G Q (right), in float32 (the basis may be stored in 16 bits)."""
    # g: (m, n); basis: (m, r) left or (n, r) right
    basis = basis.float()
    return basis.T @ g.float() if which == "left" else g.float() @ basis


def project_back(r: torch.Tensor, basis: torch.Tensor, which: str) -> torch.Tensor:
    basis = basis.float()
    return basis @ r if which == "left" else r @ basis.T
