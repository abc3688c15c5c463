"""``loraflow bench train``: memory and speed of the training optimizers on LLaMA sizes.

For each configuration and optimizer (AdamW, 8-bit AdamW, GaLore, 8-bit GaLore; each with
and without per-layer updates; galore-torch's when it is installed) it trains a few steps on
random tokens (sequence 256) and records peak GPU memory, optimizer-state bytes (and the
analytic count), and tokens per second.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

import loraflow as lf
from loraflow.optim import analytic_state_bytes, state_bytes

VARIANTS = {  # name -> (our optimizer class name or "galore-torch:<cls>", uses GaLore groups, bits)
    "adamw": ("GaLoreAdamW", False, 32),
    "adamw8bit": ("GaLoreAdamW8bit", False, 8),
    "galore": ("GaLoreAdamW", True, 32),
    "galore8bit": ("GaLoreAdamW8bit", True, 8),
    "galore-torch": ("galore_torch:GaLoreAdamW", True, 32),
    "galore-torch8bit": ("galore_torch:GaLoreAdamW8bit", True, 8),
}


@dataclass
class TrainCase:
    config: str
    variant: str
    per_layer: bool
    rank: int
    update_proj_gap: int = 200
    batch: int = 1                     # sequences per step
    seq: int = 256
    steps: int = 6                     # the first 2 are warm-up, not timed
    checkpointing: bool = False


def _optimizer_class(name: str):
    spec = VARIANTS[name][0]
    if ":" in spec:
        module, cls = spec.split(":")
        return getattr(__import__(module), cls)   # ImportError when galore-torch is not there
    return getattr(lf, spec)


def run_case(c: TrainCase, device: str = "cuda", dtype=torch.bfloat16) -> dict:
    from transformers import LlamaForCausalLM

    out = asdict(c)
    try:
        cls = _optimizer_class(c.variant)
    except (ImportError, AttributeError) as e:
        return {**out, "error": f"not available: {e}"}
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(lf.llama_config(c.config, max_seq_len=c.seq)).to(dtype)
    if c.checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    galore = VARIANTS[c.variant][1]
    groups = (lf.galore_param_groups(model, rank=c.rank, update_proj_gap=c.update_proj_gap, scale=0.25) if galore
              else [{"params": list(model.parameters())}])
    make = lambda g: cls(g, lr=1e-4)
    opt = lf.PerLayerUpdates(model, make, groups) if c.per_layer else make(groups)
    tokens = torch.randint(3, 32000, (c.steps, c.batch, c.seq), device=device)
    times = []
    try:
        for i in range(c.steps):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = model(input_ids=tokens[i], labels=tokens[i]).loss
            loss.backward()
            if c.per_layer:
                opt.after_backward()
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError as e:
        return {**out, "error": f"out of memory: {str(e)[:120]}"}
    optimizers = list(opt.optimizers.values()) if c.per_layer else [opt]
    measured = sum(state_bytes(o) for o in optimizers)
    bits = VARIANTS[c.variant][2]
    analytic = sum(analytic_state_bytes(o, bits=bits) for o in optimizers) if not c.variant.startswith("galore-torch") else None
    timed = times[2:]
    out.update(params=sum(p.numel() for p in model.parameters()), state_bytes=measured, analytic_state_bytes=analytic,
               tokens_per_s=c.batch * c.seq * len(timed) / sum(timed), loss=float(loss.detach()),
               peak_memory_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None)
    del model, opt, optimizers
    return out
