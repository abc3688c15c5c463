"""The report of a GaLore quality run (benchmarks/scripts/galore_quality.sh): each run's
held-out loss and perplexity, GaLore's and the low-rank baseline's perplexity relative to
AdamW's (target: GaLore within 3%), tokens, tokens/s, and the loss curves.

    python benchmarks/scripts/report_galore_quality.py IN_DIR OUT_PREFIX

IN_DIR holds each run's log as <run>.jsonl (adamw, galore, lowrank) and the env.json that
the script wrote; OUT_PREFIX.json, .md and .png are written. Runs are compared at the last
evaluation step they all reached (the final one when every run is complete).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from loraflow.bench import report

TARGET = 0.03  # GaLore's perplexity at most 3% above AdamW's
LABELS = {"adamw": "AdamW", "galore": "GaLore", "lowrank": "low-rank W = BA"}
PAPER = (
    "GaLore paper, Table 2, LLaMA 60M on C4 after 1.1B tokens: perplexity 34.06 full-rank (AdamW), "
    "34.88 GaLore (+2.4%), 78.18 low-rank (+130%)"
)


def read_log(path: Path) -> list[dict]:
    """The records in step order; a step logged twice (a run killed after its checkpoint and
    resumed) keeps its last record."""
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def speed(records: list[dict]) -> tuple[float, float | None]:
    """(training seconds, tokens/s) over the intervals that end at a record with tokens_per_s."""
    seconds, previous = 0.0, 0
    for r in records:
        if "tokens_per_s" in r:
            seconds += (r["tokens"] - previous) / r["tokens_per_s"]
            previous = r["tokens"]
    return seconds, (previous / seconds if seconds else None)


def summarize(logs: dict[str, list[dict]], steps: int | None) -> tuple[int, list[dict]]:
    """(the step the runs are compared at, one row per run)."""
    evals = {n: {r["step"]: r for r in rs if "eval_loss" in r} for n, rs in logs.items()}
    empty = [n for n, e in evals.items() if not e]
    if empty:
        raise ValueError(f"no evaluation yet in {', '.join(empty)}: run the script longer (or again, to resume)")
    at = max(set.intersection(*(set(e) for e in evals.values())), default=None)
    if at is None:
        raise ValueError("the runs share no evaluation step: give them the same --eval-every")
    base = evals["adamw"][at]["eval_loss"] if "adamw" in evals else None
    rows = []
    for name, records in logs.items():
        seconds, tokens_per_s = speed(records)
        loss = evals[name][at]["eval_loss"]
        rows.append(
            {
                "run": name,
                "label": LABELS.get(name, name),
                "step": at,
                "tokens": evals[name][at]["tokens"],
                "eval_loss": loss,
                "eval_ppl": math.exp(loss),
                "ppl_vs_adamw": math.exp(loss - base) - 1 if base is not None else None,
                "last_step": records[-1]["step"],
                "complete": steps is not None and records[-1]["step"] >= steps,
                "train_seconds": seconds,
                "tokens_per_s": tokens_per_s,
            }
        )
    return at, rows


def targets(rows: list[dict]) -> list[dict]:
    galore = next((r for r in rows if r["run"] == "galore" and r["ppl_vs_adamw"] is not None), None)
    if galore is None:
        return []
    return [
        {
            "target": f"GaLore's held-out perplexity within {100 * TARGET:.0f}% of AdamW's",
            "measured": f"{100 * galore['ppl_vs_adamw']:+.2f}% at {galore['tokens']:,} tokens",
            "met": galore["ppl_vs_adamw"] <= TARGET,
        }
    ]


def markdown(env: dict, at: int, rows: list[dict]) -> str:
    corpus = env.get("corpus") or {}
    view = [
        dict(
            r,
            tokens_m=r["tokens"] / 1e6,
            vs=f"{100 * r['ppl_vs_adamw']:+.2f}%" if r["ppl_vs_adamw"] is not None else "",
            done=f"{r['last_step']}/{env.get('steps', '?')}",
        )
        for r in rows
    ]
    lines = [
        f"# GaLore quality: LLaMA {env.get('config', '60m')} from scratch, AdamW vs GaLore vs low-rank",
        "",
        f"- device: {env.get('device', '?')}; torch {env.get('torch', '?')}; date: {env.get('date', '?')}",
        f"- command: `{env.get('command', '?')}`; status: {env.get('status', '?')}",
        *[f"- {n}: `{c}`" for n, c in env.get("run_commands", {}).items()],
        (
            f"- corpus: {corpus['files']} distinct Python files, {corpus['mb']:.0f} MB, of the machine's site-packages "
            "(identical files once; file order by content hash, the last 5% held out)"
            if corpus
            else "- corpus: a folder given by hand (DATA), the last 5% of its files held out"
        )
        + f"; byte-level BPE of {env.get('vocab_size', '?')} tokens; {env.get('train_tokens', 0) / 1e6:.1f}M training "
        f"tokens ({env.get('epochs', 0):.2f} epochs of them per run), {env.get('eval_tokens', 0) / 1e6:.2f}M held-out",
        f"- {env.get('batch', '?')} sequences of {env.get('seq', '?')} tokens per step, {env.get('steps', '?')} steps, "
        f"warmup {env.get('warmup', '?')} then cosine to 10%; bf16 autocast, float32 weights and optimizer states; "
        f"held-out loss on {env.get('eval_seqs', '?')} sequences spread over the held-out files",
        "- the runs trained at the same time, sharing GPUs, so tokens/s is each run's share (evaluation "
        "excluded); calls: " + "; ".join(f"{c['wall_s']} s, {c['status']}" for c in env.get("calls", [])),
        f"- compared at step {at}, the last evaluation every run reached",
        "",
        "## Target",
        "",
        report.table(targets(rows), [("target", "target", ""), ("measured", "measured", ""), ("met", "met", "")]),
        "",
        "## Runs",
        "",
        report.table(
            view,
            [
                ("label", "run", ""),
                ("tokens_m", "tokens (M)", ".3f"),
                ("eval_loss", "held-out loss", ".4f"),
                ("eval_ppl", "perplexity", ".2f"),
                ("vs", "vs AdamW", ""),
                ("tokens_per_s", "tokens/s", ".0f"),
                ("done", "steps done", ""),
            ],
        ),
        "",
        f"For scale: {PAPER}. Different data (Python sources here, C4 there) and "
        f"{1.1e9 / max(r['tokens'] for r in rows):.0f}x fewer tokens here: only the ratios compare.",
        "",
    ]
    return "\n".join(lines)


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def figure(logs: dict[str, list[dict]]):
    plt = report.pyplot()
    fig, (ev, tr) = plt.subplots(1, 2, figsize=(12, 4))
    for name, records in logs.items():
        evals = [r for r in records if "eval_loss" in r]
        ev.plot(
            [r["tokens"] / 1e6 for r in evals],
            [r["eval_loss"] for r in evals],
            marker=".",
            label=LABELS.get(name, name),
        )
        tr.plot(
            [r["tokens"] / 1e6 for r in records],
            moving_average([r["loss"] for r in records], 25),
            label=LABELS.get(name, name),
        )
    ev.set(xlabel="training tokens (M)", ylabel="held-out loss", title="held-out loss")
    tr.set(xlabel="training tokens (M)", ylabel="training loss (mean of 25 steps)", title="training loss")
    for ax in (ev, tr):
        ax.set_ylim(top=min(ax.get_ylim()[1], 8))
        ax.grid(alpha=0.3)
    ev.legend()
    fig.tight_layout()
    return fig


def main(argv: list[str]) -> list[Path]:
    if len(argv) != 2:
        raise SystemExit("usage: report_galore_quality.py IN_DIR OUT_PREFIX")
    folder, prefix = Path(argv[0]), Path(argv[1])
    paths = sorted(folder.glob("*.jsonl"))
    if not paths:
        raise SystemExit(f"no <run>.jsonl logs in {folder}")
    env = json.loads((folder / "env.json").read_text()) if (folder / "env.json").is_file() else {}
    order = list(LABELS) + sorted(p.stem for p in paths if p.stem not in LABELS)
    logs = {n: read_log(folder / f"{n}.jsonl") for n in order if (folder / f"{n}.jsonl").is_file()}
    at, rows = summarize(logs, env.get("steps"))
    curves = {
        n: [{k: r[k] for k in ("step", "tokens", "eval_loss")} for r in rs if "eval_loss" in r]
        for n, rs in logs.items()
    }
    payload = {
        "environment": env,
        "compared_at_step": at,
        "targets": targets(rows),
        "runs": rows,
        "eval_curves": curves,
    }
    text = markdown(env, at, rows)
    written = report.write(prefix.parent, prefix.name, payload, text, figure(logs))
    print(text)
    print("wrote", *written)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
