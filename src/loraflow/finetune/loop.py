"""``lf.finetune(cfg)``: train adapters (or all weights) on a user's data, evaluate on a dev
split, keep the best, checkpoint, resume.

One optimizer step takes ``accumulation`` micro-batches of ``batch_size`` rows per tenant;
every tenant's rows run in the same forward pass, each row through its own adapter
(``use_adapters``). The loss of a step is, per tenant,

    L_t = Σ_{rows of t} loss(row) / N_t,        minimized as  L = Σ_t L_t

with N_t the tenant's labelled tokens (causal LM) or rows (classification) in the whole
step, so that a tenant's gradient, and with per-tenant clipping its update, is what it gets
training alone on the same rows (FLoRA's claim made practical: Wen & Chaudhuri, ICLR 2024).

Under torchrun (``parallel``: "ddp" or "fsdp", ``distributed/``) every process takes its own
micro-batches of each step (``batch_size`` rows per tenant each) and N_t counts the rows of
all processes, so N processes train as one process with ``accumulation`` x N. "ddp": every
process holds the whole model and the adapters' gradients are averaged in one all-reduce a
step; "fsdp": the frozen base is sharded per decoder block (FSDP2), the embeddings and heads
stay whole. Checkpoints hold whole tensors (adapters are small), so a run resumes on
another number of processes with the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from loraflow.adapters import compress, deep_lora_param_groups, use_adapters
from loraflow.distributed.parallel import average_gradients, gathered, parallelize
from loraflow.distributed.world import World, start, stop
from loraflow.finetune.config import FinetuneConfig
from loraflow.finetune.data import collate
from loraflow.finetune.evaluation import evaluate_dev
from loraflow.finetune.model import build_model, classify, head_losses, token_losses, trainable
from loraflow.finetune.outputs import CKPT_FILES, RunFolder
from loraflow.finetune.packing import pack, packed_classify, packed_token_losses
from loraflow.finetune.sources import Order, load_run_data
from loraflow.models.varlen_attention import supports_varlen, use_varlen_attention
from loraflow.optim import GaLoreAdamW, galore_param_groups
from loraflow.train.checkpoint import latest_checkpoint, lr_factor, save_checkpoint, trim_log


def finetune(cfg: FinetuneConfig) -> dict:
    """Run ``cfg``; returns a summary (steps, losses, the best dev metric per tenant, speed)."""
    started = time.time()
    world = start(cfg.parallel, cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        result = _finetune(cfg, world, started)
        world.barrier()  # every process done (the first writes last) before the group goes
        return result
    finally:
        stop(world)


def _finetune(cfg: FinetuneConfig, world: World, started: float) -> dict:
    device = str(world.device)
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.startswith("cuda")
    folder = RunFolder(Path(cfg.out), cfg, writes=world.main)
    if world.main:
        existing = folder.prepare()  # refusals before anything is loaded or written
    world.barrier()
    if not world.main:
        existing = latest_checkpoint(folder.out, CKPT_FILES) if cfg.resume else None
    from transformers import AutoTokenizer

    from loraflow.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(cfg.model or default_model_path(), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    data = load_run_data(cfg, tok)
    cut = sum(st.get("truncated", 0) for st in data.stats.values())
    if cut and cfg.progress and world.main:
        total = sum(st["examples"] for st in data.stats.values())
        print(f"finetune: {cut} of {total} examples are longer than --max-length {cfg.max_length} tokens and "
              "were truncated (counted in run.json)", file=sys.stderr)  # fmt: skip
    names = list(data.train)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, tok = build_model(cfg, names, sum(data.head_sizes) or None, device, bf16)
    packed = _padding_free(cfg, model, names, device)
    if packed:
        use_varlen_attention(model)
    autocast = (
        (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    )
    orders = {
        name: Order(len(ex), cfg.seed, cfg.batch_size, [len(e.input_ids) for e in ex] if cfg.group_by_length else None)
        for name, ex in data.train.items()
    }
    if cfg.method == "deep-lora":
        for name in names:  # the compression step, from each tenant's first batch (Sec. 3.2)
            rows = {name: orders[name].rows(0)}
            with autocast():  # the frozen weights' dtype, as in training
                _compress(cfg, model, _batch(cfg, data, rows, tok, device, False), name, data.head_sizes)
    owners = trainable(model, cfg, names)
    if cfg.activation_checkpointing:  # non-reentrant: the frozen embeddings' outputs need no gradient
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained = {n for n, p in model.named_parameters() if p.requires_grad}  # by name: FSDP swaps the objects
    if world.parallel == "fsdp":  # the shards replace the parameters: find the trained ones again
        name_of = {id(p): n for n, p in model.named_parameters()}
        owned = {owner: [name_of[id(p)] for p in params] for owner, params in owners.items()}
        model = parallelize(model, world, bf16_mixed=bf16, root=False)
        params = dict(model.named_parameters())
        owners = {owner: [params[n] for n in ns] for owner, ns in owned.items()}
    opt = _optimizer(cfg, model, owners, device, world)
    class_weights = _class_weights(cfg, data)
    per_step = max(len(ex) for ex in data.train.values())
    global_batch = cfg.batch_size * cfg.accumulation * world.size  # rows per tenant a step
    steps = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * per_step / global_batch))
    warmup = int(cfg.warmup * steps)
    eval_every = cfg.eval_every or max(1, steps // 10)
    save_every = cfg.save_every or eval_every
    if cfg.compile:  # the body: the losses call it directly (the head goes through linear_cross_entropy)
        getattr(model, model.base_model_prefix).compile()

    step, best, stale = 0, {}, 0
    if existing is not None:
        step, best, stale = _resume(existing[0], model, opt, owners, global_batch)
        if world.main:
            trim_log(folder.log_path, step)
    resolved = {"padding_free": packed, "bf16": bf16, "device": device, "processes": world.size}
    folder.write_run_json(data, resolved)
    log = open(folder.log_path, "a") if world.main else None
    bar = tqdm(total=steps, initial=step, desc=f"finetune {cfg.method}", disable=not (cfg.progress and world.main))
    tokens_seen, train_seconds, result = 0, 0.0, {}
    while step < steps:
        t0, step_tokens = time.perf_counter(), 0
        every = [  # the step's micro-batches, process by process: this one takes its own
            [{name: orders[name].rows((step * cfg.accumulation + m) * world.size + r) for name in names}
             for r in range(world.size)]
            for m in range(cfg.accumulation)
        ]  # fmt: skip
        micro = [rows[world.rank] for rows in every]
        denom = _denominators(cfg, data, [rows for part in every for rows in part], class_weights)
        denom = {n: d / world.size for n, d in denom.items()}  # the processes' gradients are averaged
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(step, steps, warmup, floor=0.0)
        acc = torch.zeros(len(names), device=device)  # each tenant's loss, summed on the GPU
        for rows in micro:
            batch = _batch(cfg, data, rows, tok, device, packed)
            step_tokens += batch["tokens"]
            with autocast(), _rows_adapters(model, cfg, batch["tenant"]):
                losses = _row_losses(cfg, model, batch, data.head_sizes, class_weights)  # (B,)
            scale = torch.tensor([1.0 / denom[n] for n in batch["tenant"]], device=losses.device)
            (losses * scale).sum().backward()
            acc.index_add_(0, torch.tensor([names.index(n) for n in batch["tenant"]], device=device),
                           (losses * scale).detach().float())  # fmt: skip
        average_gradients([p for params in owners.values() for p in params], world)  # FSDP: its shards itself
        if world.parallel != "none":  # the step's losses and tokens over the processes
            totals = torch.cat([acc, torch.tensor([float(step_tokens)], device=device)])
            torch.distributed.all_reduce(totals)
            acc, step_tokens = totals[:-1] / world.size, int(totals[-1].item())
        if cfg.max_grad_norm:
            for params in owners.values():  # per tenant: its update is its own
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_sum = dict(zip(names, acc.tolist()))  # the step's one wait for the GPU
        seconds = time.perf_counter() - t0  # acc.tolist() waited for the GPU: the step's whole time
        train_seconds, tokens_seen = train_seconds + seconds, tokens_seen + step_tokens
        loss = sum(loss_sum.values()) / len(names)
        record = {"step": step, "loss": loss, "lr": opt.param_groups[0]["lr"], "time": time.time(),
                  "tokens": step_tokens, "seconds": seconds}  # fmt: skip
        if len(names) > 1:
            record["tenant_loss"] = loss_sum
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_seen / train_seconds:.0f}")
        if step % eval_every == 0 or step == steps:
            record["tokens_per_s"] = tokens_seen / train_seconds
            if any(data.dev.values()):
                with autocast():
                    scores = evaluate_dev(cfg, model, tok, data, device)  # every process: the same
                record["dev"] = scores
                with gathered(model):  # the sharded adapters whole, to save
                    improved = folder.keep_best(model, tok, data, scores, best, step)
                stale = 0 if improved else stale + 1
                bar.set_postfix(loss=f"{loss:.4f}", dev=folder.describe(scores))
            result = record
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
        stopping = cfg.early_stopping is not None and stale >= cfg.early_stopping
        if step % save_every == 0 or step == steps or stopping:
            with gathered(model):
                if not any(data.dev.values()):
                    folder.save_outputs(model, tok, data)  # no dev split: the latest is the one kept
                tensors = {
                    n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in trained
                }  # copies: resharding frees the whole ones
            _checkpoint(folder.out, step, tensors, model, opt, best, stale, world, global_batch)
            folder.plot()
        if stopping:
            result["stopped"] = f"early stopping: no dev improvement in {stale} evaluations (step {step} of {steps})"
            break
    bar.close()
    if log is not None:
        log.close()
    folder.plot()
    return {
        **result,
        "steps": step,
        "best": best,
        "out": str(folder.out),
        "outputs": folder.output_paths(),
        "truncated": {n: s.get("truncated", 0) for n, s in data.stats.items()},
        "padding_free": packed,
        "wall_seconds": time.time() - started,
    }


def _optimizer(cfg: FinetuneConfig, model, owners: dict, device: str, world: World):
    if cfg.method == "galore":
        groups = galore_param_groups(
            model, rank=cfg.galore_rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.galore_scale
        )
        opt = GaLoreAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        groups = []
        for owner, params in owners.items():
            if cfg.method == "deep-lora" and owner != "head":
                groups += deep_lora_param_groups(model, owner, cfg.lr)
            else:
                groups.append({"params": params, "lr": cfg.lr})
        cuda = device.startswith("cuda") and world.parallel != "fsdp"  # shards: DTensor's foreach ops
        fused = {"fused": True} if cuda else {"foreach": True}
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


def _padding_free(cfg: FinetuneConfig, model, names: list[str], device: str) -> bool:
    """Whether this run packs its rows: asked for, or by default on CUDA where it applies (one
    adapter or the whole model, a model family the packed attention supports)."""
    if cfg.padding_free is False:
        return False
    fits = len(names) == 1 and supports_varlen(model)
    if cfg.padding_free and not fits:
        use_varlen_attention(model)  # raises, naming what does not fit
    return fits and (cfg.padding_free or torch.device(device).type == "cuda")


def _batch(cfg, data, rows: dict[str, list[int]], tok, device, packed: bool) -> dict:
    """The rows of each tenant, one after the other, padded or packed, and each row's tenant."""
    examples, tenant = [], []
    for name, idx in rows.items():
        examples += [data.train[name][i] for i in idx]
        tenant += [name] * len(idx)
    cpu = pack(examples) if packed else collate(examples, tok.pad_token_id)
    pin = torch.device(device).type == "cuda"  # pinned: the copy does not wait for the GPU's queue
    batch = {
        k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) if isinstance(v, torch.Tensor) else v
        for k, v in cpu.items()
    }
    batch["tenant"] = tenant
    batch["tokens"] = int(cpu["cu_seq_lens"][-1]) if packed else int(cpu["attention_mask"].sum())
    return batch


def _compress(cfg, model, batch: dict, name: str, sizes: list[int]) -> None:
    """Deep LoRA's compression of tenant ``name``'s adapter from one batch's gradient."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if cfg.task == "causal-lm":
        compress(model, {**inputs, "labels": batch["labels"]}, name=name)
    else:
        classes = batch["classes"]
        compress(model, inputs, name=name, loss_fn=lambda out, _: head_losses(out.logits, classes, sizes, None).mean())


def _rows_adapters(model, cfg, tenant: list[str]):
    """Each row through its tenant's adapter; one tenant: its adapter is the active one."""
    if not cfg.adapter or len(set(tenant)) == 1 and getattr(model, "loraflow_active", None) == tenant[0]:
        return contextlib.nullcontext()
    return use_adapters(model, tenant)


def _row_losses(cfg, model, batch, sizes, class_weights) -> torch.Tensor:
    packed = "cu_seq_lens" in batch
    if cfg.task == "causal-lm":
        return packed_token_losses(model, batch) if packed else token_losses(model, batch)
    if packed:
        logits = packed_classify(model, batch)
    else:
        logits = classify(model, batch["input_ids"], batch["attention_mask"])
    return head_losses(logits, batch["classes"], sizes, class_weights)


def _class_weights(cfg: FinetuneConfig, data) -> list[torch.Tensor] | None:
    """Per head, weights n / (K · count_k) from the training labels (inverse frequency)."""
    if not cfg.class_weights or cfg.task != "classification":
        return None
    examples = data.train["default"]
    weights = []
    for j, k in enumerate(data.head_sizes):
        counts = torch.bincount(torch.tensor([e.classes[j] for e in examples]), minlength=k).float()
        weights.append(len(examples) / (k * counts.clamp(min=1)))
    return weights


def _denominators(cfg, data, micro, class_weights) -> dict[str, float]:
    """N_t: each tenant's labelled tokens (causal LM) or rows (classification; weighted: the sum
    of the rows' class weights over heads / heads) over the whole step."""
    denom = {}
    for name, examples in data.train.items():
        idx = [i for rows in micro for i in rows[name]]
        if cfg.task == "causal-lm":
            n = sum(_loss_tokens(examples[i]) for i in idx)
        else:
            n = len(idx)
        denom[name] = float(max(1, n))
    return denom


def _loss_tokens(example) -> int:
    """The tokens that a causal-LM example is scored on (labels after the first), counted once."""
    if not hasattr(example, "_loss_tokens"):
        example._loss_tokens = sum(1 for t in example.labels[1:] if t != -100)
    return example._loss_tokens


def _checkpoint(out: Path, step: int, tensors: dict, model, opt, best: dict, stale: int, world: World,
                global_batch: int) -> None:  # fmt: skip
    """The trained tensors, whole (gathered under FSDP), and the optimizer's state by parameter
    name, whole, so that any number of processes resumes it; the first process writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optimizer = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.main:
        world.barrier()
        return

    def write(folder: Path) -> None:
        save_file(tensors, folder / "trainable.safetensors")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {"optimizer": optimizer, "step": step, "best": best, "stale": stale, "rng": rng,
                 "global_batch": global_batch}  # fmt: skip
        torch.save(state, folder / "state.pt")

    save_checkpoint(out, step, write, CKPT_FILES)
    world.barrier()


def _resume(folder: Path, model, opt, owners: dict, global_batch: int) -> tuple[int, dict, int]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    tensors = load_file(folder / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) ^ {n for n, p in params.items() if p.requires_grad})
    if missing:
        raise ValueError(
            f"the checkpoint in {folder} does not fit this model (differs in {missing[:3]}); start a new run"
        )
    state = torch.load(folder / "state.pt", weights_only=True)
    saved = state.get("global_batch", global_batch)  # older checkpoints: not recorded
    if saved != global_batch:
        raise ValueError(
            f"--resume: {folder} was trained on {saved} rows per tenant a step and this run takes {global_batch} "
            "(--batch-size x processes x --accumulation); choose them so the two match"
        )
    whole = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, tensors, options=whole)  # shards: each process takes its own
    if all(isinstance(k, str) for k in state["optimizer"]["state"]):  # by parameter name
        set_optimizer_state_dict(model, opt, state["optimizer"], options=whole)
    else:  # by index: checkpoints of earlier versions
        opt.load_state_dict(state["optimizer"])
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["best"], state["stale"]
