"""FLoRA's code experiment at small scale: LoRA against FLoRA r 1 and r 4, trained on MBPP, scored on
MBPP's test split and HumanEval (pass@1, greedy).

    python examples/code_adapters/run.py                                   # the GPU run: results here
    python examples/code_adapters/run.py --quick --out /tmp/code-adapters  # a CPU smoke run (minutes)

Steps, each a call of the library's own commands:

1. MBPP's train and prompt splits (task ids 601-974 and 1-10) as chat JSONL in --work: user =
   MBPP's prompt (the problem and its first test), assistant = the reference code in a ```python
   block, the form `loraflow eval --task code` extracts (as examples/train_adapters.py's python
   adapter). The test split (11-510) is never trained on.
2. `loraflow finetune` on the default model (SmolLM2-135M-Instruct), all linear layers adapted,
   three times with the same epochs, batch and max length: LoRA r 8 alpha 16, FLoRA r 1, FLoRA r 4,
   each at its method's default peak learning rate (config.DEFAULT_LR: FLoRA's multiplicative
   update needs a larger one than LoRA's). Outputs in --out/{lora,flora-r1,flora-r4}.
3. One `loraflow eval --task code` per benchmark that scores the base model and the three adapters
   together (greedy, --max-tokens 384): MBPP's test split (500 problems) and HumanEval (164).
4. results.json and results.md (a Markdown table: method, rank, trainable parameters, training
   seconds, pass@1 on each benchmark), with the device, the date and the command.

A full run writes the results beside this script; a --quick or --limit run writes them into --out
instead, so that a smoke test never stands in for the experiment's results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import safe_open

from loraflow.evaluate import command as eval_command
from loraflow.evaluate.code import mbpp_training_pairs
from loraflow.finetune import command as finetune_command
from loraflow.finetune.config import DEFAULT_LR
from loraflow.help_format import HelpFormatter
from loraflow.models.loading import DEFAULT_NAME

HERE = Path(__file__).parent
MBPP = HERE.parent / "data" / "mbpp" / "mbpp.jsonl"
# name -> (method, rank, the method's own finetune options)
METHODS = {
    "lora": ("lora", 8, ["--method", "lora", "--r", "8", "--alpha", "16"]),
    "flora-r1": ("flora", 1, ["--method", "flora", "--r", "1"]),
    "flora-r4": ("flora", 4, ["--method", "flora", "--r", "4"]),
}
BENCHMARKS = {
    "mbpp": ["--benchmark", "mbpp", "--data", str(MBPP), "--split", "test"],
    "humaneval": ["--benchmark", "humaneval"],
}
MAX_TOKENS = 384
QUICK = {"rows": 16, "steps": 2, "batch": 2, "limit": 3, "max_tokens": 32}


class Help(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The docstring as written, and each option's default."""


def answer(code: str) -> str:
    """The assistant's turn: the reference solution in a fenced block, where the eval looks for code."""
    return f"```python\n{code.strip()}\n```"


def write_training_data(work: Path, rows: int | None) -> Path:
    """MBPP's train + prompt splits as chat records; its test split stays unseen."""
    records = [
        {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer(code)}]}
        for prompt, code in mbpp_training_pairs(MBPP, splits=("train", "prompt"))
    ]
    path = work / "mbpp-train.jsonl"
    records = records[:rows] if rows else records
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records)} MBPP training records (train + prompt splits) to {path}", flush=True)
    return path


def train(name: str, data: Path, out: Path, args) -> dict:
    """One `loraflow finetune` run; returns its summary."""
    length = ["--steps", str(QUICK["steps"])] if args.quick else ["--epochs", str(args.epochs)]
    batch = QUICK["batch"] if args.quick else args.batch_size
    argv = [
        "--task", "causal-lm", "--data", str(data), *METHODS[name][2], "--targets", "all-linear",
        "--max-length", str(args.max_length), *length, "--batch-size", str(batch), "--seed", "0",
        "--device", args.device, "--out", str(out), "--overwrite",
    ]  # fmt: skip
    print(f"\n== {name}: loraflow finetune {shlex.join(argv)}", flush=True)
    return finetune_command.main(argv)


def evaluate(benchmark: str, adapters: dict[str, Path], out: Path, args) -> dict:
    """One `loraflow eval --task code` run: the base model and every adapter on one benchmark."""
    argv = ["--task", "code", *BENCHMARKS[benchmark], "--base"]
    for name, folder in adapters.items():
        argv += ["--adapter", f"{name}={folder}"]
    max_tokens = QUICK["max_tokens"] if args.quick else MAX_TOKENS
    argv += ["--temperature", "0", "--max-tokens", str(max_tokens), "--batch-size", str(args.eval_batch_size)]
    argv += ["--device", args.device, "--out", str(out)]
    limit = QUICK["limit"] if args.quick else args.limit
    if limit:
        argv += ["--limit", str(limit)]
    print(f"\n== {benchmark}: loraflow eval {shlex.join(argv)}", flush=True)
    return eval_command.main(argv)


def trainable_parameters(adapter: Path) -> int | None:
    """The adapter's parameters: the sizes of the tensors in its weights file."""
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(weights, framework="pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())


def training_seconds(run: Path) -> float | None:
    """The sum of the steps' "seconds" in the run's log.jsonl (training only: dev evaluations excluded)."""
    log = run / "log.jsonl"
    if not log.is_file():
        return None
    seconds = [json.loads(line).get("seconds") for line in log.read_text().splitlines() if line.strip()]
    return round(sum(seconds), 1) if seconds and None not in seconds else None


def learning_rate(run: Path, method: str) -> float:
    """The peak learning rate the run used (its run.json), else the method's default."""
    info = run / "run.json"
    return json.loads(info.read_text())["settings"]["lr"] if info.is_file() else DEFAULT_LR[method]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def cell(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(results: dict) -> str:
    """results.md: the settings, then one table row per model (the base model first)."""
    s = results["settings"]
    n = {b: results["benchmarks"][b]["problems"] for b in BENCHMARKS}
    lines = [
        "# LoRA vs FLoRA on code generation",
        "",
        f"Model {results['model']}; trained on MBPP train + prompt ({s['train_examples']} records, "
        f"{s['length']}, batch {s['batch_size']}, max length {s['max_length']}); "
        f"scored greedy with {s['max_tokens']} new tokens.",
        f"Device: {results['device']}. Date: {results['date']}.",
        "",
        f"Command: `{results['command']}`",
        "",
        f"| model | method | rank | lr | trainable parameters | training s | MBPP test pass@1 ({n['mbpp']}) "
        f"| HumanEval pass@1 ({n['humaneval']}) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {results['model']} | {row['method']} | {cell(row['rank'], 'd')} | {cell(row['lr'], 'g')} "
            f"| {cell(row['trainable_parameters'], ',d')} | {cell(row['training_seconds'], '.1f')} "
            f"| {cell(row['pass@1']['mbpp'], '.3f')} | {cell(row['pass@1']['humaneval'], '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to train and run")
    ap.add_argument("--out", default="runs/code-adapters", help="the runs' folders and the evaluations' outputs")
    ap.add_argument("--work", help="where the training file is written (default: a temporary folder)")
    ap.add_argument("--epochs", type=float, default=3.0, help="passes over the training data, the same for all three")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step, the same for all three")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per training example")
    ap.add_argument("--limit", type=int, help="score only the first N problems of each benchmark")
    ap.add_argument(
        "--eval-batch-size",
        type=int,
        help="rows per generate batch in the evaluation (default: 128 on CUDA, 8 on CPU)",
    )
    ap.add_argument("--quick", action="store_true", help="16 records, 2 steps, 3 problems, 32 tokens: a smoke test")
    args = ap.parse_args()
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    if args.eval_batch_size is None:
        args.eval_batch_size = 128 if args.device.startswith("cuda") else 8
    command = shlex.join(["python", *sys.argv])
    out = Path(args.out)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="code-adapters-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = write_training_data(work, QUICK["rows"] if args.quick else None)
        train_examples = sum(1 for line in data.read_text(encoding="utf-8").splitlines() if line.strip())
        runs = {name: train(name, data, out / name, args) for name in METHODS}
    adapters = {name: out / name for name in METHODS}
    scores = {b: evaluate(b, adapters, out / f"eval-{b}", args) for b in BENCHMARKS}

    rows = [{"name": "base", "method": "base model", "rank": None, "lr": None, "trainable_parameters": None,
             "training_seconds": None, "steps": None}]  # fmt: skip
    for name, (method, rank, _) in METHODS.items():
        rows.append({
            "name": name, "method": method, "rank": rank, "lr": learning_rate(adapters[name], method),
            "trainable_parameters": trainable_parameters(adapters[name]),
            "training_seconds": training_seconds(out / name), "steps": runs[name]["steps"],
        })  # fmt: skip
    for row in rows:
        row["pass@1"] = {b: scores[b]["results"][row["name"]].get("pass@1") for b in BENCHMARKS}
    results = {
        "model": DEFAULT_NAME,
        "device": device_name(args.device),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "settings": {
            "train_examples": train_examples,
            "length": f"{QUICK['steps']} steps" if args.quick else f"{args.epochs:g} epochs",
            "batch_size": QUICK["batch"] if args.quick else args.batch_size,
            "max_length": args.max_length,
            "max_tokens": QUICK["max_tokens"] if args.quick else MAX_TOKENS,
            "temperature": 0.0,
            "limit": QUICK["limit"] if args.quick else args.limit,
            "quick": args.quick,
        },
        "benchmarks": {
            b: {"problems": scores[b]["problems"], "split": scores[b]["split"] if b == "mbpp" else None}
            for b in BENCHMARKS
        },
        "rows": rows,
        "seconds": round(time.time() - started, 1),
    }
    target = out if args.quick or args.limit else HERE  # a partial run never replaces the experiment's results
    target.mkdir(parents=True, exist_ok=True)
    (target / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (target / "results.md").write_text(table)
    print("\n" + table + f"\nwritten to {target / 'results.json'} and {target / 'results.md'} "
          f"in {results['seconds']:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
