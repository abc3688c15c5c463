"""`loraflow serve` on the CPU with 1 and 2 PyTorch threads, on idle cores and beside another
process that keeps both cores busy with PyTorch matmuls (a small training run's load): the
seconds a 20-token greedy completion takes (SmolLM2-135M, three requests per case).

    .venv/bin/python benchmarks/scripts/serve_threads_cpu.py [--out benchmarks/results]

Writes serve-threads-cpu.{json,md,png}. The server's default is --threads (physical cores - 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

BURN = "import torch\ntorch.set_num_threads(2)\na = torch.randn(256, 256)\nwhile True:\n    a @ a\n"
BODY = {
    "model": "SmolLM2-135M-Instruct",
    "prompt": "Tell me a story about a cat.",
    "max_tokens": 20,
    "temperature": 0,
    "ignore_eos": True,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case(threads: int, busy: bool, requests: int = 3) -> list[float]:
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loraflow.cli",
            "serve",
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--no-log-requests",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    burner = None
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        httpx.post(url + "/v1/completions", json={**BODY, "max_tokens": 2}, timeout=300)  # warm-up
        if busy:
            burner = subprocess.Popen([sys.executable, "-c", BURN])
            time.sleep(2)
        seconds = []
        for _ in range(requests):
            start = time.perf_counter()
            r = httpx.post(url + "/v1/completions", json=BODY, timeout=600)
            r.raise_for_status()
            seconds.append(round(time.perf_counter() - start, 2))
        return seconds
    finally:
        if burner is not None:
            burner.kill()
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows = []
    for busy in (False, True):
        for threads in (1, 2):
            seconds = case(threads, busy)
            rows.append({"threads": threads, "cores_busy": busy, "seconds": seconds})
            print(rows[-1], flush=True)
    env = {
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
    }
    out = Path(args.out)
    (out / "serve-threads-cpu.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    lines = [
        "# `loraflow serve` on the CPU: threads, idle and beside a busy process",
        "",
        f"- device: {env['device']}; date: {env['date']}",
        f"- command: `{env['command']}`",
        "- 20-token greedy completions on SmolLM2-135M through the HTTP API, three per case; "
        "'busy': another process runs PyTorch matmuls on 2 threads",
        "",
        "| --threads | other process | seconds per completion |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['threads']} | {'busy' if r['cores_busy'] else 'none'} | {', '.join(f'{s:.2f}' for s in r['seconds'])} |"
        for r in rows
    ]
    (out / "serve-threads-cpu.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['threads']} thread{'s' * (r['threads'] > 1)}, {'busy' if r['cores_busy'] else 'idle'}" for r in rows]
    ax.bar(labels, [max(r["seconds"]) for r in rows], color="#ccc", label="slowest of 3")
    ax.bar(labels, [min(r["seconds"]) for r in rows], color="#36c", label="fastest of 3")
    title = f"loraflow serve on {os.cpu_count()} CPU cores"
    ax.set(ylabel="seconds per 20-token completion", yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "serve-threads-cpu.png", dpi=120)
    print("wrote", out / "serve-threads-cpu.md")


if __name__ == "__main__":
    main()
