"""Every row of a batch with its own adapter: ``use_adapters`` and the mixed-batch forward.

    with lf.use_adapters(model, ["a", "b", None, "a"]):   # one name per row; None: base model
        out = model(input_ids)

Inside the ``with``, each adapter layer holds a ``RowPlan``: slot ids as tensors (one per
row), split by kind. Additive adapters (LoRA, Deep LoRA) add Δy to the base output; FLoRA
rows get FLoRA's own output. The plan lives on the model's own layers, so two threads using
two models do not interfere; leaving the ``with`` restores what was there.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from loraflow.adapters.kinds import kind_of
from loraflow.modules import base_weight
from loraflow.multi import ops

Impl = Literal["loop", "bmm", "segmented", "triton"]
IMPLS = ("loop", "bmm", "segmented", "triton")
LORA_OPS = {"loop": ops.loop, "bmm": ops.bmm, "segmented": ops.segmented}
FLORA_OPS = {"loop": ops.flora_loop, "bmm": ops.flora_bmm}  # else FLoRA's dense path

try:
    from loraflow.multi import triton_lora
except ImportError:  # Triton is optional: the PyTorch ops need nothing more
    triton_lora = None


@dataclass
class RowPlan:
    """What one layer does for each row of the batch."""

    additive: list[str]  # LoRA / Deep LoRA adapters on this layer that rows use
    add_slots: torch.Tensor  # (rows,) index into ``additive``, -1: none
    flora: list[str]  # FLoRA adapters on this layer that rows use
    flora_rows: torch.Tensor  # (k,) rows that use one of them
    flora_slots: torch.Tensor  # (k,) index into ``flora``
    impl: Impl | None  # None: chosen per call by device and autograd
    cache: dict = field(default_factory=dict)  # per-batch work shared by layers (tile plans)


def plan_rows(adapters: nn.ModuleDict, names: list[str | None], impl, device) -> RowPlan:
    used = [n for n in dict.fromkeys(names) if n is not None and n in adapters]
    additive = [n for n in used if kind_of(adapters[n]).additive]
    flora = [n for n in used if not kind_of(adapters[n]).additive]  # FLoRA: multiplicative
    add_slots = [additive.index(n) if n in additive else -1 for n in names]
    frows = [i for i, n in enumerate(names) if n in flora]
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=device)
    return RowPlan(additive, as_t(add_slots), flora, as_t(frows), as_t([flora.index(names[i]) for i in frows]), impl)


def _additive_sources(layer, names) -> list[torch.Tensor]:
    """The parameters that the (A_i, B_i) of ``_additive_factors`` are computed from."""
    return [p for n in names for p in layer.adapters[n].parameters()]


def _additive_factors(layer, names):
    """(A_i, B_i, scale_i, dropout_i) of each additive adapter, as its kind gives them
    (``adapters/kinds.py``; Deep LoRA: A = W_1, B = W_L ⋯ W_2)."""
    factors = [kind_of(layer.adapters[n]).additive(layer.adapters[n]) for n in names]
    A, B, scales, dropouts = (list(t) for t in zip(*factors)) if factors else ([], [], [], [])
    return A, B, scales, dropouts


class _Stamp:
    """One weight tensor as it is now; ``still(t)``: t is that tensor and holds the same values.

    Three things together: the tensor itself (weakly referenced, so that a cache does not keep a
    replaced adapter alive; a new tensor never passes ``is``, whatever its id), its memory
    (data_ptr, shape, stride, dtype; the storage is held, so no other tensor can be allocated at
    that address while the stamp lives: ``param.data = t`` moves the pointer without bumping the
    version) and ``_version``, which every in-place write to the parameter or a ``detach()`` of it
    bumps (``param.copy_`` under ``no_grad``, optimizer steps, ``load_adapter``). Writes through
    ``param.data`` (``param.data.copy_``) are not counted: PyTorch gives ``.data`` a version
    counter of its own so that autograd does not see them, and this cache cannot either.
    """

    __slots__ = ("ref", "storage", "version", "where")

    def __init__(self, t: torch.Tensor):
        self.ref = weakref.ref(t)
        self.storage = t.untyped_storage()
        self.where = _where(t)
        self.version = t._version

    def still(self, t: torch.Tensor) -> bool:
        return self.ref() is t and t._version == self.version and _where(t) == self.where


def _where(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.shape, t.stride(), t.dtype, t.device


def _cached(layer, attr: str, meta: tuple, sources: list[torch.Tensor], compute: Callable):
    """``compute()``, kept on ``layer.<attr>`` until ``meta`` or any of the ``sources`` changes.

    Keyed on the source parameters themselves (``_Stamp``), never on tensors computed from them
    (Deep LoRA's product W_L ⋯ W_2 is new on every call: its id says nothing).
    """
    entry = getattr(layer, attr, None)
    if (
        entry is None
        or entry[0] != meta
        or len(entry[1]) != len(sources)
        or not all(st.still(t) for st, t in zip(entry[1], sources))
    ):
        stamps = [_Stamp(t) for t in sources]  # before compute: a write during it repacks
        with torch.no_grad():
            entry = (meta, stamps, compute())
        setattr(layer, attr, entry)
    return entry[2]


def choose_impl(x: torch.Tensor, params_need_grad: bool) -> str:
    if torch.is_grad_enabled() and (x.requires_grad or params_need_grad):
        return "segmented"
    if x.is_cuda and triton_lora is not None:
        return "triton"
    return "segmented"


def _triton_layer(layer, plan: RowPlan, x: torch.Tensor) -> torch.Tensor:
    """y = addmm(Δy + bias, x, W0ᵀ): the kernels write Δy, the base GEMM adds onto it."""
    if triton_lora is None:
        raise ImportError("impl='triton' needs the triton package: pip install triton")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "impl='triton' runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1 "
            "for tests); use 'segmented' on the CPU"
        )

    def pack():  # once, until the weights change
        A, B, scales, _ = _additive_factors(layer, plan.additive)
        return triton_lora.PackedLoRA.pack(A, B, scales)

    meta = tuple((n, getattr(layer.adapters[n], "scale", 1.0)) for n in plan.additive)
    packed = _cached(layer, "_packed", meta, _additive_sources(layer, plan.additive), pack)
    R, T, _ = x.shape
    n = len(plan.additive)
    if ("tokens", T) not in plan.cache:  # once per batch, not once per layer
        tokens = plan.add_slots.repeat_interleave(T)
        variant = triton_lora.choose_variant(R * T, n)
        tiles = triton_lora.tile_plan(tokens, n) if variant == "tiles" else None
        plan.cache[("tokens", T)] = (tokens, variant, tiles)
    tokens, variant, tiles = plan.cache[("tokens", T)]
    x2 = x.reshape(R * T, -1)
    with torch.no_grad():
        delta = triton_lora.lora_delta(x2, tokens, packed, variant, tiles, bias=layer.base.bias)
        y = torch.addmm(delta, x2, base_weight(layer.base).T)  # (R·T, d_out)
    return y.view(R, T, -1)


def _flora_stacked(layer, plan: RowPlan, A, B, needs_grad: bool):
    """Stacked FLoRA weights; kept between calls at inference, until the weights change."""
    if needs_grad and torch.is_grad_enabled():
        return ops.flora_stack(A, B)
    return _cached(layer, "_flora_stacked", tuple(plan.flora), [*A, *B], lambda: ops.flora_stack(A, B))


def mixed_forward(layer, x: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """The layer's output when row i of x uses its own adapter (``plan``)."""
    x3 = x.unsqueeze(1) if x.dim() == 2 else x  # (R, T, d_in); 2-D: tokens as rows
    if x3.dim() != 3 or x3.shape[0] != plan.add_slots.numel():
        raise ValueError(
            f"use_adapters got {plan.add_slots.numel()} adapter names but the batch "
            f"has {x3.shape[0] if x3.dim() == 3 else tuple(x.shape)} rows: pass one "
            "name (or None) per row"
        )
    needs_grad = any(p.requires_grad for n in plan.additive + plan.flora for p in layer.adapters[n].parameters())
    impl = plan.impl or choose_impl(x3, needs_grad)
    if not plan.additive:
        y = layer.base(x3)  # (R, T, d_out)
    elif impl == "triton":  # factors only when it repacks
        y = _triton_layer(layer, plan, x3)
    else:
        A, B, scales, dropouts = _additive_factors(layer, plan.additive)
        if impl == "bmm":
            y = layer.base(x3) + ops.bmm(x3, plan.add_slots, A, B, scales)
        else:
            y = layer.base(x3) + LORA_OPS[impl](x3, plan.add_slots, A, B, scales, dropouts)
    if plan.flora:
        adapters = [layer.adapters[n] for n in plan.flora]
        xf = x3.index_select(0, plan.flora_rows)
        A, B = [a.A for a in adapters], [a.B for a in adapters]
        if impl in FLORA_OPS:
            yf = FLORA_OPS[impl](xf, plan.flora_slots, base_weight(layer.base), A, B)
        else:
            yf = ops.flora_dense_stacked(
                xf, plan.flora_slots, base_weight(layer.base), *_flora_stacked(layer, plan, A, B, needs_grad)
            )
        if layer.base.bias is not None:
            yf = yf + layer.base.bias
        y = y.index_copy(0, plan.flora_rows, yf.to(y.dtype))
    return y.view(*x.shape[:-1], y.shape[-1])
