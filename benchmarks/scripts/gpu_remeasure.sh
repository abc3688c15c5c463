#!/usr/bin/env bash
# The GPU measurements still open after 2026-11-29 (NOTES-serve.md, NOTES-galore.md), in one
# call of about nine minutes on an nvidia-h200-x2 machine: training benchmarks on GPU 0,
# serving on GPU 1, each writing under $OUT (at most 8 files come back):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl .whl-bnb/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
#   bash benchmarks/scripts/gpu_remeasure.sh          # carry .whl and .whl-bnb
#
# Then here: loraflow bench train --merge <the train JSON files> --out benchmarks/results, and
# the serve JSON files into benchmarks/results.
set -uo pipefail
OUT=${OUT:?set OUT}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
mkdir -p "$OUT/t7" "$OUT/t1" "$OUT/s"

train() {   # GPU 0: the 7B memory target, then the 1B speed target at equal memory
    export CUDA_VISIBLE_DEVICES=0
    timeout 200 python3 -m loraflow.cli bench train --configs 7b --variants galore8bit,galore,adamw \
        --randomized-svd --out "$OUT/t7" 2>&1 | grep -v -i warn | tail -12
    timeout 300 python3 -m loraflow.cli bench train --configs 1b --variants adamw,galore,galore-torch,galore8bit \
        --batch 16 --accumulation 4 --state-dtype bfloat16 --randomized-svd --out "$OUT/t1" 2>&1 | grep -v -i warn | tail -12
    rm -f "$OUT"/t7/*.md "$OUT"/t7/*.png "$OUT"/t1/*.md "$OUT"/t1/*.png
}

serve() {   # GPU 1: tests, the engine alone, the server at 128 + 128 and at 1,024 + 128 tokens
    export CUDA_VISIBLE_DEVICES=1
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/optim/test_adam8bit_triton.py \
        tests/serve/test_paged_attention.py tests/serve/test_engine.py -k "not default_model" 2>&1 | tail -3
    timeout 120 python3 benchmarks/scripts/engine_steps.py "$OUT/s/engine-steps-h200.json" 2>&1 | grep -v -i warn | tail -4
    timeout 200 python3 -m loraflow.cli bench serve --shape llama2-7b --requests 64 --output-len 128 --prompt-len 128 \
        --adapters 64 --registered 1000 --peft-requests 64 --peft-output-len 32 --peft-batch 64 --out "$OUT/s" \
        2>&1 | grep -v -i warn | tail -8
    mkdir -p "$OUT/s/long"
    timeout 120 python3 -m loraflow.cli bench serve --shape llama2-7b --requests 64 --output-len 128 --prompt-len 1024 \
        --adapters 64 --registered 1000 --no-peft --out "$OUT/s/long" 2>&1 | grep -v -i warn | tail -6
    rm -f "$OUT"/s/*.md "$OUT"/s/*.png "$OUT"/s/long/*.md "$OUT"/s/long/*.png
}

train > "$OUT/train.log" 2>&1 &
serve 2>&1
wait
tail -30 "$OUT/train.log"
