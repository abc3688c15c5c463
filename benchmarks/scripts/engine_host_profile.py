"""The engine's host work per decode step, the model stubbed out (CPU): 64 requests of a
128-token prompt decoding 64 tokens through the decode-graph path (run eagerly on the CPU),
every step's output handed to a streaming callback as the server does. Prints milliseconds
per step of the whole step, unprofiled and under cProfile, the share of the vocabulary-wide
argmax and finiteness sum (kernels on a GPU, host work here), and the parts (cumulative).

    python benchmarks/scripts/engine_host_profile.py [TEMPERATURE] [overlap]    # default 0: greedy

With ``overlap`` the decode steps chain as on CUDA (``Engine(overlap=True)``): the host's work of
a step is then what runs beside the GPU's next step.
"""

import cProfile
import platform
import pstats
import sys
import time
from datetime import UTC, datetime

import torch

import loraflow as lf
from loraflow.serve.llama import SHAPES, LlamaArgs, numbered_tokenizer, random_llama
from loraflow.serve.sampling import SamplingParams

args = LlamaArgs(**SHAPES["tiny"])  # next to no model: the host's work
eng = lf.Engine(
    model=random_llama(args, dtype=torch.float32),
    tokenizer=numbered_tokenizer(32000),
    device="cpu",
    max_batch_tokens=4096,
    decode_graphs=True,
    overlap="overlap" in sys.argv[2:],
)
logits = torch.zeros(512, int(__import__("os").environ.get("VOCAB", 32000)))
eng.graphs.model = lambda batch, caches: logits[: len(batch.tokens)]  # no model: host work only
temperature = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
params = SamplingParams(max_tokens=64, temperature=temperature, seed=1 if temperature else None, ignore_eos=True)


def run(profile: cProfile.Profile | None) -> tuple[int, float]:
    """64 requests to the end: (decode steps, seconds) with ``profile`` on during the decode."""
    for i in range(64):
        eng.add_request([3 + i + j for j in range(128)], params, None, on_output=eng.stream_text)
    eng.step()  # the prefill (eager)
    steps, start = 0, time.perf_counter()
    if profile:
        profile.enable()
    while eng.has_work():
        eng.step()
        steps += 1
    if profile:
        profile.disable()
    return steps, time.perf_counter() - start


run(None)  # warm-up
steps, seconds = run(None)
plain = seconds / steps * 1e3
profile = cProfile.Profile()
steps, seconds = run(profile)
total = seconds / steps * 1e3
print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or 'cpu'}, torch {torch.__version__}; "
      f"temperature {temperature:g}")  # fmt: skip
stats = pstats.Stats(profile).stats
# what a GPU runs as kernels, here on the CPU: the greedy argmax over the vocabulary, the finiteness sum
device = sum(
    tt
    for (path, _, name), (_, _, tt, _, _) in stats.items()
    if name in ("<method 'argmax' of 'torch._C.TensorBase' objects>", "<method 'sum' of 'torch._C.TensorBase' objects>")
)
print(f"{steps} decode steps of 64 requests: {plain:.2f} ms a step unprofiled, {total:.2f} ms profiled, of which "
      f"{device / steps * 1e3:.2f} ms is the vocabulary-wide argmax and sum (kernels on a GPU)")  # fmt: skip
for (path, _, name), (_, _, _, cum, _) in sorted(stats.items(), key=lambda kv: -kv[1][3]):
    if name in ("schedule", "_check_stop", "_flush_text", "run", "stream_text", "notify", "argmax", "decode") and (
        "loraflow" in path or name in ("argmax", "decode", "__eq__")
    ):
        print(f"  {name:<12} {cum / steps * 1e3:7.2f} ms a step   ({path.rsplit('/', 2)[-1]})")
