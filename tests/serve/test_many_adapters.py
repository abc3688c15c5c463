"""More distinct adapters than the bank's slots and the host cache hold: every request is
served and every adapter is read from disk once (no loads evicting each other)."""

import shutil

from helpers import peft_adapter, prompt, tiny_llama_folder

import loraflow as lf
from loraflow.serve.sampling import SamplingParams


def test_sixty_requests_for_sixty_adapters_through_two_slots_load_each_once(tmp_path):
    tiny_llama_folder(tmp_path / "base")
    peft_adapter(tmp_path / "base", tmp_path / "src", 4, ["q_proj", "v_proj"], seed=1)
    for i in range(60):
        shutil.copytree(tmp_path / "src", tmp_path / "adapters" / f"a{i:02d}")
    eng = lf.Engine(model=tmp_path / "base", adapter_dir=tmp_path / "adapters", device="cpu",
                    max_gpu_adapters=2, max_cpu_adapters=4, max_batch_tokens=128)  # fmt: skip
    params = SamplingParams(max_tokens=3, temperature=0.0)
    reqs = [eng.add_request(prompt(i, 5), params, f"a{i:02d}") for i in range(60)]
    while not all(r.finished for r in reqs):
        eng.step()
    assert {r.finish_reason for r in reqs} == {"length"}
    assert len({tuple(r.output_ids) for r in reqs if r.prompt_ids == reqs[0].prompt_ids}) == 1
    stats = eng.registry.snapshot()
    assert stats["loads"] == 60 and stats["load_failures"] == 0, stats
    # each load timed (disk to host memory, in the bank's dtype) and each slot write (host to device)
    assert stats["slot_writes"] >= 60 and stats["load_seconds"] > 0 and stats["slot_write_seconds"] > 0, stats
    held = next(iter(eng.registry.host.values()))
    assert all(a.dtype == c.dtype == eng.bank.dtype for a, c in held.values())
