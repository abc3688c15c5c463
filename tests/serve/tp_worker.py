"""One rank of the 2-process tensor-parallel engine test (``torch.distributed.run``, gloo):
rank 0 queues the requests (some mid-decode, one aborted) and registers an adapter at run
time, every rank steps; each writes
what its engine finished, to be compared across ranks and with one process."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

import loraflow as lf
from loraflow.serve.sampling import SamplingParams
from loraflow.serve.tensor_parallel import Stopped, TensorParallel, stop_workers


def main(spec_file: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    dist.init_process_group("gloo")
    tp = TensorParallel.of(dist.group.WORLD)
    eng = lf.Engine(model=spec["model"], adapters=spec["adapters"], device="cpu", tensor_parallel=tp, **spec["engine"])
    finished, steps = {}, 0
    try:
        while True:
            if tp.rank == 0:
                if steps == spec["runtime_at"]:  # as POST /v1/load_lora_adapter and unload would
                    eng.registry.register(*spec["register"])
                    eng.registry.unregister(spec["unregister"])
                for i, (text, sampling, adapter, arrive) in enumerate(spec["requests"]):
                    if arrive == steps:
                        eng.add_request(text, SamplingParams(**sampling), adapter, request_id=f"r{i}")
                if steps == spec["abort_at"]:
                    eng.abort(spec["abort"])
                if len(finished) == len(spec["requests"]):
                    stop_workers(tp)
                    break
            for r in eng.step():
                if r.finished:
                    finished[r.id] = (r.output_ids, r.finish_reason)
            steps += 1
    except Stopped:  # the workers
        pass
    k, _ = eng.kv.layers[0]
    shapes = {"kv_heads": k.shape[1], "lm_head": list(eng.model.lm_head.weight.shape), "steps": steps,
              "adapters": sorted(eng.registry.paths)}  # fmt: skip
    Path(out_dir, f"rank{tp.rank}.json").write_text(json.dumps({"finished": finished, "shapes": shapes}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
