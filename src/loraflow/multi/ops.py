"""Per-row adapter ops in plain PyTorch: each row of a batch may use its own adapter.

Additive adapters (LoRA; Deep LoRA as A = W_1, B = W_L ⋯ W_2) add, for row i with slot s_i,

    Δy_i = scale_{s_i} · B_{s_i} A_{s_i} x_i          (nothing for s_i = -1: the base model)

and FLoRA adapters replace the row's output by (FLoRA, arXiv 2312.05677, Sec. 3.2)

    y_i = A ∘ ((B ∘ x_i) W0)  in the paper's notation; here (1/r) Σ_k b_k ∘ (W0 (a_k ∘ x_i)).

Every op takes x: (rows, T, d_in) (T tokens per row; packed tokens are rows of T = 1) and
slots: (rows,) long, and differentiates with autograd, so one batch can train many adapters.

- ``loop``: the reference, PEFT-style: one pass per distinct adapter over its rows.
- ``bmm``: gather each row's A and B (ranks padded to the largest), two ``torch.bmm``.
- ``segmented``: rows sorted by adapter, one pair of matmuls per contiguous segment.
- ``flora_dense``: FLoRA's one GEMM with W0 per rank term, element-wise work around it.
- ``flora_loop`` / ``flora_bmm``: the merged weight W0 ∘ M per adapter, or per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def loop(
    x: torch.Tensor,
    slots: torch.Tensor,
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    scales: Sequence[float],
    dropouts: Sequence[nn.Module] | None = None,
) -> torch.Tensor:
    """Δy for every row: one pass per adapter over the rows that chose it."""
    # x: (R, T, d_in), slots: (R,)
    y = x.new_zeros(*x.shape[:-1], B[0].shape[0]) if len(B) else x.new_zeros(x.shape)
    for i in range(len(A)):
        rows = (slots == i).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        xi = x.index_select(0, rows)  # (n_i, T, d_in)
        if dropouts is not None:
            xi = dropouts[i](xi)
        yi = scales[i] * F.linear(F.linear(xi, A[i]), B[i])  # (n_i, T, d_out)
        y = y.index_add(0, rows, yi)
    return y


def padded(A, B, scales, extra_zero: bool = True):
    """A: (n, r_max, d_in), B·scale: (n, d_out, r_max), ranks zero-padded; one zero adapter
    appended at index n for base rows when ``extra_zero``."""
    r_max = max(a.shape[0] for a in A)
    Ap = [F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a in A]
    Bp = [F.pad(s * b, (0, r_max - b.shape[1])) for b, s in zip(B, scales)]
    if extra_zero:
        Ap.append(torch.zeros_like(Ap[0]))
        Bp.append(torch.zeros_like(Bp[0]))
    return torch.stack(Ap), torch.stack(Bp)


def bmm(x: torch.Tensor, slots: torch.Tensor, A, B, scales) -> torch.Tensor:
    """Δy via gathered per-row weights and two batched matmuls (FLoRA's baseline)."""
    return bmm_padded(x, slots, *padded(A, B, scales, extra_zero=True))


def bmm_padded(x: torch.Tensor, slots: torch.Tensor, Ap: torch.Tensor, Bp: torch.Tensor) -> torch.Tensor:
    """``bmm`` on weights already stacked by ``padded`` (the last adapter all zeros)."""
    idx = torch.where(slots < 0, Ap.shape[0] - 1, slots)
    Ag, Bg = Ap[idx], Bp[idx]  # (R, r, d_in), (R, d_out, r)
    h = torch.bmm(x, Ag.transpose(1, 2))  # (R, T, r)
    return torch.bmm(h, Bg.transpose(1, 2))  # (R, T, d_out)


def segmented(
    x: torch.Tensor, slots: torch.Tensor, A, B, scales, dropouts: Sequence[nn.Module] | None = None
) -> torch.Tensor:
    """Δy with rows sorted by adapter and one pair of matmuls per segment."""
    order = torch.argsort(slots, stable=True)
    counts = torch.bincount(slots + 1, minlength=len(A) + 1).tolist()  # base rows first
    xs = x.index_select(0, order)  # (R, T, d_in), sorted
    d_out = B[0].shape[0]
    pieces = [x.new_zeros(counts[0], *x.shape[1:-1], d_out)]
    start = counts[0]
    for i, c in enumerate(counts[1:]):
        if c:
            seg = xs[start : start + c]
            if dropouts is not None:
                seg = dropouts[i](seg)
            pieces.append(scales[i] * F.linear(F.linear(seg, A[i]), B[i]))
        start += c
    ys = torch.cat(pieces)  # (R, T, d_out), sorted
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return ys.index_select(0, inverse)


def flora_stack(A, B) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA weights stacked for ``flora_dense_stacked``: A (n, r_max, d_in) and B / r
    (n, d_out, r_max), ranks padded with zero terms so mixed ranks keep their own averages."""
    r_max = max(a.shape[0] for a in A)
    Ap = torch.stack([F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a in A])
    Bp = torch.stack([F.pad(b / b.shape[1], (0, r_max - b.shape[1])) for b in B])
    return Ap, Bp


def flora_dense(x: torch.Tensor, slots: torch.Tensor, w0: torch.Tensor, A, B) -> torch.Tensor:
    """y (no bias) for rows that all use FLoRA adapters: y_i = Σ_k (b_k / r) ∘ (W0 (a_k ∘ x_i))."""
    return flora_dense_stacked(x, slots, w0, *flora_stack(A, B))


def flora_dense_stacked(
    x: torch.Tensor, slots: torch.Tensor, w0: torch.Tensor, Ap: torch.Tensor, Bp: torch.Tensor
) -> torch.Tensor:
    """``flora_dense`` on weights from ``flora_stack``: one GEMM with W0 per rank term."""
    # x: (R, T, d_in), slots: (R,) in [0, n), w0: (d_out, d_in)
    Ag, Bg = Ap[slots], Bp[slots]  # (R, r, d_in), (R, d_out, r)
    if Ap.shape[1] == 1:  # rank 1: no sum over terms
        return F.linear(x * Ag, w0) * Bg.transpose(1, 2)  # (R, T, d_out)
    xs = x.unsqueeze(2) * Ag.unsqueeze(1)  # (R, T, r, d_in)
    z = F.linear(xs, w0)  # (R, T, r, d_out): one GEMM
    return (z * Bg.transpose(1, 2).unsqueeze(1)).sum(2)  # (R, T, d_out)


def flora_loop(x: torch.Tensor, slots: torch.Tensor, w0: torch.Tensor, A, B) -> torch.Tensor:
    """Reference: each adapter's merged weight W0 ∘ (B A / r) applied to its rows."""
    y = x.new_zeros(*x.shape[:-1], w0.shape[0])
    for i in range(len(A)):
        rows = (slots == i).nonzero().squeeze(1)
        if rows.numel():
            w = w0 * (B[i] @ A[i]) / A[i].shape[0]
            y = y.index_add(0, rows, F.linear(x.index_select(0, rows), w))
    return y


def flora_bmm(x: torch.Tensor, slots: torch.Tensor, w0: torch.Tensor, A, B) -> torch.Tensor:
    """Baseline: every row's merged weight materialized, then one ``torch.bmm``."""
    m = torch.stack([(b @ a) / a.shape[0] for a, b in zip(A, B)])  # (n, d_out, d_in)
    w = w0 * m[slots]  # (R, d_out, d_in)
    return torch.bmm(x, w.transpose(1, 2))  # (R, T, d_out)
