"""The adapters' rows of this example's table: the embedded SmolLM2-135M-Instruct as a classifier
of the 5 conditions, trained with `loraflow finetune` (LoRA, FLoRA, Deep LoRA) and scored with
`loraflow eval` on dev.csv, against transformers + PEFT with the same settings and the
TF-IDF baseline; then the few-shot regime (64 and 256 training rows, three seeds).

    python examples/medical_abstracts/run_adapters.py --out runs/medical        # GPU: a few minutes
    python examples/medical_abstracts/run_adapters.py --out /tmp/med --quick    # CPU smoke run

The full-data LoRA run and the PEFT baseline run alone, one after the other, so that their
wall-clock times compare; the other runs share the GPU (--parallel processes at once).
Writes results/adapters.json, results/adapters.md and results/fewshot.png beside this script
(with --quick: under --out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = {  # method -> finetune options (the settings: r 8, alpha 16, every linear layer)
    "lora": ["--method", "lora", "--r", "8", "--alpha", "16", "--lr", "5e-4"],
    "flora": ["--method", "flora", "--r", "8", "--lr", "2e-3"],
    "deep-lora": ["--method", "deep-lora", "--r", "8", "--lr", "1e-3"],
}


def finetune_and_eval(name: str, train: str, method: str, epochs: float, batch: int, seed: int, args) -> dict:
    out = Path(args.out) / name
    cli = [sys.executable, "-m", "loraflow.cli"]
    model = ["--model", args.model] if args.model else []
    started = time.perf_counter()
    subprocess.run(
        [*cli, "finetune", "--task", "classification", "--data", train, "--dev", str(HERE / "dev.csv"),
         *METHODS[method], "--max-length", str(args.max_length), "--epochs", str(epochs), "--batch-size",
         str(batch), "--seed", str(seed), "--device", args.device, "--out", str(out), "--overwrite",
         "--no-progress", *model, *(["--eval-every", str(args.eval_every)] if args.eval_every else []),
         *(["--group-by-length"] if args.group_by_length else [])],
        check=True,
    )  # fmt: skip
    wall = time.perf_counter() - started
    subprocess.run(
        [*cli, "eval", "--adapter", str(out), "--data", str(HERE / "dev.csv"), "--out", str(out / "eval"),
         "--max-length", str(args.max_length), "--device", args.device, *model],
        check=True,
    )  # fmt: skip
    print(f"{time.strftime('%H:%M:%S')} {name}: trained in {wall:.0f} s", flush=True)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    resolved = json.loads((out / "run.json").read_text())["resolved"]
    return {
        "run": name, "method": method, "train": Path(train).name, "n_train": _rows(train), "seed": seed,
        "epochs": epochs, "train_seconds": sum(r["seconds"] for r in log), "process_seconds": wall,
        **{k: metrics[k] for k in ("macro_f1", "accuracy", "macro_auc")},
        "top1": metrics["top_k_accuracy"]["1"], "top3": metrics["top_k_accuracy"].get("3"),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "padding_free": resolved["padding_free"],
        "group_by_length": args.group_by_length,
    }  # fmt: skip


def peft(args, epochs: float, batch: int) -> dict:
    out = Path(args.out) / "peft-lora"
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, str(HERE / "peft_baseline.py"), "--train", str(args.train), "--dev", str(HERE / "dev.csv"),
         *(["--group-by-length"] if args.group_by_length else []),
         "--out", str(out), "--epochs", str(epochs), "--batch-size", str(batch), "--lr", "5e-4",
         "--max-length", str(args.max_length), "--device", args.device,
         *(["--model", args.model] if args.model else [])],
        check=True,
    )  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    return {
        "run": "transformers+PEFT lora" + (" grouped" if args.group_by_length else ""),
        "method": "peft-lora", "train": Path(args.train).name,
        "n_train": _rows(args.train), "seed": 0, "epochs": epochs, "train_seconds": m["train_seconds"],
        "process_seconds": time.perf_counter() - started, "macro_f1": m["macro_f1"], "accuracy": m["accuracy"],
        "macro_auc": m["macro_auc"], "top1": m["top_k_accuracy"]["1"], "top3": m["top_k_accuracy"].get("3"),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "group_by_length": args.group_by_length,
    }  # fmt: skip


def _replace(results: list[dict], row: dict) -> list[dict]:
    return [r for r in results if r["run"] != row["run"]] + [row]


def _rows(path) -> int:
    import csv

    with open(path, newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the runs")
    ap.add_argument("--model", help="a local model folder (default: the embedded model)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--epochs", type=float, default=3.0, help="epochs of the full-data runs")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--eval-every", type=int, help="dev evaluations' spacing in steps (default finetune's)")
    ap.add_argument("--parallel", type=int, default=6, help="runs sharing the GPU at once (few-shot, FLoRA, ...)")
    ap.add_argument("--group-by-length", action="store_true", help="both loops batch rows of about one length")
    ap.add_argument(
        "--only",
        help="with --part rest: only the runs whose names start with one of these comma-separated "
        "prefixes (e.g. deep-lora,flora-256), to split the grid over several sessions",
    )
    ap.add_argument("--quick", action="store_true", help="a CPU smoke run: 64 rows, a fraction of an epoch")
    ap.add_argument(
        "--part",
        choices=["main", "peft", "rest", "all"],
        default="all",
        help="main: LoRA and the PEFT baseline; rest: FLoRA, Deep LoRA and few-shot (added to main's)",
    )
    args = ap.parse_args()
    args.train = str(HERE / ("train_64_seed0.csv" if args.quick else "train.csv"))
    epochs = 0.25 if args.quick else args.epochs
    folder = Path(args.out) if args.quick else HERE / "results"
    saved = folder / "adapters.json"
    results = json.loads(saved.read_text())["runs"] if saved.is_file() else []  # a run done again replaces its row
    grouped = " grouped" if args.group_by_length else ""
    if args.part in ("main", "all"):  # alone: its time counts
        results = _replace(results, finetune_and_eval("lora" + grouped, args.train, "lora", epochs, 16, 0, args))
    if args.part in ("main", "peft", "all"):
        results = _replace(results, peft(args, epochs, 16))  # alone too
    jobs = [("flora", args.train, "flora", epochs, 16, 0), ("deep-lora", args.train, "deep-lora", epochs, 16, 0)]
    if args.part in ("rest", "all"):
        for n, few_epochs, batch in ((64, 10, 8), (256, 5, 16)):
            for seed in (0, 1, 2):
                for method in METHODS:
                    train = str(HERE / f"train_{n}_seed{seed}.csv")
                    jobs.append(
                        (f"{method}-{n}-s{seed}", train, method, 0.25 if args.quick else few_epochs, batch, seed)
                    )
        if args.only:
            jobs = [j for j in jobs if j[0].startswith(tuple(p for p in args.only.split(",") if p))]
            if not jobs:
                ap.error(f"--only {args.only!r} matches none of the runs")
        if args.quick:
            jobs = jobs[:5]
    if args.part in ("rest", "all"):
        rerun = {j[0] for j in jobs}  # a run done again replaces its earlier row
        results = [r for r in results if r["run"] not in rerun]
        with ThreadPoolExecutor(args.parallel) as pool:
            results += list(pool.map(lambda j: finetune_and_eval(*j, args), jobs))
    import torch

    env = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "examples/medical_abstracts/run_adapters.py", *sys.argv[1:]]),
    }
    write(folder, env, results)


def write(folder: Path, env: dict, results: list[dict], note: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    saved = {"environment": env, **({"note": note} if note else {}), "runs": results}
    (folder / "adapters.json").write_text(json.dumps(saved, indent=1) + "\n")
    tfidf = {r["train_file"]: r for r in json.loads((HERE / "results" / "tfidf.json").read_text())}
    lines = [f"{env['device']}, {env['date']}; command: `{env['command']}`", "", *([note, ""] if note else []),
             "| run | training rows | batches | macro-F1 | top-1 | top-3 | macro-AUC | training s | process s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in [r for r in results if r["n_train"] > 256]:
        batches = "packed" if r.get("padding_free") else "padded"
        batches += ", by length" if r.get("group_by_length") else ""
        lines.append(
            f"| {r['run']} | {r['n_train']} | {batches} | {r['macro_f1']:.3f} | {r['top1']:.3f} | {r['top3']:.3f} | "
            f"{r['macro_auc']:.3f} | {_seconds(r['train_seconds'])} | {_seconds(r['process_seconds'])} |"
        )
    lines += ["", "Few-shot (mean ± sd over seeds 0, 1, 2; dev macro-F1):", "",
              "| training rows | TF-IDF + LR | LoRA | FLoRA | Deep LoRA |", "|---|---|---|---|---|"]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in (64, 256):
        cells = [_mean_sd([t["macro_f1"] for k, t in tfidf.items() if k.startswith(f"train_{n}_")])]
        for method in METHODS:
            cells.append(_mean_sd([r["macro_f1"] for r in results if r["run"].startswith(f"{method}-{n}-")]))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for method in ["tfidf", *METHODS]:
        xs, ys = [], []
        for n in (64, 256, 1848):
            if method == "tfidf":
                vals = [
                    t["macro_f1"]
                    for k, t in tfidf.items()
                    if k.startswith(f"train_{n}_") or (n > 256 and k == "train.csv")
                ]
            else:
                vals = [r["macro_f1"] for r in results if r["method"] == method and r["n_train"] == n]
            if vals:
                xs.append(n), ys.append(sum(vals) / len(vals))
        ax.plot(xs, ys, marker="o", label=method)
    ax.set(xscale="log", xlabel="training rows", ylabel="dev macro-F1", title="medical abstracts: dev macro-F1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "fewshot.png", dpi=110)
    (folder / "adapters.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"  # none: the run shared the GPU (its time says little)


def _mean_sd(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f} (one seed)"
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {sd:.3f}"


if __name__ == "__main__":
    main()
