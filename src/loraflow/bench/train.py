"""``loraflow bench train``: memory and speed of the training optimizers on LLaMA sizes.

For each configuration and optimizer (AdamW, 8-bit AdamW, GaLore, 8-bit GaLore; each with
and without per-layer updates; galore-torch's when it is installed) it trains a few steps on
random tokens (sequence 256) and records peak GPU memory, optimizer-state bytes (and the
analytic count), and tokens per second.

GaLore recomputes each projected weight's basis (an SVD of its gradient) once every
T = ``update_proj_gap`` steps, at steps 0, T, 2T, ... (ours and galore-torch's alike); the
timed steps (all but the first two, warm-up) hold none, so their mean is the *steady* step
time. The SVDs are timed on their own instead (``refresh_seconds``): one more backward pass
gives the projected weights their real gradients, and each implementation's own basis
routine (ours: ``projector.top_singular``; galore-torch:
``GaLoreProjector.get_orthogonal_matrix``) runs on one gradient of each distinct weight
shape, synchronised and timed, counted once per weight of that shape. A refresh step does
the work of a steady step plus exactly these SVDs, so this is the refresh's extra cost,
without the noise of subtracting two step times (on small models larger than the SVDs
themselves) and without a second full refresh per case (minutes at 7B). The reported speed
amortises it over the T steps:

    tokens_per_s = tokens per step / (mean steady step time + svd_seconds / T)

with ``steady_tokens_per_s`` (no SVD) and ``svd_seconds`` (one refresh of every projected
weight) alongside; for the optimizers without projection the two speeds are the same.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch

import loraflow as lf
from loraflow.optim import analytic_state_bytes, state_bytes
from loraflow.optim.projector import SVD_METHODS, side, top_singular

VARIANTS = {  # name -> (our optimizer class name or "galore-torch:<cls>", projected groups, bits)
    "adamw": ("GaLoreAdamW", None, 32),
    "adamw8bit": ("GaLoreAdamW8bit", None, 8),
    "galore": ("GaLoreAdamW", "galore", 32),
    "galore8bit": ("GaLoreAdamW8bit", "galore", 8),
    "galore-torch": ("galore_torch:GaLoreAdamW", "galore", 32),
    "galore-torch8bit": ("galore_torch:GaLoreAdamW8bit", "galore", 8),
    "apollo": ("Apollo", "apollo", 32),
    "apollo8bit": ("ApolloAdamW8bit", "apollo", 8),
    "apollo-mini": ("ApolloMini", "apollo", 32),
}


@dataclass
class TrainCase:
    config: str
    variant: str
    per_layer: bool
    rank: int
    update_proj_gap: int = 200
    batch: int = 1  # sequences per micro-batch
    accumulation: int = 1  # micro-batches per optimizer step
    seq: int = 256
    steps: int = 6  # the first 2 are warm-up, not timed
    checkpointing: bool = False
    svd: str = "gram"  # ours only: "full", "gram" or "randomized" (projector.SvdMethod)
    state_dtype: str = "float32"  # ours, 32-bit variants: Adam moments in float32 or bfloat16

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if self.state_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"state_dtype must be float32 or bfloat16, got {self.state_dtype!r}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {self.svd!r}")
        if self.accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {self.accumulation}")
        if self.steps < 3:
            raise ValueError(f"steps must be >= 3 (two warm-up steps, then timed ones), got {self.steps}")
        if VARIANTS[self.variant][1] == "galore" and self.steps > self.update_proj_gap:
            raise ValueError(
                f"{self.variant}: steps ({self.steps}) must be <= update_proj_gap ({self.update_proj_gap}) "
                "so that no timed step holds an SVD (it is timed on its own): use fewer steps"
            )


def _optimizer_class(name: str):
    spec = VARIANTS[name][0]
    if ":" in spec:
        module, cls = spec.split(":")
        return getattr(__import__(module), cls)  # ImportError when galore-torch is not there
    return getattr(lf, spec)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def basis_routine(variant: str):
    """The function ``(gradient, GaLore group) -> basis`` that the variant's optimizer runs on
    each projected weight when it refreshes the projection."""
    if VARIANTS[variant][0].startswith("galore_torch"):
        from galore_torch.galore_projector import GaLoreProjector

        def routine(g: torch.Tensor, group: dict) -> torch.Tensor:
            projector = GaLoreProjector(
                group["rank"],
                update_proj_gap=group["update_proj_gap"],
                scale=group["scale"],
                proj_type=group["proj_type"],
            )
            # galore-torch's side for proj_type "std" (GaLoreProjector.project)
            return projector.get_orthogonal_matrix(g, group["rank"], "right" if g.shape[0] >= g.shape[1] else "left")
    else:

        def routine(g: torch.Tensor, group: dict) -> torch.Tensor:
            rank = min(group["rank"], *g.shape)
            return top_singular(g, rank, side(tuple(g.shape), group["proj_type"]), group["svd"])

    return routine


def refresh_seconds(model, input_ids: torch.Tensor, group: dict, variant: str, device: str) -> float:
    """Seconds of one projector refresh of every projected (2-D) weight of ``group``.

    One more backward pass gives the weights their real gradients; for each distinct weight
    shape, ``basis_routine(variant)`` runs on the first such gradient to complete and is
    timed (synchronised), and that time counts once per projected weight of the shape: an
    SVD's cost is set by the matrix's shape, and every layer repeats the same few shapes, so
    at 7B three SVDs stand for 224. Each gradient is freed as soon as it is complete; no
    optimizer steps (remove per-layer hooks first)."""
    routine = basis_routine(variant)
    projected = [p for p in group["params"] if p.dim() == 2]
    count = Counter(tuple(p.shape) for p in projected)
    seconds: dict[tuple, float] = {}

    def timed(p: torch.Tensor) -> None:
        if tuple(p.shape) not in seconds:
            _sync(device)
            start = time.perf_counter()
            routine(p.grad, group)
            _sync(device)
            seconds[tuple(p.shape)] = time.perf_counter() - start
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(timed) for p in projected]
    try:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    missing = set(count) - set(seconds)
    if missing:
        raise RuntimeError(f"no gradient reached the projected weights of shape {sorted(missing)}")
    return sum(seconds[shape] * n for shape, n in count.items())


def run_case(c: TrainCase, device: str = "cuda", dtype=torch.bfloat16) -> dict:
    from transformers import LlamaForCausalLM

    out = asdict(c)
    try:
        cls = _optimizer_class(c.variant)
    except (ImportError, AttributeError) as e:
        return {**out, "error": f"not available: {e}"}
    gc.collect()  # the previous case's cycles (hooks, closures) hold GPU memory
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the training dtype: a float32 7B would take 27 GB first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(lf.llama_config(c.config, max_seq_len=c.seq))
    finally:
        torch.set_default_dtype(default)
    if device == "cuda":  # the peak from here on: weights, then whatever training adds
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if c.checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    galore = VARIANTS[c.variant][1] == "galore"
    if galore:
        groups = lf.galore_param_groups(model, rank=c.rank, update_proj_gap=c.update_proj_gap, scale=0.25, svd=c.svd)
    elif VARIANTS[c.variant][1] == "apollo":  # APOLLO-Mini makes its groups rank 1, tensor-wise
        groups = lf.apollo_param_groups(model, rank=c.rank, update_proj_gap=c.update_proj_gap)
    else:
        groups = [{"params": list(model.parameters())}]
    ours_32bit = c.variant in ("adamw", "galore", "apollo", "apollo-mini")
    kw = {"state_dtype": getattr(torch, c.state_dtype)} if ours_32bit else {}
    make = lambda g: cls(g, lr=1e-4, **kw)
    opt = lf.PerLayerUpdates(model, make, groups, c.accumulation) if c.per_layer else make(groups)
    tokens = torch.randint(3, 32000, (c.steps, c.accumulation, c.batch, c.seq), device=device)
    times = []
    try:
        for i in range(c.steps):
            _sync(device)
            start = time.perf_counter()
            for micro in tokens[i]:
                loss = model(input_ids=micro, labels=micro).loss / c.accumulation
                loss.backward()
                if c.per_layer:
                    opt.after_backward()
            if not c.per_layer:
                opt.step()
                opt.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None  # before the SVD timing
        optimizers = list(opt.optimizers.values()) if c.per_layer else [opt]
        measured = sum(state_bytes(o) for o in optimizers)
        svd = None
        if galore:
            if c.per_layer:
                opt.remove()  # no optimizer steps in the timing pass
            svd = refresh_seconds(model, tokens[-1, 0], groups[0], c.variant, device)
    except torch.OutOfMemoryError as e:
        return {**out, "error": f"out of memory: {str(e)[:120]}"}
    bits = VARIANTS[c.variant][2]
    analytic = (
        sum(analytic_state_bytes(o, bits=bits) for o in optimizers)
        if VARIANTS[c.variant][1] != "apollo" and not c.variant.startswith("galore-torch")
        else None
    )
    steady = sum(times[2:]) / len(times[2:])
    per_step = c.batch * c.seq * c.accumulation
    out.update(
        params=sum(p.numel() for p in model.parameters()),
        state_bytes=measured,
        analytic_state_bytes=analytic,
        steady_tokens_per_s=per_step / steady,
        svd_seconds=svd,
        tokens_per_s=per_step / (steady + (svd or 0.0) / c.update_proj_gap),
        loss=float(loss.detach()),
        peak_memory_bytes=peak,
    )
    del model, opt, optimizers
    return out
