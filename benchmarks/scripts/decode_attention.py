"""The paged decode-attention kernel against its bytes: a Llama-2-7B layer's decode attention
(64 sequences, 32 heads of 128, pages of 16 rows, scattered) at several context lengths,
for each tiling (one program a whole context, or the context split in chunks), against the
time its keys and values take at the measured copy bandwidth (the table as wide as ``--max-len``, as
the engine's are), and against PyTorch's
flash attention over the same keys and values stored contiguously (no paging: what a
dense kernel reaches on the same bytes). ``--old FILE`` also times another version of
``serve/paged_attention.py`` (the one before a change), in the same process.

    python benchmarks/scripts/decode_attention.py OUT.json [--old path/to/paged_attention.py]
"""

import argparse
import importlib.util
import json
import platform
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from loraflow.serve.paged_attention import paged_decode_attention, paged_decode_reference

B, H, D, PAGE = 64, 32, 128, 16


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read plus write)."""
    x = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() * 2 / (ms * 1e-3)


def case(ctx: int, max_len: int, g: torch.Generator):
    """Random q, keys, values and scattered pages; the block table as wide as ``max_len``."""
    width = -(-ctx // PAGE)
    pages = B * width + 1
    k = torch.randn(pages * PAGE, H, D, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    used = torch.randperm(pages - 1, generator=g, device="cuda")[: B * width].view(B, width).int()
    table = torch.zeros(B, max(width, max_len // PAGE), dtype=torch.int32, device="cuda")
    table[:, :width] = used
    q = torch.randn(B, H, D, generator=g, device="cuda", dtype=torch.bfloat16)
    lengths = torch.full((B,), ctx, device="cuda")
    return q, k, v, table, lengths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--old", help="another paged_attention.py to time beside this one")
    ap.add_argument("--contexts", default="176,1088")
    ap.add_argument("--max-len", type=int, default=4096, help="block-table width in positions (the engine's max_len)")
    args = ap.parse_args()
    old = None
    if args.old:
        spec = importlib.util.spec_from_file_location("old_paged_attention", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    bw = copy_bandwidth()
    g = torch.Generator("cuda").manual_seed(0)
    rows = []
    for ctx in [int(c) for c in args.contexts.split(",")]:
        q, k, v, table, lengths = case(ctx, args.max_len, g)
        kv_bytes = 2 * B * ctx * H * D * 2
        ref = paged_decode_reference(q, k, v, table, lengths, PAGE).float()
        variants = {"old": (lambda: old.paged_decode_attention(q, k, v, table, lengths, PAGE))} if old else {}
        for splits in (1, 2, 4, 8):
            for n, w in ((16, 4), (32, 4), (32, 2), (64, 4)):
                variants[f"splits={splits} block_n={n} warps={w}"] = lambda sp=splits, n=n, w=w: paged_decode_attention(
                    q, k, v, table, lengths, PAGE, splits=sp, block_n=n, num_warps=w
                )
        pages = table[:, : -(-ctx // PAGE)].long()
        kd, vd = (t.view(-1, PAGE, H, D)[pages].flatten(1, 2)[:, :ctx] for t in (k, v))  # (B, ctx, H, D)
        kd, vd = kd.transpose(1, 2).contiguous(), vd.transpose(1, 2).contiguous()  # (B, H, ctx, D)
        variants["dense flash (not paged)"] = lambda: F.scaled_dot_product_attention(q[:, :, None], kd, vd)[:, :, 0]
        for name, fn in variants.items():
            try:
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
            except Exception as e:  # a tiling that does not compile on this GPU: recorded
                rows.append({"context": ctx, "variant": name, "error": repr(e)[:300]})
                continue
            rows.append(
                {
                    "context": ctx,
                    "variant": name,
                    "us": 1e3 * ms,
                    "rel_err": err,
                    "roofline_us": 1e6 * kv_bytes / bw,
                    "of_roofline": kv_bytes / bw / (ms * 1e-3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python benchmarks/scripts/decode_attention.py {args.out} --contexts {args.contexts} "
        f"--max-len {args.max_len}" + (" --old OLD" if old else ""),
        "copy_bandwidth_GBps": bw / 1e9,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    for ctx in sorted({r["context"] for r in rows}):
        best = sorted((r for r in rows if r["context"] == ctx and "us" in r), key=lambda r: r["us"])
        for r in best[:3] + [r for r in best if r["variant"] in ("old", "dense flash (not paged)")]:
            print(f"ctx {ctx:5d}  {r['variant']:40s} {r['us']:8.1f} us  {r['of_roofline']:.0%} of roofline")


if __name__ == "__main__":
    main()
