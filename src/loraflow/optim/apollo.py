"""APOLLO and APOLLO-Mini: AdamW's learning-rate scaling coarsened to one factor per channel
(or per tensor), estimated from Adam states kept in a random projection of the gradient: no
SVD, and states of r rows instead of m (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level
Performance", MLSys 2025, arXiv 2412.05270, Algorithm 1).

For a weight gradient G (m x n), with P (r x m) Gaussian, entries N(0, 1/r), redrawn from a
stored seed every ``update_proj_gap`` steps (the side projected is GaLore's, ``projector.side``):

    R_t = P G_t                                           # (r, n): n channels
    M_t = b1 M + (1 - b1) R_t,  V_t = b2 V + (1 - b2) R_t²
    R̃_t = M̂_t / (√V̂_t + eps)
    s_j = ‖R̃_t[:, j]‖ / ‖R_t[:, j]‖   (APOLLO: per channel)   s = ‖R̃_t‖ / ‖R_t‖   (Mini: per tensor)
    G̃_t = scale · G_t diag(s)
    G̃_t ← G̃_t · γ ‖G̃_{t-1}‖ / ‖G̃_t‖   when ‖G̃_t‖ > γ ‖G̃_{t-1}‖   (norm-growth limiter, γ = 1.01)
    W  -= lr · (G̃_t + wd · W)

Parameter groups as GaLore's: those with ``rank`` (``apollo_param_groups``) get APOLLO on
their 2-D weights, every other parameter is plain AdamW. The states are plain tensors and
ints (the projection is its seed), so ``state_dict()`` loads with ``torch.load(weights_only=True)`` and a
resumed run draws the same projections.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from loraflow.modules import find_targets
from loraflow.optim import sharded
from loraflow.optim.galore import GaLoreAdamW, GaLoreAdamW8bit
from loraflow.optim.projector import side

ScaleType = Literal["channel", "tensor"]
MINI_SCALE = math.sqrt(128)  # APOLLO-Mini's default scale: rank 1 under-estimates the factor


class Apollo(GaLoreAdamW):
    """APOLLO on the groups that carry ``rank``; AdamW elsewhere. Group keys (else these
    defaults): ``rank``, ``update_proj_gap`` (200), ``scale`` (1.0), ``scale_type``
    ("channel"), ``proj_type`` ("std"), ``norm_growth_limit`` (1.01; None: off)."""

    mini = False

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        state_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype)
        self.seed = seed
        for group in self.param_groups:
            if "rank" not in group:
                continue
            if self.mini:  # APOLLO-Mini: rank 1, one factor for the whole tensor
                group["rank"] = 1
                group.setdefault("scale_type", "tensor")
                group.setdefault("scale", MINI_SCALE)
            group.setdefault("update_proj_gap", 200)
            group.setdefault("scale", 1.0)
            group.setdefault("scale_type", "channel")
            group.setdefault("norm_growth_limit", 1.01)
            if group["rank"] < 1 or group["update_proj_gap"] < 1 or not group["scale"] > 0:
                raise ValueError(
                    f"APOLLO group: rank and update_proj_gap must be >= 1 and scale > 0, got {group['rank']}, "
                    f"{group['update_proj_gap']}, {group['scale']}"
                )
            if group["scale_type"] not in ("channel", "tensor"):
                raise ValueError(f"scale_type must be 'channel' or 'tensor', got {group['scale_type']!r}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                state["step"] += 1
                here = sharded.part(p)  # under FSDP2: this process's shard
                g = here.grad.float()
                if "rank" in group and len(here.shape) == 2:
                    update = self._apollo(p, here, g, state, group, index)
                else:
                    update = self._direction(state, g, group)  # AdamW
                w = here.weight
                if group["weight_decay"]:
                    w.mul_(1 - group["lr"] * group["weight_decay"])
                w.add_(update.to(w.dtype), alpha=-group["lr"])
        return loss

    def state_shard_dim(self, state: dict, key: str, dim: int) -> int | str | None:
        """As GaLore's (``_GaLoreBase.state_shard_dim``), but the moments of a projected weight
        are R's, (r, channels): split along their channels; the norm is the whole weight's."""
        if key == "prev_norm" or "whole" in state:
            return None
        if "proj_seed" in state and key in ("exp_avg", "exp_avg_sq"):
            return 1
        return super().state_shard_dim(state, key, dim)

    def _apollo(self, p, here: sharded.Part, g: torch.Tensor, state: dict, group: dict, index: int) -> torch.Tensor:
        """scale · G diag(s), norm-limited: the update of one projected weight. Sharded
        (FSDP2), G is this process's channels: the projection and per-channel factors are
        local, the norms of the whole weight are sums over the processes; a shard along the
        other side is stepped whole (``optim/sharded.py``)."""
        which = side(here.shape, group.get("proj_type", "std"))
        if not sharded.is_local(which, here.dim):
            g, state["whole"] = p.grad.full_tensor().float(), 1
        reduce = here.group if "whole" not in state else None
        gs = g if which == "left" else g.T  # gs: (k, c): k projected away, c channels
        rank = min(group["rank"], gs.shape[0])
        if (state["step"] - 1) % group["update_proj_gap"] == 0 or "proj_seed" not in state:
            # a new projection: its seed, from the optimizer's seed, the parameter and the step
            index = group.get("param_index", index)  # per-layer updates: one optimizer a weight
            # a Python int, as "step" is: it stays on the host (a tensor would be moved to the
            # weight's device on loading, and reading it back would wait for the GPU)
            state["proj_seed"] = self.seed * 1_000_003 + index * 10_007 + state["step"]
        proj = projection(state["proj_seed"], rank, gs.shape[0], g.device)  # (r, k)
        r_t = proj @ gs  # (r, c)
        r_tilde = self._direction(state, r_t, group)  # Adam on the projection, moments updated
        if group["scale_type"] == "channel":
            s = r_tilde.norm(dim=0) / r_t.norm(dim=0).clamp_min(1e-30)  # (c,)
        else:  # ‖R̃‖ / ‖R‖ of the whole weight
            sq = sharded.all_sum(torch.stack([r_tilde.pow(2).sum(), r_t.pow(2).sum()]), reduce)
            s = sq[0].sqrt() / sq[1].sqrt().clamp_min(1e-30)
        update = group["scale"] * gs * s  # (k, c)
        limit = group["norm_growth_limit"]
        if limit:  # on the device, without a wait for it: factor = min(1, γ ‖G̃_{t-1}‖ / ‖G̃_t‖)
            norm = sharded.all_sum(update.pow(2).sum(), reduce).sqrt()
            if "prev_norm" in state:
                prev = state["prev_norm"]
                factor = torch.where(prev > 0, (limit * prev / norm).clamp(max=1.0), torch.ones_like(norm))
                update, norm = update * factor, norm * factor
            state["prev_norm"] = norm
        update = update if which == "left" else update.T
        return sharded.mine(update, here) if "whole" in state else update


class ApolloMini(Apollo):
    """APOLLO-Mini: rank 1 and one scaling factor per tensor (scale √128 by default): the
    states of a weight are two rows, SGD's memory with AdamW-like updates (Sec. 4.3)."""

    mini = True


class ApolloAdamW8bit(Apollo):
    """Apollo whose moments (and AdamW's, on the other groups) are stored in 8 bits, block-wise."""

    _moments = GaLoreAdamW8bit._moments
    _store_moments = GaLoreAdamW8bit._store_moments


def projection(seed: int, rank: int, k: int, device) -> torch.Tensor:
    """P (rank, k), entries N(0, 1/rank), drawn on ``device`` from ``seed``: the same P every
    step until the seed changes, and again after a resume on the same kind of device."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(rank, k, generator=g, device=device) / math.sqrt(rank)


def apollo_param_groups(
    model: nn.Module,
    target_modules="all-linear",
    rank: int = 256,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scale_type: ScaleType = "channel",
) -> list[dict]:
    """Two groups: the weights of the targeted linear layers (APOLLO), everything else (AdamW)."""
    chosen = {id(model.get_submodule(n).weight) for n in find_targets(model, target_modules)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {
            "params": [p for p in params if id(p) in chosen],
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "scale_type": scale_type,
        },
        {"params": [p for p in params if id(p) not in chosen]},
    ]
