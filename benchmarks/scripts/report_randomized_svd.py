"""Report of ``randomized_svd_cpu.sh``: held-out loss and perplexity of each run over steps,
full against randomized SVD per seed (JSON, Markdown, PNG).

    python benchmarks/scripts/report_randomized_svd.py WORK OUT_STEM
"""

import json
import math
import sys
from pathlib import Path

from loraflow.bench import report

RUNS = [
    ("full", "GaLore, full SVD", 0),
    ("randomized", "GaLore, randomized SVD", 0),
    ("full-s1", "GaLore, full SVD", 1),
    ("randomized-s1", "GaLore, randomized SVD", 1),
    ("gram", "GaLore, Gram-matrix basis", 0),
    ("gram-s1", "GaLore, Gram-matrix basis", 1),
    ("adamw", "AdamW", 0),
]


def main():
    work, stem = Path(sys.argv[1]), Path(sys.argv[2])
    runs = []
    for folder, label, seed in RUNS:
        log = work / folder / "log.jsonl"
        if log.is_file():
            evals = [r for r in map(json.loads, log.read_text().splitlines()) if "eval_loss" in r]
            runs.append(
                {
                    "run": folder,
                    "label": label,
                    "seed": seed,
                    "evals": [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in evals],
                }
            )
    final = {r["run"]: r["evals"][-1]["eval_loss"] for r in runs}
    pairs = [
        {
            "seed": s,
            "full_ppl": math.exp(final[f]),
            "randomized_ppl": math.exp(final[z]),
            "randomized_over_full": math.exp(final[z] - final[f]),
            **({"gram_ppl": math.exp(final[q]), "gram_over_full": math.exp(final[q] - final[f])} if q in final else {}),
        }
        for s, f, z, q in [(0, "full", "randomized", "gram"), (1, "full-s1", "randomized-s1", "gram-s1")]
        if f in final and z in final
    ]
    env = report.environment()
    env["command"] = "WORK=/tmp/rsvd bash benchmarks/scripts/randomized_svd_cpu.sh; " + env["command"]
    rows = [
        {
            "run": r["label"],
            "seed": r["seed"],
            "loss": r["evals"][-1]["eval_loss"],
            "ppl": math.exp(r["evals"][-1]["eval_loss"]),
        }
        for r in runs
    ]
    md = "\n".join(
        [
            "# GaLore: full against randomized SVD (CPU, small scale)",
            "",
            f"- device: {env['device']} (2 cores); torch {env['torch']}; date: {env['date']}",
            f"- command: `{env['command']}`",
            "- LLaMA 60M on tinyshakespeare (4,000-token BPE, last 5% of tokens held out), 400 steps of 8 x 128 "
            "tokens; GaLore rank 128, T = 50 (8 refreshes), scale 0.25, lr 0.01; randomized: torch.svd_lowrank, "
            "rank + 8 columns, 2 power iterations; Gram: the top eigenvectors of the smaller Gram matrix",
            "",
            report.table(
                rows,
                [
                    ("run", "run", ""),
                    ("seed", "seed", ""),
                    ("loss", "held-out loss", ".4f"),
                    ("ppl", "perplexity", ".1f"),
                ],
            ),
            "",
            *[
                f"- seed {p['seed']}: randomized / full perplexity **{p['randomized_over_full']:.3f}**"
                + (f"; Gram-matrix basis / full **{p['gram_over_full']:.3f}**" if "gram_over_full" in p else "")
                for p in pairs
            ],
            "- the Gram-matrix basis is the full SVD's subspace up to rounding, so its differences from the full SVD "
            "("
            + ", ".join(f"{100 * (p['gram_over_full'] - 1):+.1f}%" for p in pairs if "gram_over_full" in p)
            + ") are the size of what rounding-level differences do to a run; the randomized SVD's ("
            + ", ".join(f"{100 * (p['randomized_over_full'] - 1):+.1f}%" for p in pairs)
            + ") are larger in every seed",
            "- a small check of direction, not the paper's scale: 400 steps, 0.4M tokens, one corpus",
            "",
        ]
    )
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        ax.plot(
            [e["step"] for e in r["evals"]],
            [math.exp(e["eval_loss"]) for e in r["evals"]],
            marker="o",
            label=f"{r['label']}, seed {r['seed']}",
            linestyle="--" if "randomized" in r["run"] else ":" if r["run"].startswith("gram") else "-",
        )
    ax.set(xlabel="step", ylabel="held-out perplexity", yscale="log", title="LLaMA 60M, tinyshakespeare, CPU")
    ax.legend(fontsize=8)
    print(*report.write(stem.parent, stem.name, {"environment": env, "runs": runs, "pairs": pairs}, md, fig))


if __name__ == "__main__":
    main()
