#!/usr/bin/env bash
# The GPU measurements for the open items of NOTES-serve.md and NOTES-galore.md, in calls of
# under ten minutes each on one H200, each writing under $OUT (at most 8 files come back):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl .whl-bnb/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
#   bash benchmarks/scripts/gpu_remeasure.sh engine   # ~7 minutes
#   bash benchmarks/scripts/gpu_remeasure.sh serve    # ~9 minutes; carry .whl (FastAPI, uvicorn)
#   bash benchmarks/scripts/gpu_remeasure.sh train    # ~9 minutes; carry .whl and .whl-bnb
#
# Then here: loraflow bench train --merge <the train JSON files> --out benchmarks/results, and
# the serve JSON files into benchmarks/results.
set -uo pipefail
OUT=${OUT:?set OUT}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1

train() {   # the rest of the grid with the fixed peak measurement: 60M-350M, and the 8-bit baselines at 1B
    mkdir -p "$OUT/ts" "$OUT/t8"
    timeout 300 python3 -m loraflow.cli bench train --configs 350m,130m,60m \
        --variants adamw,adamw8bit,galore,galore8bit,galore-torch,galore-torch8bit \
        --batch 16 --state-dtype bfloat16 --randomized-svd --out "$OUT/ts" 2>&1 | grep -v -i warn | tail -8
    timeout 240 python3 -m loraflow.cli bench train --configs 1b --variants adamw8bit,galore-torch8bit \
        --batch 16 --accumulation 4 --randomized-svd --out "$OUT/t8" 2>&1 | grep -v -i warn | tail -8
    rm -f "$OUT"/ts/*.md "$OUT"/ts/*.png "$OUT"/t8/*.md "$OUT"/t8/*.png
}

engine() {  # tests, the engine alone: decode steps and a mixed step (kernel tables), the long workload
    mkdir -p "$OUT/e"
    timeout 45 python3 -m pytest -q -p no:cacheprovider tests/optim/test_adam8bit_triton.py \
        tests/serve/test_paged_attention.py tests/serve/test_engine.py -k "not default_model" 2>&1 | tail -3
    timeout 200 python3 benchmarks/scripts/engine_steps.py "$OUT/e/engine-steps-h200.json" --profile 2>&1 \
        | grep -v -i warn | tail -5
    timeout 200 python3 benchmarks/scripts/engine_workload.py "$OUT/e/engine-workload-h200.json" 2>&1 \
        | grep -v -i warn | tail -3
}

serve() {   # the server at 128 + 128 tokens with the PEFT baseline (it alone takes ~3 minutes), then 1,024 + 128
    mkdir -p "$OUT/s/long"
    timeout 360 python3 -m loraflow.cli bench serve --shape llama2-7b --requests 64 --output-len 128 --prompt-len 128 \
        --adapters 64 --registered 1000 --peft-requests 64 --peft-output-len 32 --peft-batch 64 --out "$OUT/s" \
        2>&1 | grep -v -i warn | tail -8
    timeout 150 python3 -m loraflow.cli bench serve --shape llama2-7b --requests 64 --output-len 128 --prompt-len 1024 \
        --adapters 64 --registered 1000 --no-peft --out "$OUT/s/long" 2>&1 | grep -v -i warn | tail -6
    rm -f "$OUT"/s/*.png "$OUT"/s/long/*.md "$OUT"/s/long/*.png
}

case "${1:?engine, serve or train}" in
    engine) engine ;;
    serve) serve ;;
    train) train ;;
    *) echo "usage: gpu_remeasure.sh engine|serve|train" >&2; exit 2 ;;
esac
