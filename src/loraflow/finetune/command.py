"""``loraflow finetune``: train an adapter (or the whole model) on your data.

    loraflow finetune --task classification --data train.csv --text-column TEXT --label-column LABEL \\
                      --method lora --r 8 --alpha 16 --max-length 512 --epochs 1 --out runs/cls
    loraflow finetune --task causal-lm --data chat.jsonl --method lora --r 8 --steps 200 --out runs/chat
    loraflow serve --lora chat=runs/chat

Data: --task causal-lm takes JSONL records {"prompt", "completion"} (loss on the completion),
{"messages": [...]} (the model's chat template; loss on the assistant turns), or plain text
files (a file or a folder, packed into --max-length chunks). --task classification takes a
CSV or JSONL with a text column and one or more label columns (several: one head each over
one adapter). A dev split (--dev FILE, or --dev-fraction of the data, stratified for
classification) is scored every --eval-every steps and the best adapter is kept in --out, in
PEFT's layout. --tenant NAME=FILE (repeated) trains one adapter per tenant in shared batches.
--resume continues an interrupted run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json

import torch

from loraflow.finetune.config import DEFAULT_LR, METHODS, TASKS, FinetuneConfig
from loraflow.help_format import HelpFormatter
from loraflow.threads import add_threads_argument, configure_threads


class FinetuneHelp(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The module docstring as written, and each option's default."""


def tenant(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--tenant takes NAME=DATA, got {text!r}")
    return name, path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="loraflow finetune", description=__doc__, formatter_class=FinetuneHelp)
    d = ap.add_argument_group("data")
    d.add_argument("--task", default="causal-lm", choices=TASKS, help="what the model learns")
    d.add_argument("--data", help="training file (JSONL, CSV, text) or a folder of text files")
    d.add_argument(
        "--tenant",
        type=tenant,
        action="append",
        default=[],
        metavar="NAME=DATA",
        help="one adapter per tenant, trained together in mixed batches (repeat; instead of --data)",
    )
    d.add_argument("--dev", help="a dev file scored during training (default: carve --dev-fraction out of --data)")
    d.add_argument("--dev-fraction", type=float, default=0.1, help="share of --data held out as dev (0: none)")
    d.add_argument("--text-column", default="text", help="classification: the column holding the text")
    d.add_argument(
        "--label-column",
        action="append",
        dest="label_columns",
        metavar="COLUMN",
        help="classification: the label column (repeat for several heads; default: label)",
    )
    d.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency")
    d.add_argument("--max-length", type=int, default=512, help="tokens per example; longer ones are truncated")
    m = ap.add_argument_group("model and method")
    m.add_argument("--model", help="a local Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    m.add_argument("--method", default="lora", choices=METHODS, help="what is trained")
    m.add_argument("--r", type=int, default=8, help="adapter rank")
    m.add_argument("--alpha", type=float, default=16.0, help="LoRA's alpha (scale alpha / r)")
    m.add_argument(
        "--targets",
        default="all-linear",
        help="modules to adapt: all-linear, or names separated by commas (q_proj,v_proj)",
    )
    m.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    m.add_argument("--rslora", action="store_true", help="rsLoRA scale alpha / sqrt(r)")
    m.add_argument("--depth", type=int, default=3, help="Deep LoRA: factors per adapter")
    m.add_argument("--epsilon", type=float, default=1e-3, help="Deep LoRA: scale of the orthogonal init")
    m.add_argument("--gamma", type=float, default=0.1, help="Deep LoRA: outer factors' learning-rate ratio")
    m.add_argument("--galore-rank", type=int, default=128, help="GaLore: projection rank")
    o = ap.add_argument_group("training")
    o.add_argument("--epochs", type=float, help="passes over the training data (default 1 unless --steps)")
    o.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    o.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch (per tenant)")
    o.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument(
        "--group-by-length",
        action="store_true",
        help="batch examples of about one length together (less padding; each still once an epoch)",
    )
    o.add_argument(
        "--padding-free",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pack each step's rows end to end, no padding (default: on CUDA for Llama-family models, one adapter)",
    )
    o.add_argument("--lr", type=float, help=f"peak learning rate (default by method: {DEFAULT_LR})")
    o.add_argument("--warmup", type=float, default=0.03, help="linear warm-up, a fraction of the steps; then cosine")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="clip each adapter's gradient norm (0: off)")
    o.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 frozen weights and autocast (default: on CUDA)",
    )
    o.add_argument("--compile", action="store_true", help="torch.compile the model")
    o.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each decoder block's activations in the backward pass (less memory, more compute)",
    )
    o.add_argument("--seed", type=int, default=0, help="seed of the init, the dev split and the data order")
    o.add_argument("--eval-every", type=int, help="steps between dev evaluations (default: 10 over the run)")
    o.add_argument("--save-every", type=int, help="steps between checkpoints (default: each evaluation)")
    o.add_argument("--early-stopping", type=int, metavar="N", help="stop after N evaluations without improvement")
    o.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to train")
    add_threads_argument(o)
    o.add_argument(
        "--parallel",
        default="none",
        choices=("none", "ddp", "fsdp"),
        help="several processes under torchrun (torchrun --nproc-per-node N -m loraflow.cli finetune ...): "
        "ddp (replicas, adapter gradients averaged) or fsdp (the frozen base sharded per decoder block); "
        "--batch-size is each process's",
    )
    r = ap.add_argument_group("output")
    r.add_argument("--out", required=True, help="the output folder (the adapter, log, curves, checkpoint)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace the adapter an --out holds already")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    targets = args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",") if t]
    tenants = dict(args.tenant)
    if len(tenants) != len(args.tenant):
        raise ValueError("--tenant names must be distinct")
    return FinetuneConfig(
        out=args.out, data=args.data, task=args.task, model=args.model, tenants=tenants, dev=args.dev,
        dev_fraction=args.dev_fraction, text_column=args.text_column, label_columns=args.label_columns or ["label"],
        class_weights=args.class_weights, method=args.method, r=args.r, alpha=args.alpha, targets=targets,
        dropout=args.dropout, use_rslora=args.rslora, depth=args.depth, epsilon=args.epsilon, gamma=args.gamma,
        galore_rank=args.galore_rank, max_length=args.max_length, epochs=args.epochs, steps=args.steps,
        batch_size=args.batch_size, accumulation=args.accumulation, group_by_length=args.group_by_length,
        padding_free=args.padding_free, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, bf16=args.bf16, seed=args.seed,
        eval_every=args.eval_every, save_every=args.save_every, early_stopping=args.early_stopping,
        resume=args.resume, overwrite=args.overwrite, device=args.device, parallel=args.parallel, compile=args.compile,
        activation_checkpointing=args.activation_checkpointing,
        progress=not args.no_progress,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    from loraflow.finetune.loop import finetune

    args = parse_args(argv)
    configure_threads(args.threads, args.device, "finetune")
    result = finetune(config_from_args(args))
    return json.loads(json.dumps(result, default=str))
