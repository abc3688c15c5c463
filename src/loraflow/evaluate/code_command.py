"""``loraflow eval --task code``: pass@k of several adapters (and the base model) on MBPP or
HumanEval, generated in one batched run with each row through its own adapter, every program
executed in a sandboxed process (``evaluate/sandbox.py``).

Generation runs through ``lf.Engine`` (continuous batching, the server's kernels), LoRA,
FLoRA and Deep LoRA rows and the base model's in the same batches.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraflow.atomic import atomic_write
from loraflow.evaluate.code import generate_completions, load_humaneval, load_mbpp, score


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
    rows = ([None] if args.base else []) + list(adapters)
    import loraflow as lf

    engine = lf.Engine(args.model, adapters=adapters, device=args.device, max_gpu_adapters=max(1, len(adapters)))
    completions = generate_completions(
        engine, problems, rows, args.samples, args.temperature, args.max_tokens, chat=True
    )
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
