"""GaLore optimizers: Adam (or SGD) whose states live in a rank-r projection of each
weight's gradient (Zhao et al., ICML 2024, arXiv 2403.03507, Algorithm 2).

Drop-in for galore-torch: parameter groups with a ``rank`` key (and ``update_proj_gap``,
``scale``, ``proj_type``) are GaLore groups, their 2-D parameters are projected; every
other group is plain AdamW (or SGD).

    R_t = project(G_t)                     # (m x r) or (r x n), basis from SVD(G) every T steps
    M_t = b1 M + (1 - b1) R_t,  V_t = b2 V + (1 - b2) R_t²
    W  -= lr · (scale · project_back(M̂_t / (√V̂_t + eps)) + wd · W)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from loraflow.modules import find_targets
from loraflow.optim import quant8, sharded

try:
    from loraflow.optim import adam8bit_triton
except ImportError:  # no Triton: the PyTorch path
    adam8bit_triton = None
from loraflow.optim.projector import SVD_METHODS, SvdMethod, project, project_back, side, top_singular

GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")


def basis_dtype(p: torch.Tensor) -> torch.dtype:
    """The stored basis follows a 16-bit weight's dtype (as galore-torch's does: at 7B, rank
    1024, float32 bases would take 3.8 GB, bfloat16 1.9 GB); the projections themselves run
    in float32. Float32 weights keep float32 bases."""
    return p.dtype if p.dtype in (torch.bfloat16, torch.float16) else torch.float32


class _GaLoreBase(torch.optim.Optimizer):
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but every state tensor keeps the dtype it was saved with: torch casts
        floating-point states to the parameter's dtype, which for bf16 weights would turn
        float32 moments and scales into bf16 and the 8-bit codes into 2-byte floats."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, values in saved.items():
            p = params[index]
            for key, value in values.items():
                if torch.is_tensor(value) and key != "step":
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def _each(self):
        """(group, the parameter as this process sees it (``sharded.Part``), state, (projected)
        gradient, projection side) of every parameter with a gradient; counts the step. Under
        FSDP2 the weight and gradient are this process's shard (``optim/sharded.py``), and so
        is the state, unless the projection is not local to the shard (then all are whole)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                here = sharded.part(p)
                g, which = self._galore_grad(p, here, state, group)
                state["step"] += 1
                yield group, here, state, g, which

    def _galore_grad(
        self, p: torch.Tensor, here: sharded.Part, state: dict, group: dict
    ) -> tuple[torch.Tensor, str | None]:
        """The (projected) gradient, refreshing the basis every ``update_proj_gap`` steps."""
        g = here.grad
        if "rank" not in group or len(here.shape) != 2:
            return g.float(), None
        which = side(here.shape, group.get("proj_type", "std"))
        if not sharded.is_local(which, here.dim):  # stepped whole (``optim/sharded.py``)
            g, state["whole"] = p.grad.full_tensor(), 1
        reduce = here.group if "whole" not in state else None  # the Gram matrix's sum over the shards
        rank = min(group["rank"], *here.shape)
        if state["step"] % group.get("update_proj_gap", 200) == 0 or "proj" not in state:
            method = group.get("svd", "randomized" if group.get("randomized_svd") else "full")  # older states
            if reduce is not None and method != "gram":  # the SVD needs the whole gradient
                basis = top_singular(p.grad.full_tensor(), rank, which, method, state.get("proj"))
            else:
                basis = top_singular(g, rank, which, method, state.get("proj"), reduce)
            state["proj"] = basis.to(basis_dtype(p))
        return project(g, state["proj"], which), which

    def steps_whole(self, p: torch.Tensor) -> bool:
        """Whether ``p`` (an FSDP2 shard) is projected on the side its shard does not keep, so
        that it is stepped whole (``optim/sharded.py``)."""
        here = sharded.part(p)
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        if "rank" not in group or len(here.shape) != 2:
            return False
        return not sharded.is_local(side(here.shape, group.get("proj_type", "std")), here.dim)

    def state_shard_dim(self, state: dict, key: str, dim: int) -> int | str | None:
        """How the state ``key`` of a weight sharded along ``dim`` (FSDP2) splits over the
        processes, for sharded checkpoints (``distributed/checkpoint.py``): along that
        dimension of the state (the moments: shaped as the projected gradient, whose kept side
        is the shard's), not at all (None: the basis is the same everywhere), or "flat"
        (8-bit codes and scales, quantized in blocks of the shard)."""
        if key == "proj" or "whole" in state:  # the same on every process
            return None
        return "flat" if key.endswith(("_codes", "_absmax")) else dim

    def _back(self, update: torch.Tensor, state: dict, group: dict, which: str | None, here) -> torch.Tensor:
        """The update of the weight's slice that this process holds."""
        if which is None:
            return update
        update = group.get("scale", 0.25) * project_back(update, state["proj"], which)
        return sharded.mine(update, here) if "whole" in state else update


class GaLoreAdamW(_GaLoreBase):
    """AdamW with GaLore projection on the groups that carry ``rank``.

    ``state_dtype``: the moments are kept in float32 (default), or in bfloat16 (half the
    memory, as torch's AdamW and galore-torch keep them for bf16 weights); the update itself
    is computed in float32 either way."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        state_dtype: torch.dtype = torch.float32,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"invalid GaLoreAdamW settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}"
            )
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, here, state, g, which in self._each():
            update, p = self._back(self._direction(state, g, group), state, group, which, here), here.weight
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss

    def _direction(self, state: dict, g: torch.Tensor, group: dict) -> torch.Tensor:
        """Adam's direction m̂ / (√v̂ + eps) for the (projected) gradient, moments updated."""
        b1, b2 = group["betas"]
        t = state["step"]
        m, v = self._moments(state, g)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        self._store_moments(state, m, v)
        denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
        return (m / (1 - b1**t)) / denom

    def _moments(self, state, g):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(g, dtype=self.state_dtype)
            state["exp_avg_sq"] = torch.zeros_like(g, dtype=self.state_dtype)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        return (m, v) if m.dtype == torch.float32 else (m.float(), v.float())  # float32: updated in place

    def _store_moments(self, state, m, v):
        if state["exp_avg"].dtype != torch.float32:
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v)


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLoreAdamW whose two moments are stored block-wise in 8 bits (``quant8``): one byte
    per value plus a float32 scale per 256 values. Groups without ``rank`` are 8-bit AdamW.

    ``fused``: on CUDA (None: when Triton is there) each step is one Triton kernel per
    parameter (``adam8bit_triton``) instead of about ten PyTorch ops over float32 copies of
    the states; the stored states are the same either way."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        fused: bool | None = None,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)  # states: 8-bit
        self.fused = fused

    def _direction(self, state: dict, g: torch.Tensor, group: dict) -> torch.Tensor:
        fused = self.fused if self.fused is not None else (g.is_cuda and adam8bit_triton is not None)
        if not fused:
            return super()._direction(state, g, group)
        if adam8bit_triton is None:
            raise RuntimeError("GaLoreAdamW8bit(fused=True) needs Triton; install it or pass fused=False")
        b1, b2 = group["betas"]
        return adam8bit_triton.adam8bit_direction(state, g, b1, b2, group["eps"], state["step"])

    def _moments(self, state, g):
        if "exp_avg_codes" not in state:
            return torch.zeros_like(g, dtype=torch.float32), torch.zeros_like(g, dtype=torch.float32)
        shape = g.shape
        return (
            quant8.dequantize(state["exp_avg_codes"], state["exp_avg_absmax"], shape, signed=True),
            quant8.dequantize(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], shape, signed=False),
        )

    def _store_moments(self, state, m, v):
        state["exp_avg_codes"], state["exp_avg_absmax"] = quant8.quantize(m, signed=True)
        state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quant8.quantize(v, signed=False)


class GaLoreSGD(_GaLoreBase):
    """SGD with momentum and GaLore projection: with rank = min(m, n) it is exactly SGD
    (the projection is an orthogonal change of basis and SGD is linear in the gradient)."""

    def __init__(self, params: Iterable, lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group, here, state, g, which in self._each():
            p = here.weight
            if group["momentum"]:
                buf = state.setdefault("momentum", torch.zeros_like(g))
                g = buf.mul_(group["momentum"]).add_(g)
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(self._back(g, state, group, which, here).to(p.dtype), alpha=-group["lr"])
        return loss


def galore_param_groups(
    model: nn.Module,
    target_modules="all-linear",
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    svd: SvdMethod = "gram",
) -> list[dict]:
    """Two groups: the weights of the targeted linear layers (GaLore), everything else.
    ``svd``: how the basis is found (``projector.SvdMethod``): "gram" (the default: the
    smaller Gram matrix's eigenvectors, the SVD's subspace; one refresh at 1B on an H200 took
    4.9 s against the full SVD's 38.5 s), "full" (the SVD, as the paper and galore-torch) or
    "randomized" (``torch.svd_lowrank``: 6.6 s, approximate);
    benchmarks/NOTES-galore.md."""
    if rank < 1 or update_proj_gap < 1 or scale <= 0:
        raise ValueError(f"rank and update_proj_gap must be >= 1 and scale > 0, got {rank}, {update_proj_gap}, {scale}")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    chosen = {id(model.get_submodule(n).weight) for n in find_targets(model, target_modules)}
    galore = [p for p in model.parameters() if id(p) in chosen and p.requires_grad]
    rest = [p for p in model.parameters() if id(p) not in chosen and p.requires_grad]
    return [
        {
            "params": galore,
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "proj_type": proj_type,
            "svd": svd,
        },
        {"params": rest},
    ]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state, and of the tensors that objects in it
    hold as attributes (galore-torch keeps each basis in a ``GaLoreProjector``)."""

    def tensors(v):
        if torch.is_tensor(v):
            return [v]
        return [t for t in vars(v).values() if torch.is_tensor(t)] if hasattr(v, "__dict__") else []

    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for v in s.values() for t in tensors(v))


def analytic_state_bytes(optimizer: torch.optim.Optimizer, moments: int = 2, bits: int = 32) -> int:
    """What the states should take: ``moments`` values per entry of each (projected)
    gradient (4 bytes, 2 with ``state_dtype=torch.bfloat16``, or with ``bits=8`` one byte
    plus 4 per block of 256), plus the basis (m x r or n x r) of each GaLore parameter, in
    ``basis_dtype``."""
    width = torch.empty(0, dtype=getattr(optimizer, "state_dtype", torch.float32)).element_size()
    per = (lambda n: width * n) if bits == 32 else quant8.quantized_bytes
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if "rank" in group and p.dim() == 2:
                m, n = p.shape
                r = min(group["rank"], m, n)
                which = side((m, n), group.get("proj_type", "std"))
                low = m * r if which == "right" else r * n
                basis = n * r if which == "right" else m * r
                total += moments * per(low) + basis * torch.empty(0, dtype=basis_dtype(p)).element_size()
            else:
                total += moments * per(p.numel())
    return total


class GaLoreAdafactor(_GaLoreBase):
    """Adafactor (Shazeer & Stern, 2018) with GaLore projection: the second moment of each
    2-D (projected) gradient is kept as row and column means (factored), the update is
    clipped to RMS ``clip_threshold``, optional first moment ``beta1``. Settings as
    transformers' Adafactor with an explicit lr (relative_step=False, scale_parameter=False)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
    ):
        if lr <= 0 or clip_threshold <= 0 or not decay_rate < 0:
            raise ValueError(
                f"invalid GaLoreAdafactor settings: lr={lr}, clip_threshold={clip_threshold}, decay_rate={decay_rate}"
            )
        super().__init__(
            params,
            dict(
                lr=lr,
                eps=eps,
                clip_threshold=clip_threshold,
                decay_rate=decay_rate,
                beta1=beta1,
                weight_decay=weight_decay,
            ),
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        if any(sharded.part(p).group is not None for group in self.param_groups for p in group["params"]):
            raise ValueError(
                "GaLoreAdafactor's factored moments and update clipping span whole weights, and it does "
                "not step FSDP shards: use GaLoreAdamW (galore) or Apollo under FSDP, or DDP"
            )
        for group, here, state, g, which in self._each():
            p = here.weight
            beta2 = 1.0 - state["step"] ** group["decay_rate"]
            sq = g * g + group["eps"][0]
            if g.dim() == 2:  # factored: rows and columns
                row = state.setdefault("exp_avg_sq_row", torch.zeros(g.shape[0], device=g.device))
                col = state.setdefault("exp_avg_sq_col", torch.zeros(g.shape[1], device=g.device))
                row.mul_(beta2).add_(sq.mean(1), alpha=1 - beta2)
                col.mul_(beta2).add_(sq.mean(0), alpha=1 - beta2)
                update = g * torch.rsqrt(torch.outer(row / row.mean(), col))
            else:
                v = state.setdefault("exp_avg_sq", torch.zeros_like(g))
                v.mul_(beta2).add_(sq, alpha=1 - beta2)
                update = g * torch.rsqrt(v)
            update.div_(max(1.0, float(update.pow(2).mean().sqrt()) / group["clip_threshold"]))
            if group["beta1"]:
                m = state.setdefault("exp_avg", torch.zeros_like(update))
                update = m.lerp_(update, 1 - group["beta1"])
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(self._back(update, state, group, which, here).to(p.dtype), alpha=-group["lr"])
        return loss
