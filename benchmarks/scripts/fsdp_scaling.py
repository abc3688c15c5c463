"""Data-parallel scaling of `loraflow pretrain`: the same per-process batch on 1, 2, 4, ...
processes (torchrun, --parallel fsdp or ddp), tokens/s per process against one process
(scaling efficiency), and the first process's peak GPU memory. Each count is one torchrun
of the command; its steady speed is that of the steps after --warmup-steps, from the log's
per-step records (tokens and wall time; the one evaluation and checkpoint come after).

Issue 18's targets (several H200s): 1B GaLore under FSDP2 at least 90% per GPU on 2 and 4
GPUs; 7B GaLore + FSDP2 on 2 GPUs at most 12 GB a GPU at 256 tokens:

    python benchmarks/scripts/fsdp_scaling.py --counts 1 2 4 --config 1b --optimizer galore \
        --batch 16 --seq 256 --dtype bf16-mixed --out benchmarks/results
    python benchmarks/scripts/fsdp_scaling.py --counts 2 --config 7b --optimizer galore8bit --per-layer \
        --activation-checkpointing --batch 1 --seq 256 --dtype bfloat16 --stem fsdp-7b-memory
    python benchmarks/scripts/fsdp_scaling.py --counts 1 2 --config tiny --device cpu --batch 4 --seq 64 \
        --steps 6 --warmup-steps 2 --out /tmp/scaling   # the script itself, on the CPU (gloo)

Writes STEM.json, .md and .png (device, date, command) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from loraflow.bench import report

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "tinyshakespeare" / "input.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, args: argparse.Namespace, out: Path) -> dict:
    """One torchrun of pretrain on ``n`` processes: its steady tokens/s (all processes), the
    last record's peak memory and loss."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", "-m", "loraflow.cli", "pretrain", "--data", args.data, "--config", args.config,
           "--optimizer", args.optimizer, "--rank", str(args.rank), "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--eval-every", str(args.steps), "--eval-seqs", "8",
           "--save-every", str(10**9), "--warmup", "1", "--dtype", args.dtype, "--device", args.device,
           "--parallel", args.parallel, "--out", str(out)]  # fmt: skip
    cmd += ["--per-layer"] * args.per_layer + ["--activation-checkpointing"] * args.activation_checkpointing
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"{n} process(es): {' '.join(cmd[2:])}", file=sys.stderr)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{n} process(es) failed:\n{done.stderr[-3000:]}")
    records = {r["step"]: r for r in map(json.loads, open(out / "log.jsonl"))}
    first, last = records[args.warmup_steps], records[args.steps]
    speed = (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])
    return {"tokens_per_s": speed, "peak_gib": last.get("peak_gib"), "loss": last["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4], help="processes (GPUs) per run")
    ap.add_argument("--parallel", default="fsdp", choices=("fsdp", "ddp"))
    ap.add_argument("--config", default="1b")
    ap.add_argument("--optimizer", default="galore")
    ap.add_argument("--rank", type=int, default=128, help="GaLore's / APOLLO's rank")
    ap.add_argument("--batch", type=int, default=16, help="sequences per process")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=10, help="steps left out of the speed (compile, caches)")
    ap.add_argument("--dtype", default="bf16-mixed")
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--stem", default=None, help="file name (default: fsdp-scaling-CONFIG-OPTIMIZER)")
    args = ap.parse_args()
    if not 0 < args.warmup_steps < args.steps:
        sys.exit("--warmup-steps must be between 0 and --steps")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            result = run(n, args, Path(tmp) / f"run{n}")
            rows.append({"processes": n, **result, "per_process": result["tokens_per_s"] / n})
    base = next((r["per_process"] for r in rows if r["processes"] == 1), None)
    for r in rows:
        r["efficiency"] = r["per_process"] / base if base else None

    env = report.environment()
    title = f"loraflow pretrain --parallel {args.parallel}, {args.config}, {args.optimizer}"
    lines = [
        f"# {title}",
        "",
        f"{env['device']}, {env['date']}, torch {env['torch']}",
        "",
        f"`{env['command']}`",
        "",
        f"{args.batch} x {args.seq} tokens per process a step, {args.dtype}; speed of steps "
        f"{args.warmup_steps + 1}-{args.steps}.",
        "",
        "| processes | tokens/s | per process | efficiency | peak GiB (first process) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        eff = f"{r['efficiency']:.1%}" if r["efficiency"] is not None else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['processes']} | {r['tokens_per_s']:,.0f} | {r['per_process']:,.0f} | {eff} | {peak} |")
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([str(r["processes"]) for r in rows], [r["per_process"] for r in rows])
    ax.set_xlabel("processes (GPUs)")
    ax.set_ylabel("tokens/s per process")
    ax.set_title(title, fontsize=9)
    stem = args.stem or f"fsdp-scaling-{args.config}-{args.optimizer}"
    payload = {**env, "settings": vars(args), "runs": rows}
    for path in report.write(args.out, stem, payload, "\n".join(lines) + "\n", fig):
        print(path)


if __name__ == "__main__":
    main()
