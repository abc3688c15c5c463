"""Put adapters on any ``nn.Module`` and manage them by name.

Adding an adapter swaps each targeted linear layer (found by name over ``named_modules``)
for an ``AdapterLinear`` that wraps it; removing the last adapter swaps the original back.
The configs of a model's adapters live in ``model.loraflow_configs`` (name -> config).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

from torch import nn

from loraflow.adapters.deep_lora import DeepLoRAConfig
from loraflow.adapters.flora import FLoRAConfig
from loraflow.adapters.kinds import kind_of
from loraflow.adapters.layer import AdapterLinear, adapter_layers
from loraflow.adapters.lora import LoRAConfig
from loraflow.modules import find_targets
from loraflow.multi.rows import IMPLS, Impl, RowPlan, plan_rows

AdapterConfig = LoRAConfig | FLoRAConfig | DeepLoRAConfig


def build_adapter(config: AdapterConfig, module_name: str, layer: nn.Module, **shape) -> nn.Module:
    """One adapter module for one linear layer. ``shape`` may force ``r`` or ``width``
    (as read from an adapter file) instead of what the config and its patterns say."""
    w = layer.base.weight if isinstance(layer, AdapterLinear) else layer.weight
    return kind_of(config).build(config, module_name, layer.d_in, layer.d_out, shape, device=w.device, dtype=w.dtype)


def _configs(model: nn.Module) -> dict:
    if not hasattr(model, "loraflow_configs"):
        model.loraflow_configs = {}
    return model.loraflow_configs


def _check_name(model: nn.Module, name: str) -> None:
    if name not in _configs(model):
        raise KeyError(f"no adapter named {name!r} on this model; it has {sorted(_configs(model))}")


def _wrap(model: nn.Module, module_name: str) -> AdapterLinear:
    module = model.get_submodule(module_name)
    if isinstance(module, AdapterLinear):
        return module
    layer = AdapterLinear(module)
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return layer


def attach(model: nn.Module, config: AdapterConfig, name: str, modules: dict[str, nn.Module]) -> None:
    """Attach ready-made adapter modules (module name -> adapter) under ``name``."""
    configs = _configs(model)
    first = not configs
    for module_name, adapter in modules.items():
        layer = _wrap(model, module_name)
        layer.adapters[name] = adapter
    configs[name] = config
    if first:
        set_adapter(model, name)


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default") -> str:
    """Add a new adapter on the modules that ``config.target_modules`` selects.

    The first adapter added to a model becomes active; later ones wait for ``set_adapter``.
    """
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in _configs(model):
        raise ValueError(
            f"the model already has an adapter named {name!r}; pick another name or delete_adapter(model, name) first"
        )
    targets = find_targets(model, config.target_modules)
    modules = {}
    for module_name in targets:
        module = model.get_submodule(module_name)
        layer = module if isinstance(module, AdapterLinear) else AdapterLinear(module)
        modules[module_name] = build_adapter(config, module_name, layer)
    attach(model, config, name, modules)
    return name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter; layers left with none get their original module back."""
    _check_name(model, name)
    if any(layer.merged == name for _, layer in adapter_layers(model, name)):
        unmerge_adapter(model, name)
    for module_name, layer in adapter_layers(model, name):
        del layer.adapters[name]
        if layer.active == name:
            layer.active = None
        if not len(layer.adapters):
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    del _configs(model)[name]
    if getattr(model, "loraflow_active", None) == name:
        model.loraflow_active = None


def list_adapters(model: nn.Module) -> dict[str, AdapterConfig]:
    return dict(_configs(model))


def active_adapter(model: nn.Module) -> str | None:
    return getattr(model, "loraflow_active", None)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter on every layer that has it; ``None``: the base model."""
    if name is not None:
        _check_name(model, name)
    merged = {layer.merged for _, layer in adapter_layers(model)} - {None}
    if merged and merged != {name}:
        raise RuntimeError(
            f"adapter {merged.pop()!r} is merged into the base weights; "
            "unmerge_adapter(model, name) before switching adapters"
        )
    for _, layer in adapter_layers(model):
        layer.active = name if name in layer.adapters else None
    model.loraflow_active = name


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights (W0 <- merged W); it becomes active."""
    _check_name(model, name)
    layers = adapter_layers(model, name)
    if all(layer.merged == name for _, layer in layers):
        return
    set_adapter(model, name)  # refuses while another adapter is merged
    done = []
    try:
        for _, layer in layers:
            layer.merge(name)
            done.append(layer)
    except Exception:
        for layer in done:  # all or nothing
            layer.unmerge()
        raise


def unmerge_adapter(model: nn.Module, name: str) -> None:
    """Restore the base weights W0; adapter ``name`` stays active, computed unmerged."""
    _check_name(model, name)
    for _, layer in adapter_layers(model, name):
        if layer.merged == name:
            layer.unmerge()


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of adapter ``name``, in module order."""
    _check_name(model, name)
    return [p for _, layer in adapter_layers(model, name) for p in layer.adapters[name].parameters()]


def mark_trainable(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Freeze every parameter of the model except those of adapter ``name``; returns them."""
    params = adapter_parameters(model, name)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


@contextmanager
def use_adapters(model: nn.Module, names: Sequence[str | None], impl: Impl | None = None):
    """Run the model with adapter ``names[i]`` on row i (``None``: the base model).

    ``impl`` forces one implementation ("loop", "bmm", "segmented", "triton"); by default
    autograd batches use "segmented" and CUDA inference uses "triton" when Triton is there.
    """
    names = list(names)
    known = list_adapters(model)
    for n in names:
        if n is not None and n not in known:
            raise KeyError(f"unknown adapter {n!r} in use_adapters; the model has {sorted(known)}")
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    layers = [layer for _, layer in adapter_layers(model)]
    merged = {layer.merged for layer in layers} - {None}
    if merged:
        raise RuntimeError(
            f"adapter {merged.pop()!r} is merged into the base weights; "
            "unmerge_adapter(model, name) before use_adapters"
        )
    device = next(model.parameters()).device
    shared: dict[tuple, RowPlan] = {}  # layers holding the same adapters share one plan
    previous = [(layer, layer.rows) for layer in layers]
    try:
        for layer in layers:
            key = tuple((n, type(a)) for n, a in layer.adapters.items())
            if key not in shared:
                shared[key] = plan_rows(layer.adapters, names, impl, device)
            layer.rows = shared[key]
        yield
    finally:
        for layer, rows in previous:
            layer.rows = rows
