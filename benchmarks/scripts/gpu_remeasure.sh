#!/usr/bin/env bash
# The GPU measurements for the open items of NOTES-serve.md and NOTES-galore.md, as parts that
# one call (under ten minutes on one H200, at most 8 files back from $OUT) runs in sequence:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl .whl-bnb/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
#   bash benchmarks/scripts/gpu_remeasure.sh tests steps serve long   # ~8 minutes; carry .whl
#   bash benchmarks/scripts/gpu_remeasure.sh train                    # ~9 minutes; carry .whl and .whl-bnb
#   bash benchmarks/scripts/gpu_remeasure.sh train1b peft             # ~8 minutes
#
#   tests     the GPU tests of the kernels and the engine (~1 minute)
#   steps     the engine alone: decode steps (both decode kernels), launch vs replay, a mixed step, kernel tables (~2-3 minutes)
#   stepslong the same decode steps at 1,024 tokens of context, CUDA graphs only (~2 minutes)
#   workload  the engine alone on the 1,024-token workload, time split by kind of step (~3 minutes)
#   launch    what a CUDA graph's launch costs by what it holds: PyTorch ops, LoRA kernels (~1 minute)
#   enginelaunch  the engine's decode-graph launch, by variant: pool, adapted layers (~1.5 minutes)
#   sweep     launch configurations of the decode LoRA kernels at Llama-2-7B's shapes (~2 minutes)
#   serve     the server at 128 + 128 tokens, adapters vs base (~1.5 minutes)
#   long      the server at 1,024 + 128 tokens (~2.5 minutes)
#   peft      the 128 + 128 workload with the transformers + PEFT baseline (~5 minutes, most of it PEFT)
#   train     the grid 60M-350M, every variant, and the 8-bit baselines at 1B (~9 minutes)
#   train1b   1B: AdamW, GaLore, galore-torch, 8-bit GaLore (~5 minutes)
#   svd1b     1B: GaLore and 8-bit GaLore with the Gram-matrix basis (exact), and GaLore with the full SVD (~5 minutes)
#   gram1b    1B: AdamW, GaLore (Gram-matrix basis) and galore-torch in one run (~4 minutes)
#
# Then here: loraflow bench train --merge <the train JSON files> --out benchmarks/results, and
# the serve JSON files into benchmarks/results.
set -uo pipefail
OUT=${OUT:?set OUT}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} PYTHONUNBUFFERED=1
SERVE=(python3 -m loraflow.cli bench serve --shape llama2-7b --requests 64 --output-len 128 --adapters 64 --registered 1000)
quiet() { grep -v -i warn | tail -"$1"; }

tests() {
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/optim/test_adam8bit_triton.py tests/multi/test_triton_lora.py tests/multi/test_triton_siblings.py \
        tests/serve/test_paged_attention.py tests/serve/test_engine.py \
        -k "not default_model" 2>&1 | tail -3
}
run_script() {   # run_script SECONDS LINES NAME.py OUT.json [ARGS...]: a script of this folder, its JSON under $OUT/e
    local seconds=$1 lines=$2 name=$3 out=$4
    shift 4
    mkdir -p "$OUT/e"
    timeout "$seconds" python3 "benchmarks/scripts/$name" "$OUT/e/$out" "$@" 2>&1 | quiet "$lines"
}
steps() { run_script 240 8 engine_steps.py engine-steps-h200.json --profile; }
stepslong() {
    run_script 240 6 engine_steps.py engine-steps-long-h200.json --prompt-len 1024 --kv-cache-gb 48 --graphs-only --profile
}
workload() { run_script 200 3 engine_workload.py engine-workload-h200.json; }
launch() { run_script 120 20 graph_launch.py graph-launch-h200.json; }
enginelaunch() { run_script 150 12 engine_launch.py engine-launch-h200.json; }
sweep() { run_script 240 12 lora_sweep.py lora-sweep-h200.json; }
serve() {    # each run in its own folder: a call may repeat the part to see the run-to-run spread
    local d="$OUT/s-$(date -u +%H%M%S)"
    mkdir -p "$d"
    timeout 150 "${SERVE[@]}" --prompt-len 128 --no-peft --out "$d" 2>&1 | quiet 6
    rm -f "$d"/*.md "$d"/*.png
}
long() {
    mkdir -p "$OUT/l"
    timeout 180 "${SERVE[@]}" --prompt-len 1024 --no-peft --out "$OUT/l" 2>&1 | quiet 6
    rm -f "$OUT"/l/*.md "$OUT"/l/*.png
}
peft() {
    mkdir -p "$OUT/p"
    timeout 360 "${SERVE[@]}" --prompt-len 128 --peft-requests 64 --peft-output-len 32 --peft-batch 64 \
        --out "$OUT/p" 2>&1 | quiet 8
    rm -f "$OUT"/p/*.md "$OUT"/p/*.png
}
train() {
    mkdir -p "$OUT/ts" "$OUT/t8"
    timeout 300 python3 -m loraflow.cli bench train --configs 350m,130m,60m \
        --variants adamw,adamw8bit,galore,galore8bit,galore-torch,galore-torch8bit \
        --batch 16 --state-dtype bfloat16 --randomized-svd --out "$OUT/ts" 2>&1 | quiet 8
    timeout 240 python3 -m loraflow.cli bench train --configs 1b --variants adamw8bit,galore-torch8bit \
        --batch 16 --accumulation 4 --randomized-svd --out "$OUT/t8" 2>&1 | quiet 8
    rm -f "$OUT"/ts/*.md "$OUT"/ts/*.png "$OUT"/t8/*.md "$OUT"/t8/*.png
}
train1b() {
    mkdir -p "$OUT/t1"
    timeout 330 python3 -m loraflow.cli bench train --configs 1b --variants adamw,galore,galore-torch,galore8bit \
        --batch 16 --accumulation 4 --state-dtype bfloat16 --randomized-svd --out "$OUT/t1" 2>&1 | quiet 8
    rm -f "$OUT"/t1/*.md "$OUT"/t1/*.png
}
svd1b() {
    mkdir -p "$OUT/tg" "$OUT/tf"
    timeout 200 python3 -m loraflow.cli bench train --configs 1b --variants galore,galore8bit --svd gram \
        --batch 16 --accumulation 4 --state-dtype bfloat16 --out "$OUT/tg" 2>&1 | quiet 8
    timeout 150 python3 -m loraflow.cli bench train --configs 1b --variants galore --svd full \
        --batch 16 --accumulation 4 --state-dtype bfloat16 --out "$OUT/tf" 2>&1 | quiet 8
    rm -f "$OUT"/tg/*.md "$OUT"/tg/*.png "$OUT"/tf/*.md "$OUT"/tf/*.png
}
gram1b() {
    mkdir -p "$OUT/t1g"
    timeout 330 python3 -m loraflow.cli bench train --configs 1b --variants adamw,galore,galore-torch --svd gram \
        --batch 16 --accumulation 4 --state-dtype bfloat16 --out "$OUT/t1g" 2>&1 | quiet 8
    rm -f "$OUT"/t1g/*.md "$OUT"/t1g/*.png
}

[ $# -gt 0 ] || { echo "usage: gpu_remeasure.sh PART... (tests steps workload launch serve long peft train train1b svd1b gram1b)" >&2; exit 2; }
for part in "$@"; do
    case "$part" in
        tests|steps|stepslong|workload|launch|enginelaunch|sweep|serve|long|peft|train|train1b|svd1b|gram1b) echo "== $part $(date -u +%H:%M:%S)"; "$part" ;;
        *) echo "unknown part $part (tests steps stepslong workload launch enginelaunch sweep serve long peft train train1b svd1b gram1b)" >&2; exit 2 ;;
    esac
done
echo "== done $(date -u +%H:%M:%S)"
