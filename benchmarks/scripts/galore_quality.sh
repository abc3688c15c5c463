#!/usr/bin/env bash
# GaLore quality run (issue #5): LLaMA 60M trained from scratch three ways on the same tokens,
# AdamW, GaLore (rank 128, T = 200, scale 0.25, lr 0.01: the paper's 60M settings) and the
# paper's low-rank baseline (W = BA, rank 128), concurrently on one GPU; held-out perplexity
# every EVAL_EVERY steps. From the repository root:
#
#     OUT=results/ bash benchmarks/scripts/galore_quality.sh
#     python benchmarks/scripts/report_galore_quality.py results/ benchmarks/results/galore-quality
#
# 1. corpus: every *.py file of this Python's site-packages, identical files once, named by
#    their content's SHA-1, so the file order (and with it the held-out last 5%) is a fixed
#    pseudo-random sample of all packages; at most CORPUS_MB MB (DATA=folder: your own).
# 2. a 32000-token BPE tokenizer (trained on the first 100 MB of training files) and the
#    token ids, once, into WORK (kept between calls on the same machine).
# 3. the three runs, each --time-limit'ed to end (with an evaluation and a checkpoint) before
#    BUDGET_S seconds from the start of this script; run the script again to --resume them.
# OUT gets adamw.jsonl, galore.jsonl, lowrank.jsonl (each run's log, copied every minute) and
# env.json (device, date, commands, corpus, tokens), and the report when matplotlib is there.
set -euo pipefail

OUT=${OUT:?set OUT to the folder for the logs and env.json}
PY=${PYTHON:-python3}
TOKENS=${TOKENS:-100000000}        # training tokens of each run
BATCH=${BATCH:-128}                # sequences per step
SEQ=${SEQ:-256}
EVAL_EVERY=${EVAL_EVERY:-100}
EVAL_SEQS=${EVAL_SEQS:-512}        # held-out sequences per evaluation, spread over the held-out files
CORPUS_MB=${CORPUS_MB:-450}      # about 115M tokens of Python at 3.8 bytes a token
VOCAB=${VOCAB:-32000}
CONFIG=${CONFIG:-60m}
RANK=${RANK:-128}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-540}          # this call's wall time, all included
WORK=${WORK:-/tmp/galore-quality}
# REPORT=0: leave the report to report_galore_quality.py (fewer files in OUT)
EXTRA=${EXTRA:-}                   # more pretrain arguments for every run, e.g. "--compile"
read -r -a GPUS <<< "${GPUS:-}"    # e.g. "0 0 0": the CUDA device of adamw, galore, lowrank (default: all visible)
START=$(date +%s)
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export TQDM_MININTERVAL=60 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p "$OUT" "$WORK"

STEPS=$(( (TOKENS + BATCH * SEQ - 1) / (BATCH * SEQ) ))     # at least TOKENS
WARMUP=$(( STEPS / 10 > 0 ? STEPS / 10 : 1 ))
if (( STEPS < 1 )); then echo "TOKENS=$TOKENS is less than one step of $BATCH x $SEQ tokens" >&2; exit 2; fi

if [[ -z "${DATA:-}" ]]; then
    DATA=$WORK/corpus
    if [[ ! -f $WORK/corpus.json ]]; then
        rm -rf "$DATA"
        "$PY" - "$DATA" "$CORPUS_MB" > "$WORK/corpus.json.tmp" <<'EOF'
import hashlib, json, site, sys
from pathlib import Path

out, cap = Path(sys.argv[1]), float(sys.argv[2]) * 1e6
roots = [r for r in dict.fromkeys(site.getsitepackages()) if Path(r).is_dir()]
texts = {}
for root in roots:
    for path in Path(root).rglob("*.py"):
        if path.is_file():
            data = path.read_bytes()
            texts.setdefault(hashlib.sha1(data).hexdigest(), data)
total = files = 0
for digest in sorted(texts):
    if total + len(texts[digest]) > cap:
        break
    (out / digest[:2]).mkdir(parents=True, exist_ok=True)
    (out / digest[:2] / f"{digest}.py").write_bytes(texts[digest])
    total, files = total + len(texts[digest]), files + 1
print(json.dumps({"source": roots, "distinct_files": len(texts), "distinct_mb": sum(map(len, texts.values())) / 1e6,
                  "files": files, "mb": total / 1e6}))
EOF
        mv "$WORK/corpus.json.tmp" "$WORK/corpus.json"        # the corpus is complete
    fi
    echo "corpus: $(cat "$WORK/corpus.json")"
fi

IDS=$WORK/ids.safetensors
TOK=$WORK/prepare/tokenizer
if [[ ! -f $IDS || ! -f $TOK/tokenizer.json ]]; then
    rm -f "$IDS"
    "$PY" -m loraflow.cli pretrain --data "$DATA" --train-tokenizer "$VOCAB" --tokens-cache "$IDS" --prepare-only \
        --out "$WORK/prepare" > "$WORK/prepare.out"
    tail -n 1 "$WORK/prepare.out" > "$WORK/prepare.json"        # the command's result: token counts
fi
echo "token ids: $(cat "$WORK/prepare.json") ($(( $(date +%s) - START )) s so far)"

COMMON=(--data "$DATA" --tokenizer "$TOK" --tokens-cache "$IDS" --config "$CONFIG" --seq "$SEQ" --dtype bf16-mixed
        --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --eval-every "$EVAL_EVERY" --eval-seqs "$EVAL_SEQS"
        --save-every 1000 --device "$DEVICE")
declare -A RUN=(
    [adamw]="--optimizer adamw --lr 1e-3"
    [galore]="--optimizer galore --rank $RANK --update-proj-gap 200 --scale 0.25 --lr 1e-2"
    [lowrank]="--optimizer adamw --low-rank $RANK --lr 1e-3"
)
NAMES=(adamw galore lowrank)

write_env() {
    "$PY" - "$WORK" "$OUT/env.json" "$*" "$STEPS" "$TOKENS" "$BATCH" "$SEQ" "$WARMUP" "$EVAL_EVERY" "$EVAL_SEQS" \
        "$(( $(date +%s) - START ))" "${COMMON[*]} $EXTRA" "${RUN[adamw]}" "${RUN[galore]}" "${RUN[lowrank]}" "$CONFIG" <<'EOF'
import json, sys
from datetime import datetime, timezone
from pathlib import Path

import torch

work, out, status = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
steps, tokens, batch, seq, warmup, eval_every, eval_seqs, wall = map(int, sys.argv[4:12])
common, runs, config = sys.argv[12], dict(zip(["adamw", "galore", "lowrank"], sys.argv[13:16])), sys.argv[16]
previous = json.loads(out.read_text()) if out.is_file() else {}
prepared = json.loads((work / "prepare.json").read_text())
corpus = json.loads((work / "corpus.json").read_text()) if (work / "corpus.json").is_file() else None
env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
       "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
       "command": "bash benchmarks/scripts/galore_quality.sh (three runs at once on one GPU)",
       "run_commands": {n: f"loraflow pretrain {common} {a}" for n, a in runs.items()},
       "config": config, "steps": steps, "tokens_budget": tokens, "tokens_per_step": batch * seq, "batch": batch, "seq": seq,
       "warmup": warmup, "eval_every": eval_every, "eval_seqs": eval_seqs, "corpus": corpus, **prepared,
       "epochs": steps * batch * seq / prepared["train_tokens"], "status": status,
       "calls": previous.get("calls", []) + ([{"wall_s": wall, "status": status}] if status != "running" else [])}
out.write_text(json.dumps(env, indent=1) + "\n")
EOF
}

copy_logs() {
    for name in "${NAMES[@]}"; do
        [[ -f $WORK/$name/log.jsonl ]] && cp "$WORK/$name/log.jsonl" "$OUT/$name.jsonl"
    done
    return 0
}

done_run() { [[ -f $WORK/$1/log.jsonl ]] && tail -n 1 "$WORK/$1/log.jsonl" | grep -q "\"step\": $STEPS,"; }

LIMIT=$(( BUDGET_S - ($(date +%s) - START) - 45 ))     # the runs' last evaluation and checkpoint, the copies
if (( LIMIT < 30 )); then echo "BUDGET_S=$BUDGET_S leaves no time to train: run again to train" >&2; exit 3; fi
PIDS=()
idx=0
for name in "${NAMES[@]}"; do
    gpu=${GPUS[$idx]:-}
    idx=$(( idx + 1 ))
    if done_run "$name"; then echo "$name: done"; continue; fi
    resume=()
    [[ -f $WORK/$name/checkpoint/state.pt ]] && resume=(--resume)
    # shellcheck disable=SC2086  # RUN and EXTRA are lists of arguments
    env ${gpu:+CUDA_VISIBLE_DEVICES=$gpu} "$PY" -m loraflow.cli pretrain "${COMMON[@]}" ${RUN[$name]} $EXTRA --out "$WORK/$name" --time-limit "$LIMIT" \
        "${resume[@]}" > "$WORK/$name.out" 2>&1 &
    PIDS+=($!)
    echo "$name: pid $!, ${resume[*]:-from scratch}, $STEPS steps of $BATCH x $SEQ tokens, time limit $LIMIT s"
done
write_env running

last=$(date +%s)
while [[ -n $(jobs -rp) ]]; do                          # a run is still going
    sleep 5
    if (( $(date +%s) - last >= 60 )); then               # copies (in case this call is cut short) and progress
        last=$(date +%s)
        copy_logs
        for name in "${NAMES[@]}"; do
            [[ -f $WORK/$name/log.jsonl ]] || continue
            echo "$(( last - START )) s $name: $(grep eval_loss "$WORK/$name/log.jsonl" | tail -n 1 | cut -c 1-120)"
        done
    fi
done
failed=0
for pid in "${PIDS[@]}"; do wait "$pid" || failed=1; done
copy_logs
status=complete
for name in "${NAMES[@]}"; do
    done_run "$name" || status="partial: run the script again to resume"
    echo "$name: $(tail -n 1 "$WORK/$name.out" 2> /dev/null | cut -c 1-300)"
done
(( failed )) && status="a run failed (see $WORK/<name>.out)"
write_env "$status"
echo "status: $status ($(( $(date +%s) - START )) s)"
if [[ $status == complete && ${REPORT:-1} == 1 ]] && "$PY" -c "import matplotlib" 2> /dev/null; then
    "$PY" benchmarks/scripts/report_galore_quality.py "$OUT" "$OUT/galore-quality" || true
fi
(( failed == 0 ))
