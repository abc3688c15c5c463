"""``loraflow bench finetune``: fine-tuning speed, side by side in one run.

1. LoRA tokens/s of ``loraflow finetune`` (the command's own code path, ``lf.finetune``)
   against transformers + PEFT with a plain training loop, on the same model, rows, batches
   and precision (bfloat16 frozen weights, float32 adapters, bfloat16 autocast, AdamW, gradient
   clipping), for the embedded default model and a Llama-shaped model with random weights
   (``--shapes default,1b``). The data is packed text (every row ``--max-length`` tokens, no
   padding), so tokens/s counts work done. Steady state: the steps after ``--warmup``.
2. Many tenants in one job: ``--tenants`` adapters, each with a small batch (``--tenant-batch``
   rows), trained together in mixed batches (each row through its own adapter) against one
   after another, each alone on the same rows: training wall-clock of both (model loading
   left out of both), and the gain.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from loraflow.finetune.config import FinetuneConfig

TEXT = Path(__file__).resolve().parents[3] / "examples" / "data" / "tinyshakespeare" / "input.txt"


def model_folder(shape: str, work: Path, device: str) -> str | None:
    """None for the embedded default model; else a random Llama of ``shape`` (lf.llama_config)
    with the default model's tokenizer, saved in bfloat16 under ``work``."""
    if shape == "default":
        return None
    from transformers import AutoTokenizer, LlamaForCausalLM

    import loraflow as lf
    from loraflow.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    folder = work / f"llama-{shape}"
    with torch.device(device):
        model = LlamaForCausalLM(lf.llama_config(shape, vocab_size=len(tok), max_seq_len=4096)).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return str(folder)


def text_files(work: Path, parts: int, chars: int) -> list[str]:
    """``parts`` files of ``chars`` characters each, consecutive slices of tinyshakespeare."""
    text = TEXT.read_text()
    files = []
    for i in range(parts):
        path = work / f"text-{i}.txt"
        path.write_text(text[(i * chars) % len(text) :][:chars])
        files.append(str(path))
    return files


def steady(log: list[dict], warmup: int) -> dict:
    """Tokens/s and seconds a step over the records after the first ``warmup`` steps."""
    part = [r for r in log if r["step"] > warmup]
    seconds = sum(r["seconds"] for r in part)
    return {"tokens_per_s": sum(r["tokens"] for r in part) / seconds, "step_s": seconds / len(part)}


def run_ours(model: str | None, data, out: Path, steps: int, batch: int, max_length: int, device: str, **kw) -> dict:
    from loraflow.finetune.loop import finetune

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    source = {"tenants": data} if isinstance(data, dict) else {"data": data}
    cfg = FinetuneConfig(out=str(out), model=model, steps=steps, batch_size=batch, max_length=max_length,
                         dev_fraction=0.0, eval_every=steps, save_every=steps, device=device, progress=False,
                         warmup=0.0, **source, **kw)  # fmt: skip
    finetune(cfg)
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"log": log, "peak_gib": peak}


def run_peft(model: str | None, data: str, steps: int, batch: int, max_length: int, device: str, r: int,
             alpha: float, lr: float) -> dict:  # fmt: skip
    """transformers + PEFT, a plain loop over the same rows in the same order."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("the baseline of loraflow bench finetune needs PEFT: pip install peft") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.finetune.data import causal_lm_examples, collate
    from loraflow.finetune.sources import rows_of
    from loraflow.models.loading import default_model_path

    folder = model or default_model_path()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True).to(device)
    peft_model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    )
    params = [p for p in peft_model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=lr, **({"fused": True} if device.startswith("cuda") else {}))
    examples, _ = causal_lm_examples(data, tok, max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kind = torch.device(device).type
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    log = []
    peft_model.train()
    for step in range(steps):
        t0 = time.perf_counter()
        cpu = collate([examples[i] for i in rows_of(len(examples), 0, step, batch)], pad)
        b = {k: v.to(device) for k, v in cpu.items()}
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=kind == "cuda"):
            loss = peft_model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        log.append({"step": step + 1, "loss": value, "tokens": int(cpu["attention_mask"].sum()),
                    "seconds": time.perf_counter() - t0})  # fmt: skip
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    del peft_model, base, opt
    return {"log": log, "peak_gib": peak}


def run(args) -> dict:
    """Both comparisons; returns the rows of the report."""
    device = args.device
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    files = text_files(work, max(1, args.tenants), chars=args.max_length * 4 * args.batch_size * (args.steps + 2))
    speed = []
    for shape in args.shapes.split(","):
        model = model_folder(shape, work, device)
        common = dict(steps=args.steps, batch=args.batch_size, max_length=args.max_length, device=device)
        ours = run_ours(model, files[0], work / f"ours-{shape}", r=args.r, alpha=args.alpha, lr=2e-4, **common)
        theirs = run_peft(model, files[0], r=args.r, alpha=args.alpha, lr=2e-4, **common)
        a, b = steady(ours["log"], args.warmup), steady(theirs["log"], args.warmup)
        speed.append({
            "model": shape, "batch": args.batch_size, "max_length": args.max_length,
            "loraflow_tokens_per_s": a["tokens_per_s"], "peft_tokens_per_s": b["tokens_per_s"],
            "ratio": a["tokens_per_s"] / b["tokens_per_s"], "loraflow_peak_gib": ours["peak_gib"],
            "peft_peak_gib": theirs["peak_gib"], "loraflow_loss": [r["loss"] for r in ours["log"]],
            "peft_loss": [r["loss"] for r in theirs["log"]],
        })  # fmt: skip
        print(json.dumps({k: v for k, v in speed[-1].items() if not k.endswith("_loss")}), flush=True)
    tenants = {}
    if args.tenants > 1:
        names = {f"t{i:02d}": files[i] for i in range(args.tenants)}
        common = dict(steps=args.tenant_steps, batch=args.tenant_batch, max_length=args.max_length, device=device)
        together = run_ours(None, names, work / "together", r=args.r, alpha=args.alpha, **common)
        alone = [run_ours(None, {n: f}, work / f"alone-{n}", r=args.r, alpha=args.alpha, **common)
                 for n, f in names.items()]  # fmt: skip
        t_together = steady(together["log"], args.warmup)["step_s"] * args.tenant_steps
        t_alone = sum(steady(a["log"], args.warmup)["step_s"] * args.tenant_steps for a in alone)
        tenants = {
            "tenants": args.tenants, "rows_per_tenant": args.tenant_batch, "steps": args.tenant_steps,
            "together_s": t_together, "one_after_another_s": t_alone, "gain": t_alone / t_together,
        }  # fmt: skip
        print(json.dumps(tenants), flush=True)
    return {"speed": speed, "tenants": tenants, "settings": vars(args) | {"func": None}}


def markdown(result: dict, env: dict) -> str:
    from loraflow.bench.report import table

    lines = [
        "# loraflow bench finetune",
        "",
        f"{env['device']}, {env['date']}, torch {env['torch']}; command: `{env['command']}`",
        "",
        "LoRA (all linear layers) fine-tuning throughput, steady state, same rows and precision:",
        "",
        table(
            result["speed"],
            [
                ("model", "model", ""),
                ("batch", "batch", ""),
                ("max_length", "tokens a row", ""),
                ("loraflow_tokens_per_s", "loraflow tok/s", ",.0f"),
                ("peft_tokens_per_s", "transformers+PEFT tok/s", ",.0f"),
                ("ratio", "loraflow / PEFT", ".2f"),
                ("loraflow_peak_gib", "loraflow peak GiB", ".2f"),
                ("peft_peak_gib", "PEFT peak GiB", ".2f"),
            ],
        ),  # fmt: skip
    ]
    t = result["tenants"]
    if t:
        lines += [
            "",
            f"Many tenants: {t['tenants']} adapters, {t['rows_per_tenant']} rows each a step, {t['steps']} steps "
            "(the default model); training time, model loading left out:",
            "",
            table(
                [t],
                [
                    ("together_s", "together (s)", ".2f"),
                    ("one_after_another_s", "one after another (s)", ".2f"),
                    ("gain", "gain", ".2f"),
                ],
            ),  # fmt: skip
        ]
    return "\n".join(lines) + "\n"


def figure(result: dict):
    from loraflow.bench.report import pyplot

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [r["model"] for r in result["speed"]]
    x = range(len(names))
    a.bar([i - 0.2 for i in x], [r["loraflow_tokens_per_s"] for r in result["speed"]], 0.4, label="loraflow")
    a.bar([i + 0.2 for i in x], [r["peft_tokens_per_s"] for r in result["speed"]], 0.4, label="transformers+PEFT")
    a.set(xticks=list(x), xticklabels=names, ylabel="tokens/s", title="LoRA fine-tuning throughput")
    a.legend()
    t = result["tenants"]
    if t:
        b.bar(["together", "one after another"], [t["together_s"], t["one_after_another_s"]], color=["C0", "C1"])
        b.set(ylabel="training seconds", title=f"{t['tenants']} tenants: {t['gain']:.2f}x")
    fig.tight_layout()
    return fig
