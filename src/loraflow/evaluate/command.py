"""``loraflow eval``: score a fine-tuned adapter (or the base model) on a held-out file.

    loraflow eval --adapter runs/cls --data dev.csv --out runs/cls/eval
    loraflow eval --adapter runs/chat --data heldout.jsonl --out runs/chat/eval
    loraflow eval --task code --benchmark mbpp --adapter py=runs/py --base --out runs/py/eval

The task follows the adapter: a classifier (its folder has labels.json) is scored with
accuracy, top-k accuracy, macro / micro F1, macro ROC-AUC, a per-class report and a confusion
matrix (each head, and the joint accuracy of several); a causal-LM adapter with its
perplexity on --data (the formats finetune reads). --task code generates programs for MBPP or
HumanEval with one batched engine run for every adapter given (and the base model with
--base) and runs each in a sandboxed process: pass@k.

OUT/metrics.json holds the scores; OUT/predictions.jsonl one line a row (classification:
label, predicted, probabilities; code: the completions and their outcomes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from loraflow.atomic import atomic_write
from loraflow.help_format import HelpFormatter
from loraflow.threads import add_threads_argument, configure_threads

DEFAULT_MAX_LENGTH = 512  # tokens per example when neither --max-length nor the adapter's run.json says


class EvalHelp(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The module docstring as written, and each option's default."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="loraflow eval", description=__doc__, formatter_class=EvalHelp)
    ap.add_argument(
        "--task",
        choices=["auto", "classification", "causal-lm", "code"],
        default="auto",
        help="auto: classification if the adapter has labels.json, else causal-lm",
    )
    ap.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="the fine-tuned folder (code: repeat to score several adapters in one run)",
    )
    ap.add_argument("--model", help="the base model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--data", help="the held-out file (code: an MBPP-format JSONL; default the bundled MBPP)")
    ap.add_argument("--out", required=True, help="folder for metrics.json, predictions.jsonl and the PNGs")
    ap.add_argument(
        "--text-column", help="classification: the text column (default: the one the adapter was trained on)"
    )
    ap.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    ap.add_argument(
        "--max-length",
        type=int,
        help="tokens per example (longer: truncated); default: the --max-length the adapter was trained "
        f"with (its run.json), else {DEFAULT_MAX_LENGTH}",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    add_threads_argument(ap)
    c = ap.add_argument_group("code")
    c.add_argument("--benchmark", choices=["mbpp", "humaneval"], default="mbpp", help="which problems")
    c.add_argument("--split", default="test", help="MBPP's split: test (task ids 11-510), validation, train, prompt")
    c.add_argument("--limit", type=int, help="score only the first N problems")
    c.add_argument("--base", action="store_true", help="also score the base model without an adapter")
    c.add_argument("--samples", type=int, default=1, help="completions per problem (pass@k needs k of them)")
    c.add_argument("--k", default="1", help="pass@k for these k, separated by commas")
    c.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    c.add_argument("--max-tokens", type=int, default=512, help="tokens generated per completion")
    c.add_argument("--timeout", type=float, default=10.0, help="seconds each program may run")
    c.add_argument("--memory-mb", type=int, default=1024, help="memory each program may use")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configure_threads(args.threads, args.device, "eval")
    out = Path(args.out)
    task = args.task
    if task == "code":
        from loraflow.evaluate.code_command import run_code

        return run_code(args, out)
    if len(args.adapter) > 1:
        raise ValueError("--adapter once for classification and causal-lm (several: --task code)")
    adapter = Path(args.adapter[0]) if args.adapter else None
    if adapter is not None and not adapter.is_dir():
        raise FileNotFoundError(f"--adapter {adapter} does not exist")
    if args.max_length is None:
        args.max_length = _trained_max_length(adapter) if adapter is not None else DEFAULT_MAX_LENGTH
    if task == "auto":
        task = "classification" if adapter is not None and (adapter / "labels.json").is_file() else "causal-lm"
    if not args.data:
        raise ValueError(f"--data: give the held-out file to score the {task} adapter on")
    if task == "classification":
        if adapter is None:
            raise ValueError("classification needs --adapter: the folder loraflow finetune wrote")
        return classification(args, adapter, out)
    return causal_lm(args, adapter, out)


def classification(args, adapter: Path, out: Path) -> dict:
    from loraflow.evaluate.metrics import confusion_matrix_png
    from loraflow.finetune.data import classification_examples, read_rows
    from loraflow.finetune.evaluation import classification_scores, probabilities
    from loraflow.finetune.model import load_classifier

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tok, heads = load_classifier(adapter, args.model, args.device, dtype)
    text_column = args.text_column or _trained_text_column(adapter)
    rows = read_rows(args.data)
    examples, _, stats = classification_examples(
        rows, tok, text_column, [h["column"] for h in heads], args.max_length,
        classes=[h["classes"] for h in heads], source=str(args.data),
    )  # fmt: skip
    with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        probs = probabilities(model, examples, tok.pad_token_id, [len(h["classes"]) for h in heads], args.device,
                              args.batch_size, progress=_progress(args))  # fmt: skip
    scores = classification_scores(probs, examples, heads)
    scores["truncated"] = stats.truncated
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, e in enumerate(examples):
        record = {}
        for j, h in enumerate(heads):
            p = probs[j][i]
            part = {
                "label": h["classes"][e.classes[j]],
                "predicted": h["classes"][int(p.argmax())],
                "probabilities": {c: round(float(v), 6) for c, v in zip(h["classes"], p)},
            }
            record.update(part if len(heads) == 1 else {h["column"]: part})
        lines.append(json.dumps(record) + "\n")
    atomic_write(out / "predictions.jsonl", lambda tmp: Path(tmp).write_text("".join(lines)))
    for j, h in enumerate(heads):
        name = "confusion.png" if len(heads) == 1 else f"confusion-{h['column']}.png"
        labels = [e.classes[j] for e in examples]
        confusion_matrix_png(labels, probs[j].argmax(-1).tolist(), h["classes"], out / name,
                             f"{adapter.name}: {h['column']} on {Path(args.data).name}")  # fmt: skip
    _write_metrics(out, scores)
    return {k: v for k, v in scores.items() if k != "heads"}


def causal_lm(args, adapter: Path | None, out: Path) -> dict:
    import loraflow as lf
    from loraflow.evaluate.metrics import perplexity
    from loraflow.finetune.data import causal_lm_examples
    from loraflow.finetune.evaluation import nll

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tok = lf.load_model(args.model, dtype=dtype, device=args.device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if adapter is not None:
        lf.load_adapter(model, adapter, name="adapter")
    examples, stats = causal_lm_examples(args.data, tok, args.max_length)
    total, tokens = nll(model, examples, tok.pad_token_id, args.device, args.batch_size, progress=_progress(args))
    scores = {
        "loss": total / max(1, tokens),
        "perplexity": perplexity(total, max(1, tokens)),
        "tokens": tokens,
        "examples": len(examples),
        "truncated": stats.truncated,
        "adapter": str(adapter) if adapter else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_metrics(out, scores)
    return scores


def _progress(args) -> str | None:
    return None if args.no_progress else "eval"


def _run_json(adapter: Path) -> dict:
    """finetune's record of the run that wrote ``adapter`` (beside it; a tenant's is its run's
    folder, one up), or {} when there is none."""
    for run in (adapter / "run.json", adapter.parent / "run.json"):
        if run.is_file():
            info = json.loads(run.read_text())
            if run.parent == adapter or adapter.name in (info.get("config", {}).get("tenants") or {}):
                return info
    return {}


def _trained_max_length(adapter: Path) -> int:
    config = _run_json(adapter).get("config", {})
    return int(config.get("max_length") or DEFAULT_MAX_LENGTH)


def _trained_text_column(adapter: Path) -> str:
    run = adapter / "run.json"  # finetune's record of the run, beside the adapter
    return json.loads(run.read_text())["config"]["text_column"] if run.is_file() else "text"


def _write_metrics(out: Path, scores: dict) -> None:
    text = json.dumps(scores, indent=2) + "\n"
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
