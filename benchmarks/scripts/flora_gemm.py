"""The fused FLoRA GEMM (``multi/triton_flora_gemm.py``, one launch) against the three-launch path
(``triton_flora.stack``, cuBLAS ``F.linear``, ``triton_flora.combine``) and against the plain base GEMM
``F.linear(x, W0)`` of the same N tokens, on Llama-2-7B's layer shapes in bf16 at decode (N = 64).

Cases: every token FLoRA of rank r (r stacked rows a token, each token its own adapter: M = N·r),
and "base" (one row a token scaled by the bank's row of ones: M = N). Each method is timed as a
CUDA graph of back-to-back calls that cycle through enough copies of W0 to overflow the L2 cache
(so W0 comes from HBM, as in a model's forward), replayed ``--iters`` times after warm-up; the time
of a call is the median replay over the calls in it. GB/s counts the bytes of W0 alone.

    python benchmarks/scripts/flora_gemm.py [--out benchmarks/results] [--tokens 64] [--iters 50]

Writes ``flora-gemm-<device>.json``, ``.md`` and ``.png`` to ``--out``. GPU only.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (d_in, d_out): q/k/v/o, gate/up, down
METHODS = ("base", "three_launch", "fused")
LABELS = ("base GEMM, N rows", "stack + cuBLAS + combine", "fused flora_gemm")


def short_name(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device)
    return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-")).lower()


def batch(n: int, rank: int | None, d_in: int, d_out: int, g: torch.Generator):
    """Token-major rows: ``rank`` rows a token, each token its own adapter; rank None: one row of ones a token."""
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(n, d_in, generator=g, device=dev).to(bf)
    r = rank or 1
    m = n * r
    rows = m + 1  # the last bank row is the row of ones
    a = (1 + 0.1 * torch.randn(rows, d_in, generator=g, device=dev)).to(bf)
    c = (1 + 0.1 * torch.randn(rows, d_out, generator=g, device=dev)).to(bf)
    a[-1], c[-1] = 1, 1
    i32 = dict(device=dev, dtype=torch.int32)
    tok = torch.arange(n, **i32).repeat_interleave(r)
    row = torch.arange(m, **i32) if rank else torch.full((m,), rows - 1, **i32)
    start = torch.arange(n, **i32) * r
    count = torch.full((n,), r, **i32)
    return x, tok, row, start, count, a, c


def graph_time_us(call, copies: int, iters: int) -> tuple[float, int]:
    """Median µs of one ``call(i)`` (i: which copy of W0) in a CUDA graph of back-to-back calls."""
    calls = copies * math.ceil(16 / copies)
    for i in range(copies):  # warm-up (and autotuning) outside the graph
        call(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i % copies)
    for _ in range(3):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for e0, e1 in events:
        e0.record()
        graph.replay()
        e1.record()
    torch.cuda.synchronize()
    ms = statistics.median(e0.elapsed_time(e1) for e0, e1 in events)
    return 1e3 * ms / calls, calls


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    labels = [f"{r['d_in']}→{r['d_out']}\n{r['case']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.5))
    width = 0.27
    for k, (name, label) in enumerate(zip(METHODS, LABELS, strict=True)):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ax.bar(xs, [r[f"{name}_us"] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("µs per call")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", ncols=3, fontsize=8)
    ax.set_ylim(top=1.15 * max(r[f"{m}_us"] for r in rows for m in METHODS))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON, Markdown and PNG")
    ap.add_argument("--tokens", type=int, default=64, help="N, tokens in the batch")
    ap.add_argument("--ranks", default="1,2,4", help="FLoRA ranks (every token of that rank)")
    ap.add_argument("--iters", type=int, default=50, help="timed graph replays (at least 50)")
    ap.add_argument("--config", help="BLOCK_M,BLOCK_N,BLOCK_K,warps,stages for the fused kernel, not autotuned")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("flora_gemm.py times CUDA kernels: no CUDA device is visible here")
    import triton

    from loraflow.multi import triton_flora_gemm
    from loraflow.multi.triton_flora import combine, stack

    config = tuple(int(v) for v in args.config.split(",")) if args.config else None
    iters = max(50, args.iters)
    device = torch.cuda.get_device_name()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    g = torch.Generator("cuda").manual_seed(0)
    n, rows, failures = args.tokens, [], []
    for d_in, d_out in SHAPES:
        w_bytes = d_in * d_out * 2
        copies = max(2, math.ceil(3 * l2 / w_bytes))
        weights = [(torch.randn(d_out, d_in, generator=g, device="cuda") / d_in**0.5).bfloat16() for _ in range(copies)]
        for rank in [None] + [int(r) for r in args.ranks.split(",")]:
            x, tok, row, start, count, a, c = batch(n, rank, d_in, d_out, g)
            r_cap = rank or 1

            def base(i, x=x):
                return F.linear(x, weights[i])

            def three(i, x=x, tok=tok, row=row, start=start, count=count, a=a, c=c):
                return combine(F.linear(stack(x, tok, row, a), weights[i]), c, row, start, count)

            def fused(i, x=x, tok=tok, row=row, start=start, count=count, a=a, c=c, r_cap=r_cap):
                return triton_flora_gemm.flora_gemm(
                    x, weights[i], tok, row, start, count, a, c, r_cap=r_cap, config=config
                )

            want, got = three(0).float(), fused(0).float()
            rel = ((got - want).norm() / want.norm()).item()
            max_abs = (got - want).abs().max().item()
            ok = rel < 1e-2 and max_abs < 0.05 * want.abs().max().item()
            if not ok:
                failures.append((d_in, d_out, rank))
            out = {"d_in": d_in, "d_out": d_out, "case": f"r={rank}" if rank else "base", "N": n, "M": len(tok)}
            for name, fn in zip(METHODS, (base, three, fused), strict=True):
                us, calls = graph_time_us(fn, copies, iters)
                out[f"{name}_us"] = us
                out[f"{name}_GBps"] = w_bytes / (us * 1e-6) / 1e9
            best = getattr(triton_flora_gemm._tuned, "best_config", None)
            out |= {
                "fused_vs_three_launch": out["three_launch_us"] / out["fused_us"],
                "fused_over_base": out["fused_us"] / out["base_us"],
                "rel_err_fused_vs_three_launch": rel,
                "max_abs_err_fused_vs_three_launch": max_abs,
                "check_ok": ok,
                "fused_config": str(config) if config else str(best),
                "weight_copies": copies,
                "calls_per_graph": calls,
            }
            rows.append(out)
            print(
                f"{d_in:6d}→{d_out:<6d} {out['case']:5s} M={out['M']:4d}  base {out['base_us']:7.1f} µs  "
                f"3-launch {out['three_launch_us']:7.1f} µs  fused {out['fused_us']:7.1f} µs "
                f"({out['fused_GBps']:5.0f} GB/s)  rel err {rel:.1e}{'' if ok else '  MISMATCH'}",
                flush=True,
            )
        weights.clear()
        torch.cuda.empty_cache()
    short = short_name(device)
    command = "python benchmarks/scripts/flora_gemm.py " + " ".join(sys.argv[1:])
    result = {
        "device": device,
        "device_short": short,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command.strip(),
        "dtype": "bfloat16",
        "tokens": n,
        "timed_replays": iters,
        "l2_bytes": l2,
        "gbps_counts": "bytes of W0 only (d_in·d_out·2) over the time of one call",
        "rows": rows,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"flora-gemm-{short}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    head = (
        "| d_in → d_out | case | M | base µs (GB/s) | stack+cuBLAS+combine µs (GB/s) | fused µs (GB/s) "
        "| 3-launch / fused | rel err |"
    )
    lines = [
        f"# FLoRA GEMM on {device}",
        "",
        f"{result['date']}, torch {torch.__version__}, triton {triton.__version__}, bf16, N = {n} tokens; "
        f"CUDA-graph replays of back-to-back calls over copies of W0 larger than L2, median of {iters}; "
        "GB/s = bytes of W0 / time.",
        "",
        f"`{result['command']}`",
        "",
        head,
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{r[f'{m}_us']:.1f} ({r[f'{m}_GBps']:.0f})" for m in METHODS]
        lines.append(
            f"| {r['d_in']} → {r['d_out']} | {r['case']} | {r['M']} | {' | '.join(cells)} | "
            f"{r['fused_vs_three_launch']:.2f}× | {r['rel_err_fused_vs_three_launch']:.1e} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    plot(rows, stem.with_suffix(".png"), f"FLoRA layer, bf16, N={n}, {device}")
    if failures:
        sys.exit(f"fused differs from stack + cuBLAS + combine beyond bf16 tolerance at {failures}")


if __name__ == "__main__":
    main()
