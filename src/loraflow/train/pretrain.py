"""``loraflow pretrain``: train a LLaMA from scratch on a folder of text or code files.

    loraflow pretrain --data corpus/ --config 60m --optimizer galore --rank 128 --steps 10000 --out runs/60m

Files (.txt, .md, .py, ...) are tokenized with a given tokenizer (default: the embedded
SmolLM2's), joined with the end-of-sequence token, and packed into sequences of ``--seq``
tokens; the last 5% of the files (or of the tokens, for one file) are held out for
perplexity. Cosine schedule with warmup, optional per-layer updates, bf16, activation
checkpointing, a progress bar, periodic evaluation, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import loraflow as lf

OPTIMIZERS = ("adamw", "adamw8bit", "galore", "galore8bit", "galore-adafactor")
SPECIAL = ["<|endoftext|>"]


def train_tokenizer(files: list[Path], vocab_size: int, out: Path):
    """A byte-level BPE tokenizer trained on ``files`` (no download), saved under ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0], pad_token=SPECIAL[0])
    fast.save_pretrained(out)
    return fast


def text_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise FileNotFoundError(f"--data {folder} does not exist")
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.suffix in TEXT and p.is_file())
    if not files:
        raise FileNotFoundError(f"no text files ({', '.join(TEXT)}) under {folder}")
    return files
TEXT = (".txt", ".md", ".py", ".rst", ".json", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs")


def read_corpus(folder: Path, tokenizer, eval_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    files = text_files(folder)
    eos = tokenizer.eos_token_id
    def tokens(paths):
        out = []
        for p in paths:
            out += tokenizer(p.read_text(errors="ignore"), add_special_tokens=False)["input_ids"] + [eos]
        return torch.tensor(out, dtype=torch.long)
    if len(files) == 1:
        ids = tokens(files)
        cut = int(len(ids) * (1 - eval_fraction))
        return ids[:cut], ids[cut:]
    n_eval = max(1, math.ceil(len(files) * eval_fraction))
    return tokens(files[:-n_eval]), tokens(files[-n_eval:])


def pack(ids: torch.Tensor, seq: int) -> torch.Tensor:
    n = len(ids) // seq
    if n == 0:
        raise ValueError(f"{len(ids)} tokens are fewer than one sequence of {seq}: give more data or a smaller --seq")
    return ids[: n * seq].view(n, seq)


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay to ``floor`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_parts(name: str, model, args):
    """(param groups, a function groups -> optimizer)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name.startswith("galore"):
        groups = lf.galore_param_groups(model, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.scale)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    cls = {"adamw": lf.GaLoreAdamW, "galore": lf.GaLoreAdamW, "adamw8bit": lf.GaLoreAdamW8bit,
           "galore8bit": lf.GaLoreAdamW8bit, "galore-adafactor": lf.GaLoreAdafactor}[name]
    kw = dict(lr=args.lr, weight_decay=args.weight_decay)
    return groups, lambda g: cls(g, **kw)


@torch.no_grad()
def evaluate(model, seqs: torch.Tensor, batch: int, device) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(seqs), batch):
        x = seqs[i:i + batch].to(device)
        total += model(input_ids=x, labels=x).loss.item() * len(x)
        n += len(x)
    model.train()
    return total / max(1, n)


def save_checkpoint(out: Path, model, opt_state: dict, step: int) -> None:
    """Write to a temporary folder, then swap it in: a crash never leaves a half checkpoint."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    torch.save({"optimizer": opt_state, "step": step}, tmp / "state.pt")
    model.config.to_json_file(tmp / "config.json")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="loraflow pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a folder of text/code files, or one text file")
    ap.add_argument("--tokenizer", help="a local tokenizer folder (default: the embedded SmolLM2's)")
    ap.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                    help="train a byte-level BPE tokenizer of this size on the training files instead")
    ap.add_argument("--low-rank", type=int, metavar="R",
                    help="the paper's baseline: train every linear weight as W = BA of rank R")
    ap.add_argument("--config", default="60m", help="60m, 130m, 350m, 1b, 7b or tiny")
    ap.add_argument("--optimizer", default="galore", choices=OPTIMIZERS)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--update-proj-gap", type=int, default=200)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16, help="sequences per micro-batch")
    ap.add_argument("--accumulation", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--per-layer", action="store_true", help="step each weight inside the backward pass")
    ap.add_argument("--max-grad-norm", type=float, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-seqs", type=int, default=256, help="held-out sequences per evaluation")
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--out", required=True, help="folder for checkpoints and log.jsonl")
    ap.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer, LlamaForCausalLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.train_tokenizer:
        files = text_files(Path(args.data))
        held_out = max(1, math.ceil(len(files) * 0.05)) if len(files) > 1 else 0
        tok = train_tokenizer(files[:len(files) - held_out], args.train_tokenizer, out / "tokenizer")
    elif args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(lf.models.default_model_path(), local_files_only=True)
    train_ids, eval_ids = read_corpus(Path(args.data), tok)
    train_seqs, eval_seqs = pack(train_ids, args.seq), pack(eval_ids, args.seq)[:args.eval_seqs]
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(lf.llama_config(args.config, vocab_size=len(tok), max_seq_len=args.seq))
    if args.low_rank:
        from loraflow.train.lowrank import to_low_rank
        to_low_rank(model, args.low_rank)
    model.to(args.device, getattr(torch, args.dtype)).train()
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    groups, make = optimizer_parts(args.optimizer, model, args)
    schedule = lambda step: lr_factor(step, args.steps, args.warmup)
    if args.per_layer:
        opt = lf.PerLayerUpdates(model, make, groups, args.accumulation, args.max_grad_norm, schedule)
    else:
        opt = make(groups)
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    step = 0
    if args.resume:
        ckpt = out / "checkpoint"
        if not (ckpt / "state.pt").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
        model.load_state_dict(load_file(ckpt / "model.safetensors", device=args.device))
        state = torch.load(ckpt / "state.pt", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    order = torch.randperm(len(train_seqs), generator=torch.Generator().manual_seed(args.seed))
    per_step = args.batch * args.accumulation
    log = open(out / "log.jsonl", "a")
    result = {}
    bar = tqdm(total=args.steps, initial=step, desc=f"pretrain {args.config} {args.optimizer}")
    while step < args.steps:
        losses = []
        for micro in range(args.accumulation):
            idx = [(step * per_step + micro * args.batch + i) % len(order) for i in range(args.batch)]
            x = train_seqs[order[idx]].to(args.device)
            loss = model(input_ids=x, labels=x).loss / args.accumulation
            loss.backward()
            losses.append(loss.item())
            if args.per_layer:
                opt.after_backward()
        if not args.per_layer:
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * schedule(step)
            opt.step()
            opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses):.3f}")
        record = {"step": step, "loss": sum(losses), "time": time.time()}
        if step % args.eval_every == 0 or step == args.steps:
            record["eval_loss"] = evaluate(model, eval_seqs, args.batch, args.device)
            record["eval_ppl"] = math.exp(min(record["eval_loss"], 50))
            result = record
        log.write(json.dumps(record) + "\n")
        log.flush()
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(out, model, opt.state_dict(), step)
    bar.close()
    return result
