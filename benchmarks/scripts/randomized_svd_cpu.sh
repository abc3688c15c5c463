#!/usr/bin/env bash
# GaLore's basis by a full SVD against torch.svd_lowrank (--randomized-svd), on the CPU:
# LLaMA 60M (the paper's GaLore settings: rank 128, scale 0.25, lr 0.01; T = 50 so that
# 400 steps see 8 refreshes) on tinyshakespeare with a 4,000-token BPE, 400 steps of
# 8 x 128 tokens, two seeds, AdamW (lr 1e-3, seed 0) for scale, and the Gram-matrix basis
# (--svd gram, both seeds), the full SVD's subspace up to rounding. About 70 minutes on
# 2 cores. From the repository root:
#
#     WORK=/tmp/rsvd bash benchmarks/scripts/randomized_svd_cpu.sh
#     python benchmarks/scripts/report_randomized_svd.py /tmp/rsvd benchmarks/results/galore-randomized-svd-cpu
set -euo pipefail
WORK=${WORK:?set WORK to a folder for the runs}
PY=${PYTHON:-python3}
mkdir -p "$WORK"
COMMON=(--data examples/data/tinyshakespeare/input.txt --train-tokenizer 4000 --config 60m --steps 400
        --warmup 40 --batch 8 --seq 128 --eval-every 100 --eval-seqs 64 --device cpu)
GALORE=(--optimizer galore --rank 128 --update-proj-gap 50 --lr 1e-2 --scale 0.25)
for seed in 0 1; do
    s=$([ "$seed" = 0 ] && echo "" || echo "-s$seed")
    "$PY" -m loraflow.cli pretrain "${COMMON[@]}" --seed "$seed" "${GALORE[@]}" --out "$WORK/full$s"
    "$PY" -m loraflow.cli pretrain "${COMMON[@]}" --seed "$seed" "${GALORE[@]}" --randomized-svd --out "$WORK/randomized$s"
done
"$PY" -m loraflow.cli pretrain "${COMMON[@]}" --seed 0 --optimizer adamw --lr 1e-3 --out "$WORK/adamw"
for seed in 0 1; do
    s=$([ "$seed" = 0 ] && echo "" || echo "-s$seed")
    "$PY" -m loraflow.cli pretrain "${COMMON[@]}" --seed "$seed" "${GALORE[@]}" --svd gram --out "$WORK/gram$s"
done
