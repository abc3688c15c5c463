"""How far one process's own training moves when only its micro-batching changes: the
baselines behind the looser tolerances of tests/optim/test_fsdp.py (the sharded runs sum
the processes' slices in another order, which no equality test can undo).

For each variant of tests/optim/fsdp_worker.VARIANTS: the largest relative difference,
over the weights, between one process training on the whole global batch and the same
process taking it in 2, 3 and 4 micro-batches; for APOLLO-Mini relative to the update
(w - w0), as its test compares.

    python benchmarks/scripts/fsdp_tolerances.py > benchmarks/results/fsdp-tolerances-cpu.txt
"""

import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[2] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "optim")]
from conftest import rel_err, tiny_llama  # noqa: E402
from fsdp_worker import VARIANTS, train  # noqa: E402


def main() -> None:
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M UTC}, {platform.processor() or 'cpu'}, torch {torch.__version__}")
    print(f"# python {' '.join(sys.argv)}")
    print("variant | micro-batches 2 | 3 | 4")
    for name, optimizer, per_layer, hidden, steps in VARIANTS:
        start = tiny_llama(hidden=hidden).state_dict()
        whole = train(tiny_llama(hidden=hidden), optimizer, per_layer, steps).state_dict()
        row = []
        for micro in (2, 3, 4):
            split = train(tiny_llama(hidden=hidden), optimizer, per_layer, steps, micro=micro).state_dict()
            if optimizer == "apollo-mini":
                row.append(max(rel_err(split[k] - start[k], whole[k] - start[k]) for k in whole))
            else:
                row.append(max(rel_err(split[k], whole[k]) for k in whole))
        print(f"{name} | " + " | ".join(f"{e:.2e}" for e in row))


if __name__ == "__main__":
    main()
