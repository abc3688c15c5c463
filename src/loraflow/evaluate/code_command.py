"""``loraflow eval --task code``: pass@k of several adapters (and the base model) on MBPP or
HumanEval, generated in one batched run with each row through its own adapter, every program
executed in a sandboxed process (``evaluate/sandbox.py``).

Additive adapters (LoRA, Deep LoRA) and the base model generate through ``lf.Engine``
(continuous batching, the server's kernels); FLoRA adapters, which the engine does not serve
yet, through the Hugging Face model's ``generate`` under ``use_adapters`` (--batch-size rows
at once, each through its own adapter).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loraflow.atomic import atomic_write
from loraflow.evaluate.code import Problem, generate_completions, load_humaneval, load_mbpp, prompt_ids, score


def named_adapters(specs: list[str]) -> dict[str, str]:
    """``NAME=DIR`` or ``DIR`` (named by its folder) -> {name: dir}."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if name in out or name == "base":
            raise ValueError(f"--adapter name {name!r} is repeated or reserved ('base' is the base model)")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--adapter {path} does not exist")
        out[name] = path
    return out


def run_code(args, out: Path) -> dict:
    from loraflow.adapters.files import read_adapter

    ks = tuple(int(k) for k in str(args.k).split(",") if k.strip())
    if max(ks) > args.samples:
        raise ValueError(f"pass@{max(ks)} needs at least {max(ks)} completions a problem: raise --samples")
    adapters = named_adapters(args.adapter)
    if not adapters and not args.base:
        raise ValueError("nothing to score: give --adapter DIR (repeatable) and/or --base")
    if args.benchmark == "humaneval":
        problems = load_humaneval(args.data)
    else:
        if not args.data:
            raise ValueError("--benchmark mbpp needs --data: MBPP's mbpp.jsonl (examples/data/mbpp/mbpp.jsonl)")
        problems = load_mbpp(args.data, args.split)
    problems = problems[: args.limit] if args.limit else problems
    kinds = {name: read_adapter(path)[0].kind for name, path in adapters.items()}
    flora = {n: p for n, p in adapters.items() if kinds[n] == "FLORA"}  # the engine serves additive kinds
    served = {n: p for n, p in adapters.items() if n not in flora}
    rows = ([None] if args.base else []) + list(served)
    completions = {}
    if rows:
        import loraflow as lf

        engine = lf.Engine(args.model, adapters=served, device=args.device, max_gpu_adapters=max(1, len(served)))
        completions = generate_completions(
            engine, problems, rows, args.samples, args.temperature, args.max_tokens, chat=True
        )
        del engine
    if flora:
        completions |= _generate_hf(args, problems, flora, list(flora))
    results, lines = {}, []
    for name, answers in completions.items():
        report = score(problems, answers, ks, args.timeout, args.memory_mb)
        for r, texts in zip(report.pop("problems"), answers):
            lines.append(json.dumps({"adapter": name, **r, "completions": texts}) + "\n")
        results[name] = report
    summary = {"benchmark": args.benchmark, "split": args.split, "problems": len(problems), "results": results}
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    atomic_write(out / "predictions.jsonl", lambda tmp: Path(tmp).write_text("".join(lines)))
    return summary


@torch.no_grad()
def _generate_hf(args, problems: list[Problem], adapters: dict[str, str], rows: list[str | None]) -> dict:
    """Batched ``generate`` on the Hugging Face model, each row through its adapter."""
    import loraflow as lf

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tok = lf.load_model(args.model, dtype=dtype, device=args.device)
    for name, path in adapters.items():
        lf.load_adapter(model, path, name=name)

    class _Shim:  # what prompt_ids needs of an engine
        tokenizer = tok

        @staticmethod
        def tokenize(text: str) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

    prompts = [prompt_ids(_Shim, p) for p in problems]
    jobs = [(a, i) for a in rows for i in range(len(problems)) for _ in range(args.samples)]
    texts: list[str] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    chunk = max(1, args.batch_size)
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        width = max(len(prompts[i]) for _, i in part)
        ids = torch.full((len(part), width), pad)
        mask = torch.zeros(len(part), width, dtype=torch.long)
        for j, (_, i) in enumerate(part):  # left padding: every row's next token at the end
            ids[j, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[j, width - len(prompts[i]) :] = 1
        sampling = (
            {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
        )
        with lf.use_adapters(model, [a for a, _ in part]):
            gen = model.generate(
                input_ids=ids.to(args.device), attention_mask=mask.to(args.device), max_new_tokens=args.max_tokens,
                pad_token_id=pad, **sampling,
            )  # fmt: skip
        texts += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    it = iter(texts)
    return {("base" if a is None else a): [[next(it) for _ in range(args.samples)] for _ in problems] for a in rows}
