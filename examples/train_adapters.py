"""Rebuild the example adapters that `make serve` serves, with `loraflow finetune`, and check them.

    python examples/train_adapters.py                          # all three, on the GPU if there is one
    python examples/train_adapters.py --only python --install  # retrain one and replace the shipped copy
    python examples/train_adapters.py --quick --out /tmp/ex-adapters   # a CPU smoke run (a few minutes)

The adapters (LoRA r 8, alpha 16 on q/k/v/o: the shape of the shipped ones, in PEFT's layout):

- shakespeare: continues text in the style of the plays. `--task causal-lm` on plain text, the
  first 90% of examples/data/tinyshakespeare/input.txt packed into 256-token chunks (the last 10%
  is held out, never trained on).
- medical: writes a medical abstract about a condition. Chat records {"messages": [user: "Write a
  medical abstract about <condition>.", assistant: <abstract>]} from examples/medical_abstracts/
  train.csv only (its dev.csv stays held out for the classification experiments).
- python: solves a programming problem. Chat records from MBPP's train and prompt splits (task ids
  601-974 and 1-10): user = MBPP's prompt (the problem and its first test), assistant = the
  reference code in a ```python block, the form `loraflow eval --task code` extracts. MBPP's test
  split (11-510) is never trained on: its README reserves it for evaluation, and it is scored below.

Defaults, and why (all through AdamW with a 3% warm-up and cosine decay; 10% of each file is
carved out as a dev split and the adapter with the best dev loss is kept):

- lr 5e-4 for all three: LoRA on the attention projections of a 135M model moves slowly at the
  2e-4 that suits all-linear LoRA on larger models; 5e-4 is within the usual 2e-4..1e-3 and, with
  the cosine decay, stable at batch 8.
- shakespeare 1 epoch (~130 steps of 8 x 256 tokens): enough to take on the style; more epochs
  start to memorise passages, which makes greedy decoding loop (the previous adapters did).
- medical 2 epochs (~420 steps): 1,663 abstracts of ~300 tokens, a genre the model knows little of.
- python 3 epochs (~130 steps): 346 short programs; the fenced-block answer format is learnt in the
  first epoch, the rest sharpens the code.

After training, the python adapter and the base model are scored on MBPP's test split (pass@1,
greedy), and shakespeare and medical each print a greedy 60-token sample from a fixed prompt,
base model and adapter, with the fraction of repeated 4-grams among its tokens (0: no loop).

Outputs go to --out/<name> (default runs/example-adapters/<name>); examples/adapters is only
replaced with --install, which copies each finished adapter's adapter_config.json and
adapter_model.safetensors there, swapping the folder in whole (atomic_write_dir).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from loraflow.atomic import atomic_write_dir
from loraflow.evaluate import command as eval_command
from loraflow.evaluate.code import mbpp_training_pairs
from loraflow.finetune import command as finetune_command
from loraflow.help_format import HelpFormatter

HERE = Path(__file__).parent
DATA = HERE / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
MEDICAL = HERE / "medical_abstracts" / "train.csv"
MBPP = DATA / "mbpp" / "mbpp.jsonl"
INSTALLED = HERE / "adapters"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LORA = ["--method", "lora", "--r", "8", "--alpha", "16", "--targets", "q_proj,k_proj,v_proj,o_proj"]

# per adapter: tokens per example, passes over the data, peak learning rate (see the docstring)
SETTINGS = {
    "shakespeare": {"max_length": 256, "epochs": 1, "lr": 5e-4},
    "medical": {"max_length": 512, "epochs": 2, "lr": 5e-4},
    "python": {"max_length": 512, "epochs": 3, "lr": 5e-4},
}
# --quick: a CPU smoke run of the whole pipeline; the adapters it makes are not meant to be good
QUICK = {"rows": 16, "chars": 20_000, "max_length": 128, "steps": 2, "batch": 2, "limit": 3, "max_tokens": 48}
# greedy samples that show whether an adapter learnt its style, or loops
SAMPLE_PROMPTS = {
    "shakespeare": ("text", "KING HENRY:\nWhat news from France, my lord?\n"),
    "medical": ("chat", "Write a medical abstract about cardiovascular diseases."),
}
SAMPLE_TOKENS = 60


class Help(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The docstring as written, and each option's default."""


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def shakespeare_data(work: Path, quick: bool) -> Path:
    """The first 90% of the plays as one text file; the last 10% is held out."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    train = text[: len(text) * 9 // 10]
    path = work / "shakespeare.txt"
    path.write_text(train[: QUICK["chars"]] if quick else train, encoding="utf-8")
    return path


def medical_data(work: Path, quick: bool) -> Path:
    """Chat records from the medical abstracts' train split (label = the condition's name)."""
    with MEDICAL.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    records = [chat(f"Write a medical abstract about {r['label']}.", r["text"]) for r in rows]
    return write_jsonl(work / "medical.jsonl", records[: QUICK["rows"]] if quick else records)


def python_data(work: Path, quick: bool) -> Path:
    """Chat records from MBPP's train and prompt splits only: its test split is for evaluation."""
    records = [chat(prompt, f"```python\n{code.strip()}\n```") for prompt, code in mbpp_training_pairs(MBPP)]
    return write_jsonl(work / "python.jsonl", records[: QUICK["rows"]] if quick else records)


DATA_WRITERS = {"shakespeare": shakespeare_data, "medical": medical_data, "python": python_data}


def finetune(name: str, data: Path, out: Path, args) -> dict:
    """One `loraflow finetune` run; returns its summary."""
    s = SETTINGS[name]
    max_length = min(s["max_length"], QUICK["max_length"]) if args.quick else s["max_length"]
    steps = QUICK["steps"] if args.quick else args.steps
    length = ["--steps", str(steps)] if steps else ["--epochs", str(s["epochs"])]
    batch = QUICK["batch"] if args.quick else args.batch_size
    argv = [
        "--task", "causal-lm", "--data", str(data), *LORA, "--max-length", str(max_length), *length,
        "--batch-size", str(batch), "--lr", str(s["lr"]), "--device", args.device, "--seed", "0",
        "--out", str(out), "--overwrite",
    ]  # fmt: skip
    print(f"\n== {name}: loraflow finetune {' '.join(argv)}", flush=True)
    return finetune_command.main(argv)


def install(name: str, trained: Path) -> None:
    """Replace examples/adapters/<name> with the trained adapter's two files, as one swap; the config's
    base_model_name_or_path is cut to the model's name, as in the shipped adapters."""
    for file in ADAPTER_FILES:
        if not (trained / file).is_file():
            raise FileNotFoundError(f"{trained / file} is missing: the {name} run did not finish; nothing installed")

    config = json.loads((trained / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if base:  # the model's folder name, not this machine's path to it
        config["base_model_name_or_path"] = Path(base).name

    def write(folder: Path) -> None:
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(trained / "adapter_model.safetensors", folder / "adapter_model.safetensors")

    atomic_write_dir(INSTALLED / name, write)
    print(f"installed {trained} -> {INSTALLED / name}", flush=True)


def repeated_4grams(ids: list[int]) -> float:
    """The fraction of the 4-grams of ``ids`` that occurred before in it (0: none repeats; a loop -> 1)."""
    grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def samples(name: str, adapter: Path, device: str) -> dict:
    """Greedy SAMPLE_TOKENS-token continuations of the fixed prompt, by the base model and the adapter."""
    import loraflow as lf

    model, tok = lf.load_model(device=device)
    model.eval()
    kind, prompt = SAMPLE_PROMPTS[name]
    if kind == "chat":
        messages = [{"role": "user", "content": prompt}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], device=device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = {}
    for who in ("base", name):
        if who == name:
            lf.load_adapter(model, adapter, name=name)
        new = model.generate(ids, max_new_tokens=SAMPLE_TOKENS, do_sample=False, pad_token_id=pad)[0, ids.shape[1] :]
        text = tok.decode(new, skip_special_tokens=True)
        out[who] = {"text": text, "tokens": len(new), "repeated_4grams": round(repeated_4grams(new.tolist()), 3)}
        print(f"-- {who}: {len(new)} tokens, repeated 4-grams {out[who]['repeated_4grams']:.2f}\n{text}\n", flush=True)
    return out


def code_eval(adapter: Path, root: Path, args) -> dict:
    """pass@1 of the base model and the python adapter on MBPP's test split, one batched run."""
    argv = [
        "--task", "code", "--benchmark", "mbpp", "--data", str(MBPP), "--split", "test", "--base",
        "--adapter", f"python={adapter}", "--device", args.device, "--out", str(root / "eval-mbpp"),
    ]  # fmt: skip
    if args.quick:
        argv += ["--limit", str(QUICK["limit"]), "--max-tokens", str(QUICK["max_tokens"])]
    print(f"\n== python: loraflow eval {' '.join(argv)}", flush=True)
    summary = eval_command.main(argv)
    scores = {name: r["pass@1"] for name, r in summary["results"].items()}
    for name, p in scores.items():
        print(f"MBPP test pass@1 ({summary['problems']} problems) {name}: {p:.3f}", flush=True)
    return {"problems": summary["problems"], "pass@1": scores}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.add_argument("--only", choices=sorted(DATA_WRITERS), help="train only this adapter")
    ap.add_argument("--out", default="runs/example-adapters", help="one run folder per adapter under it")
    ap.add_argument("--work", help="where the training files are written (default: a temporary folder)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to train and run")
    ap.add_argument("--steps", type=int, help="optimizer steps for every adapter (instead of the epochs above)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step")
    ap.add_argument("--quick", action="store_true", help="tiny data and 2 steps each: a smoke run on CPU")
    ap.add_argument("--install", action="store_true", help="copy the trained adapters into examples/adapters")
    args = ap.parse_args()
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.install and args.quick:
        ap.error("--install copies the adapters that `make serve` serves: not from a --quick run")
    root = Path(args.out)
    names = [args.only] if args.only else list(DATA_WRITERS)
    report, started = {}, time.time()
    with tempfile.TemporaryDirectory(prefix="train-adapters-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            out = root / name
            summary = finetune(name, DATA_WRITERS[name](work, args.quick), out, args)
            report[name] = {"out": str(out), "steps": summary["steps"], "best": summary.get("best")}
            if name in SAMPLE_PROMPTS:
                print(f"\n== {name}: greedy samples", flush=True)
                report[name]["samples"] = samples(name, out, args.device)
            else:
                report[name]["mbpp"] = code_eval(out, root, args)
    if args.install:
        for name in names:
            install(name, root / name)
    report["seconds"] = round(time.time() - started, 1)
    (root / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ndone in {report['seconds']:.0f} s; summary in {root / 'summary.json'}", flush=True)


if __name__ == "__main__":
    main()
