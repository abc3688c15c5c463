"""FLoRA's two training paths on one linear layer, forward + backward, W0 frozen: r products with
W0 (``FLoRAProducts``) against one GEMM with the materialised W0 ∘ M (``FLoRAWeight``, what
``FLoRA.forward`` uses in training past rank 1). Prints milliseconds per pass and their ratio.

    python benchmarks/scripts/flora_training_paths.py [--device cuda] [--tokens 4096]
"""

import argparse
import platform
import time
from datetime import UTC, datetime

import torch

from loraflow.adapters.flora import FLoRAProducts, FLoRAWeight

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
ap.add_argument("--tokens", type=int, default=4096)
ap.add_argument("--d-in", type=int, default=576)  # SmolLM2-135M's hidden size
ap.add_argument("--d-out", type=int, default=1536)  # and its MLP width
args = ap.parse_args()
dev = args.device
bf16 = dev.startswith("cuda")
name = torch.cuda.get_device_name() if bf16 else (platform.processor() or "cpu")
print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {name}, torch {torch.__version__}, "
      f"{'bf16 autocast' if bf16 else 'float32'}; tokens {args.tokens}, {args.d_in} -> {args.d_out}")  # fmt: skip


def timed(fn, x, a, b, w0, reps: int) -> float:
    def once():
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=bf16):
            y = fn.apply(x, a, b, w0)
        y.float().square().mean().backward()

    once()
    if bf16:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        once()
    if bf16:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


print("| r | products ms | weight ms | products / weight |")
print("|---|---|---|---|")
for r in (1, 2, 4, 8):
    g = torch.Generator(device="cpu").manual_seed(r)
    x = torch.randn(args.tokens, args.d_in, generator=g).to(dev, torch.bfloat16 if bf16 else torch.float32)
    x.requires_grad_()
    w0 = (torch.randn(args.d_out, args.d_in, generator=g) * 0.02).to(dev, x.dtype)
    a = (1 + 0.1 * torch.randn(r, args.d_in, generator=g)).to(dev).requires_grad_()
    b = (1 + 0.1 * torch.randn(args.d_out, r, generator=g)).to(dev).requires_grad_()
    reps = 20 if bf16 else 3
    p, w = timed(FLoRAProducts, x, a, b, w0, reps), timed(FLoRAWeight, x, a, b, w0, reps)
    print(f"| {r} | {p:.2f} | {w:.2f} | {p / w:.2f} |")
