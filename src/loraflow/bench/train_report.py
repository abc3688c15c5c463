"""Targets, tables and plots of ``loraflow bench train``."""

from __future__ import annotations


def _get(rows, **want):
    return next((r for r in rows if all(r.get(k) == v for k, v in want.items()) and "error" not in r), None)


def targets(rows: list[dict]) -> list[dict]:
    out = []
    ok = [r for r in rows if "error" not in r and r.get("analytic_state_bytes") is not None]
    if ok:
        bad = [r for r in ok if r["state_bytes"] != r["analytic_state_bytes"]]
        out.append(
            {
                "target": "optimizer-state bytes equal the analytic count (every run of ours)",
                "measured": f"{len(ok) - len(bad)}/{len(ok)} equal",
                "met": not bad,
            }
        )
    g, a = (
        _get(rows, config="7b", variant="galore", per_layer=False),
        _get(rows, config="7b", variant="adamw", per_layer=False),
    )
    if g and a:
        ratio = g["state_bytes"] / a["state_bytes"]
        out.append(
            {
                "target": "7B, GaLore rank 1024: states about 35% of AdamW's (paper: 65.5% less)",
                "measured": f"{100 * ratio:.1f}%",
                "met": ratio <= 0.40,
            }
        )
    m = _get(rows, config="7b", variant="galore8bit", per_layer=True, checkpointing=True)
    if m and m.get("peak_memory_bytes"):
        gb = m["peak_memory_bytes"] / 1e9
        out.append(
            {
                "target": "7B, 8-bit GaLore + per-layer + checkpointing, 256 tokens: peak <= 22 GB",
                "measured": f"{gb:.1f} GB",
                "met": gb <= 22,
            }
        )
    g1, a1 = (
        _get(rows, config="1b", variant="galore", per_layer=False),
        _get(rows, config="1b", variant="adamw", per_layer=False),
    )
    if g1 and a1:
        r = g1["tokens_per_s"] / a1["tokens_per_s"]
        out.append(
            {
                "target": "1B, GaLore rank 512, T=200: tokens/s (SVD amortised) at least 0.9x AdamW's",
                "measured": f"{r:.2f}x",
                "met": r >= 0.9,
            }
        )
    t1 = _get(rows, config="1b", variant="galore-torch", per_layer=False)
    if g1 and t1:
        faster = g1["tokens_per_s"] >= t1["tokens_per_s"]
        leaner = (g1.get("peak_memory_bytes") or 0) <= (t1.get("peak_memory_bytes") or 0)
        out.append(
            {
                "target": "1B: at least galore-torch's speed at no more memory",
                "measured": f"{g1['tokens_per_s'] / t1['tokens_per_s']:.2f}x speed "
                f"(between refreshes {g1['steady_tokens_per_s'] / t1['steady_tokens_per_s']:.2f}x; "
                f"SVD: ours {_svd_kind(g1)}, theirs full), "
                f"{(g1['peak_memory_bytes'] or 0) / 1e9:.3f} vs {(t1['peak_memory_bytes'] or 0) / 1e9:.3f} GB peak",
                "met": faster and leaner,
            }
        )
    return out


def markdown(env: dict, rows: list[dict]) -> str:
    from loraflow.bench.report import table

    view = [
        dict(
            r,
            state_gb=(r.get("state_bytes") or 0) / 1e9,
            analytic_gb=None if r.get("analytic_state_bytes") is None else r["analytic_state_bytes"] / 1e9,
            peak_gb=(r.get("peak_memory_bytes") or 0) / 1e9,
            **_options(r),
        )
        for r in rows
    ]
    return "\n".join(
        [
            "# Training benchmark: GaLore and friends",
            "",
            f"- device: {env['device']}; torch {env['torch']}; date: {env['date']}",
            f"- command: `{env['command']}`",
            *([f"- note: {env['note']}"] if env.get("note") else []),
            "- bf16 weights, random tokens, sequence 256; steady tokens/s over the steps after two warm-up steps",
            "- GaLore rows (ours and galore-torch's): `svd (s)` is one refresh of every projected weight's basis (each "
            "implementation's own SVD routine on real gradients, timed on its own); tokens/s amortises it over "
            "T = update_proj_gap steps: tokens per step / (steady step time + svd / T)",
            "",
            "## Targets",
            "",
            table(targets(rows), [("target", "target", ""), ("measured", "measured", ""), ("met", "met", "")]),
            "",
            "## Runs",
            "",
            table(
                view,
                [
                    ("config", "config", ""),
                    ("variant", "optimizer", ""),
                    ("per_layer", "per-layer", ""),
                    ("rank_shown", "rank", ""),
                    ("checkpointing", "ckpt", ""),
                    ("svd_kind", "SVD", ""),
                    ("moments", "moments", ""),
                    ("batch", "batch", ""),
                    ("accumulation", "accum.", ""),
                    ("state_gb", "states (GB)", ".3f"),
                    ("analytic_gb", "analytic (GB)", ".3f"),
                    ("peak_gb", "peak (GB)", ".2f"),
                    ("steady_tokens_per_s", "steady tokens/s", ".0f"),
                    ("svd_seconds", "svd (s)", ".3f"),
                    ("tokens_per_s", "tokens/s", ".0f"),
                    ("error", "note", ""),
                ],
            ),
            "",
        ]
    )


def _svd_kind(r: dict) -> str:
    return r.get("svd") or ("randomized" if r.get("randomized_svd") else "full")  # older JSON: a flag


def _options(r: dict) -> dict:
    """What each run's options mean for its optimizer: rank and SVD only for GaLore rows
    (galore-torch always runs its own full SVD), moments as that optimizer stores them."""
    v = r["variant"]
    galore, theirs = v.startswith("galore"), v.startswith("galore-torch")
    svd = "full (its own)" if theirs else _svd_kind(r) if galore else "-"
    moments = "8-bit" if v.endswith("8bit") else "weights' dtype" if theirs else r.get("state_dtype", "float32")
    return {"rank_shown": r["rank"] if galore else "-", "svd_kind": svd, "moments": moments}


def figure(rows: list[dict]):
    from loraflow.bench.report import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for pl in (False, True):
            sel = {
                r["config"]: r for r in rows if r["variant"] == variant and r["per_layer"] == pl and "error" not in r
            }
            if not sel:
                continue
            xs = [c for c in configs if c in sel]
            label = variant + (" + per-layer" if pl else "")
            mem = [c for c in xs if sel[c]["peak_memory_bytes"]]  # none on a CPU run
            axes[0].plot(mem, [sel[c]["peak_memory_bytes"] / 1e9 for c in mem], marker="o", label=label)
            axes[1].plot(xs, [sel[c]["tokens_per_s"] for c in xs], marker="o", label=label)
    axes[0].set(ylabel="peak GPU memory (GB)", title="memory")
    if any(len(line.get_xdata()) for line in axes[0].lines):
        axes[0].set_yscale("log")
    axes[1].set(ylabel="tokens / s", yscale="log", title="speed")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
