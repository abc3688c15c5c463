"""Tables and plots of ``loraflow bench serve``."""

from __future__ import annotations

KIND_NAMES = {"lora": "LoRA", "flora": "FLoRA", "mixed": "LoRA and FLoRA (every other one)"}


def markdown(env: dict, p: dict) -> str:
    from loraflow.bench.report import table

    w = p["workload"]
    arrivals = "all at once" if not w["rate"] else f"{w['rate']} req/s (Poisson)"
    rows = [dict(run="with adapters", **p["adapters"]), dict(run="base model only", **p["base"])]
    hf = p.get("hf_generate") or {}
    rows += [dict(run=HF_ROWS[k], **hf[k]) for k in HF_ROWS if k in hf]
    lines = [
        "# Serving benchmark: many adapters per batch",
        "",
        f"- device: {env['device']}; torch {env['torch']}; date: {env['date']}",
        f"- command: `{env['command']}`",
        f"- workload: {w['requests']} requests, {arrivals}, "
        f"prompt {w['prompt_len']} tokens, output {w['output_len']} tokens (ignore_eos), {w['mix']} mix over "
        f"{w['adapters']} rank-{w['rank']} {KIND_NAMES[w.get('kind', 'lora')]} adapters on all linear layers, "
        f"{w['registered']} adapter names registered"
        + (f" (their files: {w['files']} folders, linked round robin)" if w.get("files") else ""),
        "- streamed through the HTTP API on loopback; the server ran "
        + (
            "in the load generator's process (engine on a thread)"
            if p.get("in_process")
            else "as its own process (`loraflow serve`)"
        ),
        "",
        table(
            rows,
            [
                ("run", "run", ""),
                ("output_tokens_per_s", "output tok/s", ".1f"),
                ("ttft_p50_ms", "TTFT p50 (ms)", ".0f"),
                ("ttft_p99_ms", "TTFT p99 (ms)", ".0f"),
                ("itl_p50_ms", "ITL p50 (ms)", ".1f"),
                ("itl_p99_ms", "ITL p99 (ms)", ".1f"),
                ("wall_s", "wall (s)", ".1f"),
                ("errors", "errors", ""),
            ],
        ),
        "",
        f"- adapters / base throughput: **{p['adapters_over_base']:.2f}** (target >= 0.90)"
        + (
            f" from each kind's median run of {len(p['pairs'])}; the runs in turn: "
            + ", ".join(
                f"{q['adapters_tokens_per_s']:.0f} / {q['base_tokens_per_s']:.0f} = {q['ratio']:.2f}"
                for q in p["pairs"]
            )
            if len(p.get("pairs", [])) > 1
            else ""
        ),
    ]
    lines += step_lines(p.get("pairs", []))
    lines += tier_lines(p.get("server") or {})
    if hf:
        lines += hf_lines(p)
    if "roofline" in p:
        r = p["roofline"]
        lines += [
            f"- that ratio at the roofline, with every decode step at the copy bandwidth: {r['ratio_bound']:.2f} "
            f"(a decode step of the batch reads {r['weights_gb']:.1f} GB of weights and {r['kv_gb']:.1f} GB of keys "
            f"and values at the average context; its {r['distinct_adapters']} distinct adapters add "
            f"{r['adapters_gb']:.1f} GB). A base step slower than its roofline hides some of the adapters' "
            f"bytes, so a measured ratio can exceed this one"
        ]
    if "peft" in p:
        q = p["peft"]
        lines += [
            f"- transformers + PEFT mixed-batch generate ({q['requests']} requests, {q['batch']} rows per call, "
            f"{q['output_tokens'] // max(1, q['requests'])} output tokens each): "
            f"{q['output_tokens_per_s']:.1f} output tok/s; ours / PEFT: **{p['ours_over_peft']:.1f}x** (target >= 10)"
        ]
    else:
        lines += [
            "- transformers + PEFT baseline: not measured in this run"
            + (f" ({p['peft_note']})" if p.get("peft_note") else "")
        ]
    return "\n".join(lines) + "\n"


def tier_lines(m: dict) -> list[str]:
    """The adapters' trips between tiers over the server's life (warm-up included), from /metrics."""
    loads, writes = m.get("loraflow_adapter_loads_total", 0), m.get("loraflow_adapter_slot_writes_total", 0)
    if not loads and not writes:
        return []
    load_ms = 1e3 * m.get("loraflow_adapter_load_seconds_total", 0) / max(loads, 1)
    write_ms = 1e3 * m.get("loraflow_adapter_slot_write_seconds_total", 0) / max(writes, 1)
    return [
        f"- adapter tiers over the server's life (warm-up included): {loads:.0f} loads from disk to host memory, "
        f"{load_ms:.1f} ms each on a loader thread; {writes:.0f} writes to a device slot, {write_ms:.2f} ms each "
        f"of the engine thread (on CUDA from page-locked memory: the copies queued, not waited for); "
        f"hit rate {m.get('loraflow_adapter_hit_rate', 0):.2f}"
    ]


HF_BARS = [("compiled", "HF generate\ncompiled static", "tab:orange"), ("eager", "HF generate\neager", "tab:olive")]
HF_ROWS = {  # the --hf-baseline rows (bench/hf_generate.py), by their key in p["hf_generate"]
    "compiled": "transformers generate, static cache + torch.compile, no adapters",
    "eager": "transformers generate, dynamic cache, eager, no adapters",
}


def hf_lines(p: dict) -> list[str]:
    """The --hf-baseline's lines: how it ran, and ours (with adapters) over each of its rows."""
    hf = p["hf_generate"]
    ours = p["adapters"]["output_tokens_per_s"]
    some = hf.get("compiled") or hf["eager"]
    lines = [
        f"- transformers `generate` rows: the same model, weights and prompts without adapters, greedy, "
        f"{some['requests']} requests as one batch of {some['batch']} rows (`generate` has no continuous batching), "
        f"{some['output_len']} new tokens each (min_new_tokens = max_new_tokens); the median of "
        f"{len(some['runs'])} timed runs after an untimed warm-up (the compiled row's compilation), "
        f"output tok/s = requests x output tokens / seconds of the run; the runs: "
        + "; ".join(
            f"{k} " + ", ".join(f"{r['output_tokens_per_s']:.0f}" for r in hf[k]["runs"]) for k in HF_ROWS if k in hf
        )
    ]
    if "compiled" in hf:
        c = hf["compiled"]
        hf_c = c["output_tokens_per_s"]
        lines += [
            f"- ours with adapters / transformers compiled static-cache generate: **{ours / hf_c:.2f}x**"
            f" (target >= 1.5x); base model only / it: {p['base']['output_tokens_per_s'] / hf_c:.2f}x"
            + ("" if c.get("compiled") else " (generate did not report compiling its decode step)")
        ]
    else:
        lines += ["- transformers compiled static-cache generate: not measured" + f" ({hf.get('compiled_note', '')})"]
    lines += [f"- ours with adapters / transformers eager generate: {ours / hf['eager']['output_tokens_per_s']:.2f}x"]
    return lines


def figure(p: dict):
    from loraflow.bench.report import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    hf = p.get("hf_generate") or {}
    bars = [("with adapters", p["adapters"], "tab:blue"), ("base only", p["base"], "tab:gray")]
    bars += [(label, hf[k], color) for k, label, color in HF_BARS if k in hf]
    bars += [("transformers + PEFT", p["peft"], "tab:red")] if "peft" in p else []
    names, values = [b[0] for b in bars], [b[1]["output_tokens_per_s"] for b in bars]
    axes[0].bar(names, values, color=[b[2] for b in bars])
    axes[0].tick_params(axis="x", labelrotation=20 if len(bars) > 3 else 0)
    axes[0].set(ylabel="output tokens / s", title="throughput")
    for i, v in enumerate(values):
        axes[0].text(i, v, f"{v:.0f}", ha="center", va="bottom")
    labels = ["TTFT p50", "TTFT p99", "ITL p50", "ITL p99"]
    keys = ["ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"]
    x = range(len(keys))
    axes[1].bar([i - 0.2 for i in x], [p["adapters"][k] for k in keys], 0.4, label="with adapters")
    axes[1].bar([i + 0.2 for i in x], [p["base"][k] for k in keys], 0.4, label="base only", color="tab:gray")
    axes[1].set(xticks=list(x), xticklabels=labels, ylabel="ms", yscale="log", title="latency")
    axes[1].legend()
    fig.tight_layout()
    return fig


def step_lines(pairs: list[dict]) -> list[str]:
    """Each timed run's engine steps by kind (count x mean ms), from the server's /metrics."""

    def steps(d: dict) -> str:
        kinds = [k[: -len("_steps")] for k in d if k.endswith("_steps") and d[k]]
        text = ", ".join(f"{k} {d[k + '_steps']} x {d[k + '_step_ms']:.2f} ms" for k in kinds) or "none"
        if d.get("graph_captures"):  # a capture is inside one graph step's time
            text += f" ({d['graph_captures']} graph captures in them, {d['graph_capture_s']:.2f} s)"
        return text

    return [
        f"- engine steps of run {i + 1} (count x mean ms of the model and its tokens): with adapters "
        f"{steps(q['steps']['adapters'])}; base {steps(q['steps']['base'])}"
        for i, q in enumerate(pairs)
        if "steps" in q
    ]
