"""Deep LoRA's two training steps on a whole model (Yaras et al., ICML 2024, Sec. 3.2 and 4):
``compress`` shrinks the wide factors to rank r from one batch's gradient, and
``deep_lora_param_groups`` gives the outer factors their discrepant learning rate. The math
of one layer's factors lives in ``deep_lora.py``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from loraflow.adapters.deep_lora import DeepLoRA
from loraflow.adapters.layer import adapter_layers


def compress(
    model: nn.Module, batch: dict, name: str | None = None, loss_fn: Callable | None = None
) -> dict[str, torch.Tensor]:
    """Compress the Deep LoRA adapter ``name`` to rank r from one batch's gradient (Sec. 3.2).

    ``batch`` is passed as ``model(**batch)``; the loss is ``output.loss`` (a batch with
    ``labels``) or ``loss_fn(output, batch)``. Build the optimizer after compressing: the
    factors are new parameters. Returns each layer's top-r singular values of the gradient.
    """
    layers = adapter_layers(model, name, kind=DeepLoRA)
    name = name if name is not None else _single_name(layers)
    r = _config_of(model, name).r
    for lname, layer in layers:
        if layer.adapters[name].width <= r:
            raise ValueError(
                f"Deep LoRA adapter '{name}' on {lname} already has width "
                f"{layer.adapters[name].width} <= r={r}: it is compressed already"
            )

    grads: dict[str, torch.Tensor] = {}
    handles = []

    def capture(lname):
        def hook(module, args, out):
            x = args[0].detach()

            def on_grad(g):  # G = Σ_t g_t x_tᵀ = ∂loss/∂ΔW, in float32 even under bf16 autocast (SVD next)
                with torch.autocast(g.device.type, enabled=False):
                    gg = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                    grads[lname] = grads[lname] + gg if lname in grads else gg

            out.register_hook(on_grad)

        return hook

    saved = {p: p.requires_grad for p in model.parameters()}
    previous = [(layer, layer.active) for _, layer in layers]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for lname, layer in layers:
            for p in layer.adapters[name].parameters():
                p.requires_grad_(True)
            handles.append(layer.register_forward_hook(capture(lname)))
        for _, layer in layers:
            layer.active = name
        with torch.enable_grad():
            out = model(**batch)
            loss = loss_fn(out, batch) if loss_fn is not None else out.loss
            if loss is None:
                raise ValueError("compress needs a loss: pass a batch with 'labels' or a loss_fn")
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
        for layer, active in previous:
            layer.active = active

    singular = {}
    for lname, layer in layers:
        if lname not in grads:
            raise ValueError(f"layer {lname} got no gradient from this batch; it cannot be compressed")
        u, s, vh = torch.linalg.svd(grads[lname], full_matrices=False)
        # ΔW = -eps^L U_r V_rᵀ: the compressed map starts downhill, along -G (from +G, gradient
        # descent first shrinks every factor through zero: it stalled in bench deep-matrix-completion)
        layer.adapters[name].compress_to(-u[:, :r], vh[:r].T)
        singular[lname] = s[:r]
    return singular


def deep_lora_param_groups(model: nn.Module, name: str, lr: float, gamma: float | None = None) -> list[dict]:
    """Optimizer groups: outer factors (W_1, W_L) at gamma·lr, inner factors at lr."""
    gamma = _config_of(model, name).gamma if gamma is None else gamma
    outer, inner = [], []
    for _, layer in adapter_layers(model, name, kind=DeepLoRA):
        f = list(layer.adapters[name].factors)
        outer += [f[0], f[-1]]
        inner += f[1:-1]
    groups = [{"params": outer, "lr": gamma * lr}]
    return groups + ([{"params": inner, "lr": lr}] if inner else [])


def _config_of(model: nn.Module, name: str):
    configs = getattr(model, "loraflow_configs", {})
    if name not in configs:
        raise KeyError(f"no adapter named '{name}' on this model; it has {sorted(configs)}")
    return configs[name]


def _single_name(layers) -> str:
    names = {n for _, layer in layers for n, a in layer.adapters.items() if isinstance(a, DeepLoRA)}
    if len(names) != 1:
        raise ValueError(f"the model has Deep LoRA adapters {sorted(names)}: pass name=")
    return names.pop()
