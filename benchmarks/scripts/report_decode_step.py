"""The decode step against its physical limit, from files measured on the GPU machine:
``engine_steps.py`` runs of the library before and after a change (same card, same session)
and a ``decode_attention.py`` run (its copy bandwidth, the kernel's tilings). Writes
OUT/decode-step-<card>.json, .md and .png.

The roofline of a step is the bytes it must read over the measured copy bandwidth: the
weights once (all linear layers and the output head; the embedding rows gathered are
negligible), every sequence's keys and values at the median context of the timed steps
(``prompt_len`` + half of ``steps``), and with adapters, each adapter's factors once.

    python benchmarks/scripts/report_decode_step.py OUT_DIR ATTENTION.json NAME=BEFORE.json,AFTER.json ...
"""

import argparse
import json
import sys
from pathlib import Path

from loraflow.bench import report
from loraflow.serve.llama import SHAPES, LlamaArgs, linear_shapes

RANK = 16
ENGINE = "chunk=None block_n=32 warps=4 stages=None"  # the tiling the engine's after-runs used


def step_bytes(prompt_len: int, steps: int, requests: int, adapters: bool) -> float:
    a = LlamaArgs(**SHAPES["llama2-7b"])
    linear = sum(o * i for o, i in linear_shapes(a).values())
    weights = 2 * (linear + a.vocab_size * a.dim)  # bf16: linear layers and lm_head
    context = prompt_len + steps // 2
    kv = 2 * 2 * requests * context * a.n_layers * a.n_kv_heads * a.head_dim  # K and V, bf16
    factors = 2 * requests * RANK * sum(o + i for o, i in linear_shapes(a).values()) if adapters else 0
    return weights + kv + factors


def args_of(command: str) -> dict:
    words = command.split()
    get = lambda flag, default: int(words[words.index(flag) + 1]) if flag in words else default
    return {"prompt_len": get("--prompt-len", 128), "steps": get("--steps", 48), "requests": get("--requests", 64)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("attention")
    ap.add_argument("pairs", nargs="+", help="NAME=BEFORE.json,AFTER.json")
    args = ap.parse_args()
    attention = json.loads(Path(args.attention).read_text())
    bw = attention["copy_bandwidth_GBps"] * 1e9
    rows = []
    for pair in args.pairs:
        name, files = pair.split("=")
        runs = [json.loads(Path(f).read_text()) for f in files.split(",")]
        for label, run in zip(("before", "after"), runs):
            w = args_of(run["command"])
            for r in run["rows"]:
                if not r.get("graphs") or "decode_step_ms" not in r or r.get("kernel") not in (None, "siblings"):
                    continue
                adapters = r["adapters"] != "base"
                floor_ms = 1e3 * step_bytes(w["prompt_len"], w["steps"], w["requests"], adapters) / bw
                rows.append(
                    {
                        "workload": name,
                        "code": label,
                        "adapters": r["adapters"],
                        "decode_step_ms": r["decode_step_ms"],
                        "graph_replay_ms": r["graph_replay_ms"],
                        "roofline_ms": floor_ms,
                        "of_roofline": floor_ms / r["decode_step_ms"],
                        "device": run["device"],
                        "date": run["date"],
                        "command": run["command"],
                    }
                )
    payload = {
        "environment": report.environment(),
        "copy_bandwidth_GBps": bw / 1e9,
        "attention": attention,
        "rows": rows,
        "note": "measured on the GPU machine; this file was assembled from its JSON by " + " ".join(sys.argv),
    }
    cols = [
        ("workload", "workload", ""),
        ("code", "library", ""),
        ("adapters", "adapters", ""),
        ("decode_step_ms", "step ms", ".2f"),
        ("roofline_ms", "roofline ms", ".2f"),
        ("of_roofline", "of roofline", ".0%"),
    ]
    device = rows[0]["device"]
    md = (
        f"# Decode step of 64 sequences, Llama-2-7B shape, against its bytes ({device})\n\n"
        f"Measured {rows[0]['date']} (engine) and {attention['date']} (kernel); copy bandwidth "
        f"{bw / 1e9:.0f} GB/s. Commands: `{rows[0]['command']}` and the others in the JSON; "
        "before: the library at 0145abe; after: at cefe6f5 (one program a context, 32 keys a step, 4 warps: "
        "the engine's default).\n\n" + report.table(rows, cols) + "\n"
    )
    ctx_rows = [r for r in attention["rows"] if "us" in r]
    md += (
        "\n## The paged decode-attention kernel, per layer (64 x 32 heads of 128)\n\n"
        f"The engine's tiling (`{ENGINE}`), the fastest of the others, the kernel before (old) and "
        "PyTorch's dense flash attention over the same keys and values stored contiguously. The kernel "
        "timed is `serve/paged_attention.py` at cefe6f5 (its `chunk=` fixed-size chunks, since replaced by "
        "`splits=`); old: at 0145abe.\n\n"
    )
    best = {}
    for r in ctx_rows:
        if r["variant"] not in ("old", "dense flash (not paged)"):
            c = r["context"]
            best[c] = min(best.get(c, r), r, key=lambda x: x["us"])
    kernel = [r for r in ctx_rows if r["variant"] in ("old", "dense flash (not paged)", ENGINE)]
    kernel += [r for r in best.values() if r["variant"] != ENGINE]
    md += report.table(
        sorted(kernel, key=lambda r: (r["context"], r["us"])),
        [
            ("context", "context", ""),
            ("variant", "kernel", ""),
            ("us", "us", ".1f"),
            ("of_roofline", "of roofline", ".0%"),
        ],
    )
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['workload']}\n{r['adapters']}\n{r['code']}" for r in rows]
    ax.bar(
        range(len(rows)),
        [r["decode_step_ms"] for r in rows],
        color=["#bbb" if r["code"] == "before" else "#37a" for r in rows],
    )
    ax.scatter(
        range(len(rows)),
        [r["roofline_ms"] for r in rows],
        color="k",
        marker="_",
        s=400,
        label="roofline (bytes / copy bandwidth)",
    )
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("decode step, ms")
    ax.set_title(f"Decode step of 64 sequences, Llama-2-7B shape, {device}")
    ax.legend()
    stem = "decode-step-" + ("h100" if "H100" in device else "h200" if "H200" in device else "gpu")
    for p in report.write(args.out, stem, payload, md, fig):
        print(p)
    print(md)


if __name__ == "__main__":
    main()
