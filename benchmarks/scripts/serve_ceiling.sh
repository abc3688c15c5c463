#!/usr/bin/env bash
# The server with next to no model (tiny) under 64 streams, profiled by py-spy for 5 s (all
# threads); on the GPU machine after `source .device/setup.sh`, carrying a py-spy binary as
# .venv/bin/py-spy (pip install py-spy here). Writes $OUT/load.out, $OUT/prof.raw, $OUT/srv.log.
set -u
OUT=${OUT:?set OUT}
python3 -m loraflow.cli serve --random-weights tiny --port 8311 > "$OUT/srv.log" 2>&1 &
PID=$!
for _ in $(seq 120); do curl -s localhost:8311/health > /dev/null && break; sleep 1; done
python3 benchmarks/scripts/serve_ceiling.py http://127.0.0.1:8311 128 2 tiny  # warm-up: compiles, captures
python3 benchmarks/scripts/serve_ceiling.py http://127.0.0.1:8311 512 3 tiny > "$OUT/load.out" 2>&1 &
sleep 1
.venv/bin/py-spy record -p "$PID" -d 5 -r 500 --format raw -o "$OUT/prof.raw" --threads --nonblocking
sleep 4
cat "$OUT/load.out"
kill "$PID"
