"""Many distinct adapters on the CPU: N requests, each naming its own adapter (copies of one
tiny LoRA in an --adapter-dir), through 4 device slots and 8 adapters in host memory. Prints
the wall time and the registry's counters (how many adapter files were read).

    python benchmarks/scripts/many_adapters_cpu.py [N]
"""

import json
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "serve"))
from helpers import peft_adapter, prompt, tiny_llama_folder  # noqa: E402

import loraflow as lf  # noqa: E402
from loraflow.serve.sampling import SamplingParams  # noqa: E402

n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
root = Path(tempfile.mkdtemp(prefix="many-adapters-"))
tiny_llama_folder(root / "base")
peft_adapter(root / "base", root / "src", 4, ["q_proj", "v_proj"], seed=1)
for i in range(n):
    shutil.copytree(root / "src", root / "adapters" / f"a{i:05d}")
eng = lf.Engine(model=root / "base", adapter_dir=root / "adapters", device="cpu", max_gpu_adapters=4,
                max_cpu_adapters=8, max_batch_tokens=256)  # fmt: skip
params = SamplingParams(max_tokens=4, temperature=0.0)
start = time.perf_counter()
reqs = [eng.add_request(prompt(i, 6), params, f"a{i:05d}") for i in range(n)]
while not all(r.finished for r in reqs):
    if not eng.step():
        time.sleep(0.001)
seconds = time.perf_counter() - start
print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or 'cpu'}; {n} requests, {n} adapters")
print(json.dumps({"seconds": round(seconds, 2), **eng.registry.snapshot()}))
shutil.rmtree(root)
