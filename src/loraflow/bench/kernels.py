"""``loraflow bench kernels``: per-row adapter ops on Llama-2-7B projection shapes.

For each case (shape, rows x tokens, rank, adapter mix) it times, in bf16 on one GPU:
the base GEMM alone; the LoRA add-on (shrink + expand) of each implementation; the whole
layer with our kernels; PEFT's mixed-batch forward of the same layer; and the memory
roofline of the add-on: bytes of x, of the A and B actually used, and of y, over the
device-to-device copy bandwidth measured in the same run. FLoRA cases time FLoRA's dense
path against the ``bmm`` LoRA layer at equal rank.

Mixes (Punica / S-LoRA): identical (one adapter), uniform (ceil(sqrt(n)) adapters),
skewed (Zipf 1.5 over n), distinct (n adapters) for a batch of n rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraflow.bench.timing import rotations, time_ms
from loraflow.multi import ops

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (d_in, d_out) of Llama-2-7B
RANKS = [1, 2, 4, 8, 16, 32, 64]
MIXED_RANKS = [8, 16, 32, 64]  # "mixed": cycled over adapters
MIXES = ["identical", "uniform", "skewed", "distinct"]


@dataclass
class Case:
    kind: str  # "decode" | "prefill" | "flora"
    d_in: int
    d_out: int
    rows: int  # requests in the batch
    T: int  # tokens per row (1: decode)
    rank: int | str  # an int, or "mixed"
    mix: str

    @property
    def tokens(self) -> int:
        return self.rows * self.T


def grid(quick: bool = False, kind: str | None = None) -> list[Case]:
    cases = _grid(quick)
    return [c for c in cases if kind is None or c.kind == kind]


def _grid(quick: bool) -> list[Case]:
    if quick:
        return [
            Case("decode", 4096, 4096, 64, 1, 16, "distinct"),
            Case("prefill", 4096, 4096, 16, 256, 16, "distinct"),
            Case("flora", 4096, 4096, 16, 256, 1, "distinct"),
        ]
    cases = []
    for d_in, d_out in SHAPES:
        for rows in [1, 4, 16, 64, 256]:
            for mix in MIXES:
                cases.append(Case("decode", d_in, d_out, rows, 1, 16, mix))
        for tokens in [2048, 4096, 8192]:
            for mix in MIXES:
                cases.append(Case("prefill", d_in, d_out, 16, tokens // 16, 16, mix))
    for rank in RANKS + ["mixed"]:
        if rank != 16:
            cases.append(Case("decode", 4096, 4096, 64, 1, rank, "distinct"))
            cases.append(Case("prefill", 4096, 4096, 16, 256, rank, "distinct"))
    for rank in RANKS:
        cases.append(Case("flora", 4096, 4096, 16, 256, rank, "distinct"))
    for tokens in [2048, 8192]:
        cases.append(Case("flora", 4096, 4096, 16, tokens // 16, 1, "distinct"))
    for rank in [1, 2, 4, 8, 16]:  # decode-sized batches, where FLoRA's GEMM is cheap
        cases.append(Case("flora", 4096, 4096, 64, 1, rank, "distinct"))
    return cases


def assign(mix: str, n: int, gen: torch.Generator) -> list[int]:
    """Adapter index of each of n rows."""
    if mix == "identical":
        return [0] * n
    if mix == "uniform":
        return torch.randint(0, math.ceil(math.sqrt(n)), (n,), generator=gen).tolist()
    if mix == "skewed":
        p = torch.tensor([1 / (i + 1) ** 1.5 for i in range(n)])
        return torch.multinomial(p, n, replacement=True, generator=gen).tolist()
    if mix == "distinct":
        return list(range(n))
    raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")


def _inputs(case: Case, gen: torch.Generator, device, dtype):
    """One input set: x, W, the used adapters (A_i, B_i, scale 1), row slots."""
    rows_to = assign(case.mix, case.rows, gen)
    used = sorted(set(rows_to))
    remap = {a: i for i, a in enumerate(used)}
    slots = torch.tensor([remap[a] for a in rows_to], device=device)
    ranks = [case.rank if case.rank != "mixed" else MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(len(used))]
    rnd = lambda *s: (torch.randn(*s, device=device, dtype=torch.float32) / math.sqrt(s[-1])).to(dtype)
    A = [rnd(r, case.d_in) for r in ranks]
    B = [rnd(case.d_out, r) for r in ranks]
    x = torch.randn(case.rows, case.T, case.d_in, device=device, dtype=dtype)
    W = rnd(case.d_out, case.d_in)
    return x, W, A, B, slots


def _addon_bytes(case: Case, A, B, elt: int = 2) -> int:
    return elt * (
        case.tokens * case.d_in + sum(a.numel() for a in A) + sum(b.numel() for b in B) + case.tokens * case.d_out
    )


def _peft_layer(case: Case, W, A, B, device, dtype):
    """A PEFT LoRA layer over the same base weight with every used adapter loaded."""
    from peft import LoraConfig, PeftModel, get_peft_model

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(case.d_in, case.d_out, bias=False)

        def forward(self, x):
            return self.lin(x)

    model = None
    for i, (a, _) in enumerate(zip(A, B)):
        cfg = LoraConfig(r=a.shape[0], lora_alpha=a.shape[0], target_modules=["lin"])
        if model is None:
            model = get_peft_model(One(), cfg, adapter_name=f"t{i}")
        else:
            model.add_adapter(f"t{i}", cfg)
    model = model.to(device, dtype)
    with torch.no_grad():
        model.base_model.model.lin.base_layer.weight.copy_(W)
        for i, (a, b) in enumerate(zip(A, B)):
            model.base_model.model.lin.lora_A[f"t{i}"].weight.copy_(a)
            model.base_model.model.lin.lora_B[f"t{i}"].weight.copy_(b)
    assert isinstance(model, PeftModel)
    return model.eval()


@torch.no_grad()
def run_case(case: Case, bandwidth_gbs: float, peft: bool = True, device="cuda", dtype=torch.bfloat16) -> dict:
    from loraflow.multi import triton_lora

    gen = torch.Generator().manual_seed(
        hash((case.kind, case.d_in, case.d_out, case.rows, case.T, str(case.rank), case.mix)) % 2**31
    )
    first = _inputs(case, gen, device, dtype)
    set_bytes = 2 * (
        first[0].numel() + first[1].numel() + sum(a.numel() + b.numel() for a, b in zip(first[2], first[3]))
    )
    sets = [first] + [_inputs(case, gen, device, dtype) for _ in range(rotations(set_bytes) - 1)]
    x0, W0, A0, B0, slots0 = first
    n_used = len(A0)
    out = {**asdict(case), "adapters": n_used, "rotations": len(sets)}

    # base GEMM alone, and the layer output buffers
    out["base_ms"] = time_ms([lambda s=s: F.linear(s[0], s[1]) for s in sets])
    ones = lambda s: [1.0] * len(s[2])  # unit scales (folded into B)

    if case.kind == "flora":
        flora = [ops.flora_stack([1 + 0.1 * a for a in s[2]], s[3]) for s in sets]
        out["flora_dense_ms"] = time_ms(
            [lambda s=s, f=f: ops.flora_dense_stacked(s[0], s[4], s[1], *f) for s, f in zip(sets, flora)]
        )
        # the server's paths (serve/bank.py), r stacked rows a token: up to rank 16 (at 64, 4096
        # tokens stack 2 GB of rows); the fused kernel, tuned for decode, up to 4096 rows
        if torch.device(device).type == "cuda" and case.rank <= 16:
            rows = [_flora_rows(s, case) for s in sets]
            out["flora_rows_ms"] = time_ms([lambda s=s, r=r: _flora_three(s, r, case) for s, r in zip(sets, rows)])
            if case.tokens * case.rank <= 4096:
                fused = [lambda s=s, r=r: _flora_fused(s, r, case) for s, r in zip(sets, rows)]
                out["flora_fused_ms"] = time_ms(fused)
        stacks = [ops.padded(s[2], s[3], ones(s)) for s in sets]
        out["lora_bmm_layer_ms"] = time_ms(
            [lambda s=s, st=st: F.linear(s[0], s[1]) + ops.bmm_padded(s[0], s[4], *st) for s, st in zip(sets, stacks)]
        )
        packed = [triton_lora.PackedLoRA.pack(s[2], s[3], ones(s)) for s in sets]
        tokens = [s[4].repeat_interleave(case.T) for s in sets]
        variant = triton_lora.choose_variant(case.tokens, n_used)
        plans = [triton_lora.tile_plan(t, len(s[2])) if variant == "tiles" else None for s, t in zip(sets, tokens)]
        out["lora_triton_layer_ms"] = time_ms(
            [
                lambda s=s, p=p, t=t, pl=pl: _triton_layer(s, p, t, pl, case, variant)
                for s, p, t, pl in zip(sets, packed, tokens, plans)
            ]
        )
        out["flora_speedup_vs_bmm"] = out["lora_bmm_layer_ms"] / out["flora_dense_ms"]
        if "flora_rows_ms" in out:
            best = min(out["flora_rows_ms"], out.get("flora_fused_ms", float("inf")))
            out["flora_rows_speedup_vs_bmm"] = out["lora_bmm_layer_ms"] / best
            out["flora_rows_speedup_vs_triton"] = out["lora_triton_layer_ms"] / best
        return out

    tokens = [s[4].repeat_interleave(case.T) for s in sets]
    packed = [triton_lora.PackedLoRA.pack(s[2], s[3], ones(s)) for s in sets]
    variant = triton_lora.choose_variant(case.tokens, n_used)
    plans = [triton_lora.tile_plan(t, len(s[2])) if variant == "tiles" else None for s, t in zip(sets, tokens)]
    ys = [torch.empty(case.tokens, case.d_out, device=device, dtype=dtype) for _ in sets]
    out["triton_variant"] = variant
    out["triton_addon_ms"] = time_ms(
        [
            lambda s=s, t=t, p=p, pl=pl, y=y: triton_lora.lora_delta(
                s[0].view(case.tokens, -1), t, p, variant, pl, out=y
            )
            for s, t, p, pl, y in zip(sets, tokens, packed, plans, ys)
        ]
    )
    out["triton_layer_ms"] = time_ms(
        [
            lambda s=s, p=p, t=t, pl=pl: _triton_layer(s, p, t, pl, case, variant)
            for s, p, t, pl in zip(sets, packed, tokens, plans)
        ]
    )
    stacks = [ops.padded(s[2], s[3], ones(s)) for s in sets]
    out["bmm_addon_ms"] = time_ms([lambda s=s, st=st: ops.bmm_padded(s[0], s[4], *st) for s, st in zip(sets, stacks)])
    out["loop_addon_ms"] = time_ms([lambda s=s: ops.loop(s[0], s[4], s[2], s[3], ones(s)) for s in sets], graph=False)
    out["segmented_addon_ms"] = time_ms(
        [lambda s=s: ops.segmented(s[0], s[4], s[2], s[3], ones(s)) for s in sets], graph=False
    )
    if peft:
        layer = _peft_layer(case, W0, A0, B0, device, dtype)
        names = [f"t{int(i)}" for i in slots0.tolist()]
        out["peft_layer_ms"] = time_ms([lambda: layer(x0, adapter_names=names)], graph=False)
        out["speedup_vs_peft"] = out["peft_layer_ms"] / out["triton_layer_ms"]
    out["addon_bytes"] = _addon_bytes(case, A0, B0)
    out["roofline_ms"] = out["addon_bytes"] / (bandwidth_gbs * 1e9) * 1e3
    out["addon_over_roofline"] = out["triton_addon_ms"] / out["roofline_ms"]
    out["addon_over_base"] = out["triton_addon_ms"] / out["base_ms"]
    return out


def _flora_rows(s, case: Case) -> tuple:
    """The server's FLoRA inputs for one set (``bank.RowCopies``): every token's r stacked rows
    (row i's adapter: a_k = 1 + 0.1 A_i[k], c_k = B_i[:, k] / r, as ``ops.flora_stack``), a bank of their
    rows and a row of ones."""
    _, _, A, B, slots = s
    r = A[0].shape[0]
    dev = A[0].device
    a = torch.cat([1 + 0.1 * x for x in A] + [torch.ones(1, case.d_in, device=dev, dtype=A[0].dtype)])
    c = torch.cat([b.T / r for b in B] + [torch.ones(1, case.d_out, device=dev, dtype=B[0].dtype)]).contiguous()
    n = case.tokens
    tok = torch.arange(n, device=dev).repeat_interleave(r)
    row = slots.repeat_interleave(case.T)[tok] * r + torch.arange(r, device=dev).repeat(n)
    start = torch.arange(n, device=dev) * r
    return tok, row, start, torch.full((n,), r, device=dev), a, c


def _flora_three(s, rows, case: Case):
    """stack, cuBLAS's GEMM, combine: the serving layer's three launches (``BankedLinear._copies``)."""
    from loraflow.multi import triton_flora

    tok, row, start, count, a, c = rows
    u = triton_flora.stack(s[0].view(case.tokens, -1), tok, row, a)
    return triton_flora.combine(F.linear(u, s[1]), c, row, start, count)


def _flora_fused(s, rows, case: Case):
    """The same layer as one Triton kernel (``multi/triton_flora_gemm.py``)."""
    from loraflow.multi.triton_flora_gemm import flora_gemm

    tok, row, start, count, a, c = rows
    return flora_gemm(s[0].view(case.tokens, -1), s[1], tok, row, start, count, a, c, r_cap=case.rank)


def _triton_layer(s, packed, tokens, plan, case: Case, variant: str):
    """The whole layer as the model runs it: Δy from the kernels, then addmm(Δy, x, Wᵀ)."""
    from loraflow.multi import triton_lora

    x2 = s[0].view(case.tokens, -1)
    return torch.addmm(triton_lora.lora_delta(x2, tokens, packed, variant, plan), x2, s[1].T)


def sweep(case: Case, configs: list[dict], device="cuda", dtype=torch.bfloat16) -> list[dict]:
    """Add-on time of each launch configuration on one case (to choose the defaults);
    a config may name its ``variant``."""
    from loraflow.multi import triton_lora

    gen = torch.Generator().manual_seed(0)
    sets = [_inputs(case, gen, device, dtype) for _ in range(8)]
    out = []
    for cfg in configs:
        cfg = dict(cfg)
        variant = cfg.pop("variant", None) or triton_lora.choose_variant(case.tokens, len(sets[0][2]))
        bm = cfg.get("block_m", triton_lora.DEFAULTS["tiles"]["block_m"])
        prep = []
        for s in sets:
            t = s[4].repeat_interleave(case.T)
            prep.append(
                (
                    s[0].view(case.tokens, -1),
                    t,
                    triton_lora.PackedLoRA.pack(s[2], s[3], [1.0] * len(s[2])),
                    triton_lora.tile_plan(t, len(s[2]), bm) if variant == "tiles" else None,
                )
            )
        ms = time_ms([lambda p=p: triton_lora.lora_delta(p[0], p[1], p[2], variant, p[3], config=cfg) for p in prep])
        out.append({"variant": variant, **cfg, "addon_us": ms * 1e3})
    return out


def check_case(case: Case, device="cuda", dtype=torch.bfloat16) -> float:
    """Relative error against a float64 loop (must be < 1e-2 in bf16): the Triton add-on,
    or for FLoRA cases the worst of the dense path and the server's (on CUDA)."""
    from loraflow.multi import triton_lora

    x, W, A, B, slots = _inputs(case, torch.Generator().manual_seed(0), device, dtype)
    if case.kind == "flora":
        served = (x, W, A, B, slots)
        A = [1 + 0.1 * a for a in A]
        ref = ops.flora_loop(x.double(), slots, W.double(), [a.double() for a in A], [b.double() for b in B])
        ys = [ops.flora_dense_stacked(x, slots, W, *ops.flora_stack(A, B))]
        if torch.device(device).type == "cuda" and case.rank <= 16:  # and the server's paths
            rows = _flora_rows(served, case)
            ys += [_flora_three(served, rows, case).view_as(ys[0])]
            if case.tokens * case.rank <= 4096:
                ys += [_flora_fused(served, rows, case).view_as(ys[0])]
        return max(((y.double() - ref).norm() / ref.norm()).item() for y in ys)
    ref = ops.loop(x.double(), slots, [a.double() for a in A], [b.double() for b in B], [1.0] * len(A))
    tokens = slots.repeat_interleave(case.T)
    y = triton_lora.lora_delta(x.view(case.tokens, -1), tokens, triton_lora.PackedLoRA.pack(A, B, [1.0] * len(A)))
    ref = ref.view(case.tokens, -1)
    return ((y.double() - ref).norm() / ref.norm()).item()
