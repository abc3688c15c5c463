"""The report of the 2026-11-28 H200 run whose transformers + PEFT baseline was cut off when
the session's device time ran out. The numbers are those of the run's own JSON
(serve-llama2-7b-cuda.run.json, written by that run before the baseline started); the
environment fields are those of the run. That version of the benchmark ran the server in
the load generator's process. Run from the repository root:
    python benchmarks/scripts/report_serve_h200_partial.py
"""

import json

from loraflow.bench import report, serve_report

p = json.load(open("benchmarks/results/serve-llama2-7b-cuda.run.json"))
env = {
    "device": "NVIDIA H200",
    "torch": "2.11.0+cu130",
    "date": "2026-11-28 22:59 UTC",
    "command": "loraflow bench serve --shape llama2-7b --requests 64 --output-len 128 --prompt-len 128 "
    "--adapters 64 --registered 1000 --peft-requests 64 --peft-output-len 32 --peft-batch 64",
}
payload = {
    "environment": env,
    **p,
    "in_process": True,
    "peft_note": "the session's device time ran out during the baseline; the run above is complete",
}
report.write(
    "benchmarks/results",
    "serve-llama2-7b-cuda",
    payload,
    serve_report.markdown(env, payload),
    serve_report.figure(payload),
)
