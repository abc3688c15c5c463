"""GaLore's gradient projector (Zhao et al., "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", ICML 2024, arXiv 2403.03507, Sec. 4 and Algorithm 1).

For a weight gradient G (m x n) the optimizer keeps its states for R = Pᵀ G (left, m < n)
or R = G Q (right, m >= n), where P (m x r) / Q (n x r) hold the top-r singular vectors of
G, recomputed every ``update_proj_gap`` steps; the update goes back as P N or N Qᵀ, times
``scale`` (the paper's alpha).

The basis comes from one of three routines (``SvdMethod``): "full", the SVD of G (exact, the
paper's); "gram" (``galore_param_groups``' default), the top eigenvectors of the smaller Gram
matrix G Gᵀ or Gᵀ G (the same subspace, exact up to rounding, from a symmetric eigenproblem
of min(m, n)² instead of an SVD of m x n); "randomized", ``torch.svd_lowrank`` (rank + 8
columns, 2 power iterations: approximate; 2% higher perplexity in a small CPU check, whose
noise reaches 1.7%, benchmarks/NOTES-galore.md).

The basis is plain tensors in the optimizer state, so ``state_dict()`` loads with
``torch.load(..., weights_only=True)``. The routine runs in float32; if it does not converge
it is retried in float64 on the CPU, and failing that the previous basis is kept (with a
warning): never NaNs in the weights.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from loraflow.optim import sharded

ProjType = Literal["std", "reverse_std", "left", "right"]
SvdMethod = Literal["full", "gram", "randomized"]
SVD_METHODS = ("full", "gram", "randomized")


def side(shape: tuple[int, int], proj_type: ProjType) -> str:
    """ "left" (P: m x r, R = PᵀG) or "right" (Q: n x r, R = GQ): std compresses the larger side."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"proj_type must be std, reverse_std, left or right, got {proj_type!r}")


def gram_basis(x: torch.Tensor, rank: int, which: str, block: int = 512, group=None) -> torch.Tensor:
    """Top-``rank`` eigenvectors of x xᵀ (left) or xᵀ x (right), largest first: the top
    singular vectors of x (x = U S Vᵀ gives x xᵀ = U S² Uᵀ). The product is summed in float64
    over blocks of ``block`` columns (rows), so a TF32 matmul setting cannot round it and no
    whole copy of x is made; the eigenproblem runs in float32 (float64 if x is). Each vector's
    sign is fixed (its largest entry positive), so rounding-level changes of x do not flip it.
    ``group``: x is this process's shard of the gradient (rows for "right", columns for
    "left"); the Gram matrix is summed over the group's processes (``optim/sharded.py``)."""
    xs = x if which == "left" else x.T  # xs: (k, l), gram = xs xsᵀ
    gram = torch.zeros(xs.shape[0], xs.shape[0], dtype=torch.float64, device=x.device)  # (k, k)
    for j in range(0, xs.shape[1], block):
        part = xs[:, j : j + block].double()  # (k, <= block)
        gram.addmm_(part, part.T)
    sharded.all_sum(gram, group)  # Σ over the shards: the whole gradient's Gram matrix
    gram = gram.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    top = vectors[:, -rank:].flip(-1)  # (k, rank), largest first
    # An eigenvector's sign is arbitrary and eigh's flips under rounding-level changes of the
    # gradient; Adam's moments outlive a refresh in GaLore, so fix it: largest entry positive.
    biggest = top.gather(0, top.abs().argmax(0, keepdim=True))  # (1, rank)
    return top * torch.where(biggest < 0, -1.0, 1.0).to(top.dtype)


def top_singular(
    g: torch.Tensor,
    rank: int,
    which: str,
    method: SvdMethod = "full",
    previous: torch.Tensor | None = None,
    group=None,
) -> torch.Tensor:
    """Top-``rank`` left (m x r) or right (n x r) singular vectors of g, in float32.
    ``group``: g is this process's shard ("gram" only; ``gram_basis``)."""
    assert group is None or method == "gram", "a sharded gradient's basis comes from its Gram matrix"
    if method not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {method!r}")
    g = g.detach()
    for attempt in ("float32", "float64-cpu"):
        try:
            if attempt == "float64-cpu":  # (sharded: on the device, where the all-reduce runs)
                x = g.double() if group is not None else g.double().cpu()
            else:  # the Gram basis reads g in blocks: no float32 copy
                x = g if method == "gram" else g.float()
            if method == "gram":
                basis = gram_basis(x, rank, which, group=group)
            elif method == "randomized":
                u, _, v = torch.svd_lowrank(x, q=min(rank + 8, min(x.shape)), niter=2)
                basis = (u if which == "left" else v)[:, :rank]
            else:
                u, _, vh = torch.linalg.svd(x, full_matrices=False)
                basis = (u if which == "left" else vh.T)[:, :rank]
            if torch.isfinite(basis).all():
                return basis.to(g.device, torch.float32).contiguous()
        except RuntimeError:  # torch.linalg.LinAlgError: SVD did not converge
            pass
    if previous is not None:
        warnings.warn(
            "GaLore: SVD of the gradient failed; keeping the previous projection", RuntimeWarning, stacklevel=2
        )
        return previous
    raise RuntimeError(
        "GaLore: SVD of the gradient failed and there is no previous projection (is the gradient finite?)"
    )


def _compute_dtype(basis: torch.Tensor, g: torch.Tensor) -> torch.dtype:
    """16-bit weights (16-bit gradients and bases) project on the tensor cores in their own
    dtype, as galore-torch does; anything else in float32."""
    return basis.dtype if basis.dtype == g.dtype and basis.dtype in (torch.bfloat16, torch.float16) else torch.float32


def project(g: torch.Tensor, basis: torch.Tensor, which: str) -> torch.Tensor:
    """R = Pᵀ G (left) or G Q (right), returned in float32 for the optimizer's moments."""
    # g: (m, n); basis: (m, r) left or (n, r) right
    dt = _compute_dtype(basis, g)
    basis, g = basis.to(dt), g.to(dt)
    return (basis.T @ g if which == "left" else g @ basis).float()


def project_back(r: torch.Tensor, basis: torch.Tensor, which: str) -> torch.Tensor:
    """P N (left) or N Qᵀ (right): in the basis's dtype when it is 16-bit (the update then
    goes into a 16-bit weight), else float32."""
    basis = basis if basis.dtype in (torch.bfloat16, torch.float16) else basis.float()
    r = r.to(basis.dtype)
    return basis @ r if which == "left" else r @ basis.T
