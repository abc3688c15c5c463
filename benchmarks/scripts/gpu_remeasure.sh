#!/usr/bin/env bash
# The GPU measurements still open after 2026-11-29 (NOTES-serve.md, NOTES-galore.md), in two
# calls of under ten minutes each on one H200, each writing under $OUT (at most 8 files come back):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl .whl-bnb/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
#   bash benchmarks/scripts/gpu_remeasure.sh serve    # carry .whl
#   bash benchmarks/scripts/gpu_remeasure.sh train    # carry .whl and .whl-bnb
#
# Then here: loraflow bench train --merge <the train JSON files> --out benchmarks/results, and
# the serve JSON files into benchmarks/results.
set -uo pipefail
OUT=${OUT:?set OUT}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1

train() {   # the 7B memory target, then the 1B speed target at equal memory
    mkdir -p "$OUT/t7" "$OUT/t1"
    timeout 200 python3 -m loraflow.cli bench train --configs 7b --variants galore8bit,galore,adamw \
        --randomized-svd --out "$OUT/t7" 2>&1 | grep -v -i warn | tail -12
    timeout 330 python3 -m loraflow.cli bench train --configs 1b --variants adamw,galore,galore-torch,galore8bit \
        --batch 16 --accumulation 4 --state-dtype bfloat16 --randomized-svd --out "$OUT/t1" 2>&1 | grep -v -i warn | tail -12
    rm -f "$OUT"/t7/*.md "$OUT"/t7/*.png "$OUT"/t1/*.md "$OUT"/t1/*.png
}

serve() {   # tests, the engine alone, the server at 128 + 128 and at 1,024 + 128 tokens
    mkdir -p "$OUT/s/long"
    timeout 45 python3 -m pytest -q -p no:cacheprovider tests/optim/test_adam8bit_triton.py \
        tests/serve/test_paged_attention.py tests/serve/test_engine.py -k "not default_model" 2>&1 | tail -3
    timeout 160 python3 benchmarks/scripts/engine_steps.py "$OUT/s/engine-steps-h200.json" --profile 2>&1 \
        | grep -v -i warn | tail -5
    timeout 280 python3 -m loraflow.cli bench serve --shape llama2-7b --requests 64 --output-len 128 --prompt-len 128 \
        --adapters 64 --registered 1000 --peft-requests 64 --peft-output-len 32 --peft-batch 64 --out "$OUT/s" \
        2>&1 | grep -v -i warn | tail -8
    [ "${LONG:-1}" = 1 ] || return 0
    timeout 130 python3 -m loraflow.cli bench serve --shape llama2-7b --requests 64 --output-len 128 --prompt-len 1024 \
        --adapters 64 --registered 1000 --no-peft --out "$OUT/s/long" 2>&1 | grep -v -i warn | tail -6
    rm -f "$OUT"/s/*.md "$OUT"/s/*.png "$OUT"/s/long/*.md "$OUT"/s/long/*.png
}

case "${1:?serve or train}" in
    serve) serve ;;
    train) train ;;
    *) echo "usage: gpu_remeasure.sh serve|train" >&2; exit 2 ;;
esac
