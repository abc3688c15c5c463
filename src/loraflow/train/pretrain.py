"""``loraflow pretrain``: train a LLaMA from scratch on a folder of text or code files.

    loraflow pretrain --data corpus/ --config 60m --optimizer galore --rank 128 --steps 10000 --out runs/60m

Files (.txt, .md, .py, ...) are tokenized with a given tokenizer (default: the embedded
SmolLM2's; or ``--train-tokenizer VOCAB``: a byte-level BPE trained on the first
``--tokenizer-sample-mb`` MB of the training files), 256 files per call so the fast
tokenizer encodes them in parallel, joined with the end-of-sequence token, and packed into
sequences of ``--seq`` tokens; the last 5% of the files (or of the tokens, for one file) are
held out for perplexity (``train/corpus.py``). ``--tokens-cache FILE.safetensors`` keeps the token ids: a later
run (another optimizer, say) loads them instead of tokenizing again; ``--prepare-only``
stops there. Cosine schedule with warmup, optional per-layer updates, float32, bfloat16 or
bf16-mixed (float32 weights and optimizer states, bfloat16 autocast), ``--compile``,
activation checkpointing, a progress bar, periodic evaluation, atomic checkpoints and
exact resume: ``--resume`` continues from the newest complete checkpoint (also one that a
killed save left as checkpoint.tmp or checkpoint.old), and a run without it refuses an
``--out`` that already holds one.

Several GPUs: ``torchrun --nproc-per-node N -m loraflow.cli pretrain --parallel ddp|fsdp ...``;
``--batch`` is each process's, every process takes its slice of each global batch (so N
processes with ``--batch B`` train as one with ``--batch N·B``). ``fsdp`` shards weights,
gradients and optimizer states (FSDP2, one unit per decoder block; GaLore and APOLLO step
the shards, ``optim/sharded.py``) and writes sharded checkpoints that resume on another
number of processes (``distributed/checkpoint.py``); its last checkpoint also holds the
whole model as ``model.safetensors``.

OUT/log.jsonl holds one record per step (step, tokens, loss, time); every ``--eval-every``
steps, at the last one and where ``--time-limit`` stops the run, also eval_loss, eval_ppl
and tokens_per_s: the training speed since the previous such record (evaluation and
checkpoint time left out), and on a GPU peak_gib, the first process's peak memory so far.
A resumed run first drops the records past its checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import loraflow as lf
from loraflow.distributed import checkpoint as sharded_checkpoint
from loraflow.distributed.parallel import gradient_sync, parallelize, unwrap
from loraflow.distributed.world import PARALLEL, World, start, stop
from loraflow.help_format import HelpFormatter
from loraflow.optim.apollo import MINI_SCALE
from loraflow.optim.projector import SVD_METHODS
from loraflow.threads import add_threads_argument, configure_threads
from loraflow.train import checkpoint
from loraflow.train.checkpoint import checkpoint_paths, lr_factor, trim_log  # noqa: F401 (their home before)
from loraflow.train.corpus import (
    cached_corpus,
    pack,
    split_files,
    spread,
    text_files,
    tokenizer_sample,
    train_tokenizer,
)

OPTIMIZERS = ("adamw", "adamw8bit", "galore", "galore8bit", "galore-adafactor", "apollo", "apollo8bit", "apollo-mini")
DEFAULT_SCALE = {"galore": 0.25, "apollo": 1.0, "apollo-mini": MINI_SCALE}
DTYPES = ("float32", "bfloat16", "bf16-mixed")


def optimizer_parts(name: str, model, args):
    """(param groups, a function groups -> optimizer)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}")
    family = "apollo-mini" if name == "apollo-mini" else name.removesuffix("8bit").removesuffix("-adafactor")
    scale = args.scale if args.scale is not None else DEFAULT_SCALE.get(family, 1.0)
    if name.startswith("galore"):
        groups = lf.galore_param_groups(
            model, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=scale, svd=args.svd
        )
    elif name.startswith("apollo"):
        scale_type = "tensor" if name == "apollo-mini" else "channel"
        groups = lf.apollo_param_groups(
            model, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=scale, scale_type=scale_type
        )
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    cls = {
        "adamw": lf.GaLoreAdamW,
        "galore": lf.GaLoreAdamW,
        "adamw8bit": lf.GaLoreAdamW8bit,
        "galore8bit": lf.GaLoreAdamW8bit,
        "galore-adafactor": lf.GaLoreAdafactor,
        "apollo": lf.Apollo,
        "apollo8bit": lf.ApolloAdamW8bit,
        "apollo-mini": lf.ApolloMini,
    }[name]
    kw = dict(lr=args.lr, weight_decay=args.weight_decay)
    return groups, lambda g: cls(g, **kw)


def autocast_for(dtype: str, device: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory: bfloat16 autocast for "bf16-mixed" (CUDA or CPU), else nothing."""
    if dtype == "bf16-mixed":
        return lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@torch.no_grad()
def evaluate(model, seqs: torch.Tensor, batch: int, device, autocast=contextlib.nullcontext) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(seqs), batch):
        x = seqs[i : i + batch].to(device)
        with autocast():
            total += model(input_ids=x, labels=x).loss.item() * len(x)
        n += len(x)
    model.train()
    return total / max(1, n)


CHECKPOINT_FILES = ("model.safetensors", "state.pt", "config.json")
SHARDED_FILES = (sharded_checkpoint.MANIFEST, "config.json")  # --parallel fsdp


def checkpoint_step(folder: Path) -> int | None:
    return checkpoint.checkpoint_step(folder, CHECKPOINT_FILES, legacy=True)


def latest_checkpoint(out: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint in ``out`` (``train/checkpoint.py``) and its step:
    one process's (or DDP's) or a sharded one (FSDP)."""
    found = [checkpoint.latest_checkpoint(out, CHECKPOINT_FILES, legacy=True)]
    found.append(checkpoint.latest_checkpoint(out, SHARDED_FILES))
    found = [f for f in found if f is not None]
    return max(found, key=lambda f: f[1]) if found else None


def save_checkpoint(out: Path, model, opt, step: int, world: World, global_batch: int, last: bool) -> None:
    """Write ``out/checkpoint`` (weights, optimizer state and step, config) so that a kill at
    any point leaves a complete checkpoint, the previous one or this one. FSDP: every
    process its shards; the ``last`` one also holds the whole model."""
    plain = unwrap(model)
    if world.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = None
        if last:  # a collective: every process takes part
            whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

        def write_main(folder: Path) -> None:
            plain.config.to_json_file(folder / "config.json")
            if whole is not None:
                save_file({k: v.contiguous() for k, v in whole.items()}, folder / "model.safetensors")

        extra = {"global_batch": global_batch}
        sharded_checkpoint.save_sharded(out, step, model, opt, world, extra, write_main)
        return

    def write(folder: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in plain.state_dict().items()}
        save_file(state, folder / "model.safetensors")
        torch.save({"optimizer": opt.state_dict(), "step": step, "global_batch": global_batch}, folder / "state.pt")
        plain.config.to_json_file(folder / "config.json")

    if world.main:
        checkpoint.save_checkpoint(out, step, write, CHECKPOINT_FILES)
    world.barrier()


def resume(ckpt: Path, model, opt, world: World, global_batch: int) -> int:
    """Load a checkpoint into the model and optimizer; its step."""
    sharded = (ckpt / sharded_checkpoint.MANIFEST).is_file()
    if sharded != (world.parallel == "fsdp"):
        if sharded:
            raise ValueError(
                f"--resume: {ckpt} holds shards written by --parallel fsdp; resume it with --parallel fsdp "
                "(on any number of processes)"
            )
        raise ValueError(
            f"--resume: {ckpt} holds whole tensors, written without --parallel fsdp; resume it with "
            "--parallel none or ddp"
        )
    if sharded:
        state = sharded_checkpoint.load_sharded(ckpt, model, opt, world)
    else:
        unwrap(model).load_state_dict(load_file(ckpt / "model.safetensors", device=str(world.device)))
        state = torch.load(ckpt / "state.pt", weights_only=True)
        opt.load_state_dict(state["optimizer"])
    saved = state.get("global_batch", global_batch)  # older checkpoints: not recorded
    if saved != global_batch:
        raise ValueError(
            f"--resume: {ckpt} was trained with {saved} sequences a step and this run takes {global_batch} "
            f"(--batch x processes x --accumulation): choose --batch so they match ({world.size} processes)"
        )
    return state["step"]


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class PretrainHelp(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The module docstring as written, and each option's default."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="loraflow pretrain", description=__doc__, formatter_class=PretrainHelp)
    ap.add_argument("--data", required=True, help="a folder of text/code files, or one text file")
    ap.add_argument("--tokenizer", help="a local tokenizer folder (default: the embedded SmolLM2's)")
    ap.add_argument(
        "--train-tokenizer",
        type=int,
        metavar="VOCAB",
        help="train a byte-level BPE tokenizer of this size on the training files instead (saved to OUT/tokenizer)",
    )
    ap.add_argument(
        "--tokenizer-sample-mb",
        type=float,
        default=100.0,
        metavar="MB",
        help="--train-tokenizer learns from the first training files, whole and in order, up to "
        "this many MB (default 100: a 32000 vocabulary in well under a minute)",
    )
    ap.add_argument(
        "--tokens-cache",
        metavar="FILE",
        help="a .safetensors file of the token ids: loaded when it exists (it must have been made "
        "with the same tokenizer and --data), else written",
    )
    ap.add_argument(
        "--prepare-only",
        action="store_true",
        help="stop after the tokenizer and the token ids (with --tokens-cache: build it once)",
    )
    ap.add_argument(
        "--low-rank", type=int, metavar="R", help="the paper's baseline: train every linear weight as W = BA of rank R"
    )
    ap.add_argument("--config", default="60m", help="60m, 130m, 350m, 1b, 7b or tiny")
    ap.add_argument("--optimizer", default="galore", choices=OPTIMIZERS, help="the optimizer")
    ap.add_argument("--rank", type=int, default=128, help="GaLore's or APOLLO's projection rank (APOLLO-Mini: 1)")
    ap.add_argument("--update-proj-gap", type=int, default=200, help="steps between projection refreshes")
    ap.add_argument(
        "--scale", type=float, help="the update scale (default: GaLore 0.25, APOLLO 1, APOLLO-Mini sqrt(128))"
    )
    ap.add_argument(
        "--svd",
        default="gram",
        choices=SVD_METHODS,
        help="how GaLore finds its bases: gram (default), the smaller Gram matrix's eigenvectors (the "
        "SVD's subspace, 8x faster than it at 1B on an H200); full SVD; randomized, "
        "torch.svd_lowrank (approximate)",
    )
    ap.add_argument(
        "--randomized-svd", dest="svd", action="store_const", const="randomized", help="the same as --svd randomized"
    )
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps before the cosine decay")
    ap.add_argument("--batch", type=int, default=16, help="sequences per micro-batch")
    ap.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--per-layer", action="store_true", help="step each weight inside the backward pass")
    ap.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm to this")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="weights' dtype; bf16-mixed: float32 weights and optimizer states, bfloat16 autocast",
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (less memory)",
    )
    ap.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations")
    ap.add_argument(
        "--eval-seqs",
        type=int,
        default=256,
        help="held-out sequences per evaluation, evenly spaced over the held-out tokens",
    )
    ap.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    ap.add_argument("--out", required=True, help="folder for checkpoints and log.jsonl")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in --out (--out/checkpoint, or what "
        "an interrupted save left); without it, an --out holding a checkpoint is refused",
    )
    ap.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="stop once this much wall time has passed since the start, with an evaluation and a "
        "checkpoint (--resume continues)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the initialization and the data order")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to train")
    add_threads_argument(ap)
    ap.add_argument(
        "--parallel",
        default="none",
        choices=PARALLEL,
        help="several processes under torchrun: ddp (replicas) or fsdp (sharded weights, gradients and states)",
    )
    return ap.parse_args(argv)


def load_tokenizer(args: argparse.Namespace, out: Path):
    from transformers import AutoTokenizer

    if args.train_tokenizer:
        train_files, _ = split_files(text_files(Path(args.data)))
        return train_tokenizer(
            tokenizer_sample(train_files, args.tokenizer_sample_mb), args.train_tokenizer, out / "tokenizer"
        )
    return AutoTokenizer.from_pretrained(args.tokenizer or lf.models.default_model_path(), local_files_only=True)


def prepare(args: argparse.Namespace, out: Path, world: World):
    """The tokenizer and the token ids. The first process trains the tokenizer and writes the
    token cache; the others wait, then read what it wrote."""
    if not world.main:
        world.barrier()
    if world.main or not args.train_tokenizer:
        tok = load_tokenizer(args, out)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    ids = cached_corpus(Path(args.data), tok, Path(args.tokens_cache) if args.tokens_cache else None)
    if world.main:
        world.barrier()
    return tok, ids


def main(argv: list[str] | None = None) -> dict:
    started = time.time()
    args = parse_args(argv)
    if args.parallel == "fsdp" and args.optimizer == "galore-adafactor":
        raise ValueError(
            "--optimizer galore-adafactor spans whole weights and does not step FSDP shards: "
            "use galore, galore8bit or apollo with --parallel fsdp, or --parallel ddp"
        )
    world = start(args.parallel, args.device)
    args.device = str(world.device)
    configure_threads(args.threads, args.device, "pretrain")  # under torchrun, its OMP_NUM_THREADS=1 stands
    try:
        result = _train(args, world, started)
        world.barrier()  # every process done before the group goes
        return result
    finally:
        stop(world)


def _train(args: argparse.Namespace, world: World, started: float) -> dict:
    deadline = started + args.time_limit if args.time_limit is not None else math.inf
    from transformers import LlamaForCausalLM

    out = Path(args.out)
    existing = latest_checkpoint(out) if out.is_dir() and not args.prepare_only else None
    if existing is not None and not args.resume:
        raise ValueError(
            f"{out} already holds a checkpoint ({existing[0].name}, step {existing[1]}); pass "
            "--resume to continue it, or choose another --out (a new run would overwrite it)"
        )
    if args.resume and not args.prepare_only and existing is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint in {out} (no complete checkpoint, checkpoint.tmp "
            "or checkpoint.old folder); run without --resume to start"
        )
    out.mkdir(parents=True, exist_ok=True)
    tok, (train_ids, eval_ids) = prepare(args, out, world)
    if args.prepare_only:
        return {"train_tokens": len(train_ids), "eval_tokens": len(eval_ids), "vocab_size": len(tok)}
    train_seqs, eval_seqs = pack(train_ids, args.seq), spread(pack(eval_ids, args.seq), args.eval_seqs)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(lf.llama_config(args.config, vocab_size=len(tok), max_seq_len=args.seq))
    if args.low_rank:
        from loraflow.train.lowrank import to_low_rank

        to_low_rank(model, args.low_rank)
    model.to(args.device, torch.float32 if args.dtype == "bf16-mixed" else getattr(torch, args.dtype)).train()
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    model = parallelize(model, world, bf16_mixed=args.dtype == "bf16-mixed")
    if args.compile:
        model.compile()  # in place: state_dict keys and checkpoints stay those of the plain model
    autocast = autocast_for(args.dtype, args.device)
    groups, make = optimizer_parts(args.optimizer, unwrap(model), args)
    schedule = lambda step: lr_factor(step, args.steps, args.warmup)
    if args.per_layer:
        opt = lf.PerLayerUpdates(model, make, groups, args.accumulation, args.max_grad_norm, schedule)
    else:
        opt = make(groups)
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    step, global_batch = 0, args.batch * world.size * args.accumulation
    if args.resume:
        ckpt = existing[0]
        if ckpt.name != "checkpoint":
            print(
                f"--resume: {out / 'checkpoint'} is missing, partial or older (a save was interrupted); resuming "
                f"from {ckpt}, step {existing[1]}",
                file=sys.stderr,
            )
        step = resume(ckpt, model, opt, world, global_batch)
        if world.main:
            trim_log(out / "log.jsonl", step)
    order = torch.randperm(len(train_seqs), generator=torch.Generator().manual_seed(args.seed))
    per_step = global_batch  # sequences a step, over all processes
    log = open(out / "log.jsonl", "a") if world.main else None
    result = {}
    bar = tqdm(total=args.steps, initial=step, desc=f"pretrain {args.config} {args.optimizer}", disable=not world.main)
    interval_tokens, interval_seconds = 0, 0.0  # training since the last evaluation record
    while step < args.steps:
        start = time.perf_counter()
        losses = []
        for micro in range(args.accumulation):
            first = step * per_step + (micro * world.size + world.rank) * args.batch  # this process's slice
            idx = [(first + i) % len(order) for i in range(args.batch)]
            x = train_seqs[order[idx]].to(args.device)
            with autocast():
                loss = model(input_ids=x, labels=x).loss / args.accumulation
            with gradient_sync(model, micro == args.accumulation - 1):
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
        stopping = step < args.steps and args.time_limit is not None and world.any(time.time() >= deadline)
        evaluating = step % args.eval_every == 0 or step == args.steps or stopping
        if evaluating:
            _synchronize(args.device)  # the last step's kernels count as training
        interval_seconds += time.perf_counter() - start
        interval_tokens += per_step * args.seq
        loss = world.mean(sum(losses))  # the global batch's
        record = {"step": step, "tokens": step * per_step * args.seq, "loss": loss, "time": time.time()}
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{interval_tokens / interval_seconds:.0f}")
        if evaluating:
            record["tokens_per_s"] = interval_tokens / interval_seconds  # the global batch's, all processes
            if torch.device(args.device).type == "cuda":  # this (the first) process's GPU
                record["peak_gib"] = torch.cuda.max_memory_allocated(args.device) / 2**30
            interval_tokens, interval_seconds = 0, 0.0
            record["eval_loss"] = evaluate(model, eval_seqs, args.batch, args.device, autocast)
            record["eval_ppl"] = math.exp(min(record["eval_loss"], 50))
            result = record
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if step % args.save_every == 0 or step == args.steps or stopping:
            save_checkpoint(out, model, opt, step, world, global_batch, last=step == args.steps or stopping)
        if stopping:
            result = {
                **result,
                "stopped": f"--time-limit {args.time_limit:g} s: stopped at step {step} of "
                f"{args.steps}; --resume continues",
            }
            break
    bar.close()
    if log is not None:
        log.close()
    return result
