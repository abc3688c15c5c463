"""Overlapped decode steps (``Engine._chain``): a decode step queued before the previous one's
tokens are read, those tokens fed to it on the device. The outputs must equal the engine's
without overlap, token for token, whatever ends a request (length, a stop string, an abort)
and whoever arrives meanwhile. On the CPU the decode-graph path runs eagerly (Triton's
interpreter), so the same code as on CUDA runs, without the asynchrony."""

import pytest
import torch
from helpers import peft_adapter, prompt, tiny_llama_folder

import loraflow as lf
from loraflow.serve.sampling import SamplingParams

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; CUDA's is in test_engine.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap")
    tiny_llama_folder(root / "base")
    adapters = {
        "sql": peft_adapter(root / "base", root / "sql", 4, ["q_proj", "v_proj"], seed=1),
        "py": peft_adapter(root / "base", root / "py", 2, "all-linear", seed=3),
    }
    return root, {k: str(v) for k, v in adapters.items()}


def engine(setup, overlap):
    root, adapters = setup
    return lf.Engine(
        model=root / "base", adapters=adapters, device="cpu", max_batch_tokens=64, decode_graphs=True, overlap=overlap
    )


# (prompt seed, adapter, sampling): greedy and seeded sampling, ends by length at different steps
REQUESTS = [
    (1, "sql", dict(max_tokens=7, temperature=0)),
    (2, None, dict(max_tokens=4, temperature=0)),
    (3, "py", dict(max_tokens=7, temperature=0.8, top_p=0.9, seed=5)),
    (4, "sql", dict(max_tokens=5, temperature=0.7, seed=6)),
]


def run(eng, requests, steps_between=None):
    """Every request to its end; ``steps_between``: (step, request) pairs added later."""
    reqs = [eng.add_request(prompt(s, 6), SamplingParams(**p), a) for s, a, p in requests]
    late, step = dict(steps_between or []), 0
    while eng.has_work() or step in late:
        if step in late:
            s, a, p = late.pop(step)
            reqs.append(eng.add_request(prompt(s, 6), SamplingParams(**p), a))
        eng.step()
        step += 1
    return reqs


def step_until_in_flight(eng, reqs):
    """Step until every request decodes and a step is in flight (adapters load on a thread)."""
    for _ in range(50):
        eng.step()
        if eng.in_flight and all(r.output_ids for r in reqs):
            return
    raise AssertionError("no step went in flight")


def outputs(reqs):
    return [(r.output_ids, r.text, r.finish_reason) for r in reqs]


LATE = [(3, (5, "py", dict(max_tokens=4, temperature=0)))]  # a fifth request, added at step 3


@pytest.fixture(scope="module")
def want(setup):
    """The engine's outputs without overlap: REQUESTS and LATE's request."""
    return outputs(run(engine(setup, False), REQUESTS, LATE))


def test_overlapped_steps_equal_the_engine_without_overlap(setup, want):
    over = engine(setup, True)
    assert outputs(run(over, REQUESTS)) == want[:4]
    assert over.stats["overlapped_steps"] >= 2
    assert over.stats["generated_tokens"] == 7 + 4 + 7 + 5
    assert over.kv.used_blocks == 0 and not over.running and not over.in_flight


def test_chained_steps_take_new_kv_blocks_as_they_cross_one(setup):
    """Prompts of 12 and 14 tokens decoding 12 greedy tokens cross the 16-token block while
    their steps chain: each takes its new block at the crossing, and the text equals the
    engine's without overlap."""
    lengths = [(1, "sql", 12), (2, None, 14)]

    def both(overlap):
        eng = engine(setup, overlap)
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        reqs = [eng.add_request(prompt(s, n), params, a) for s, a, n in lengths]
        tables = []
        while eng.has_work():
            eng.step()
            tables.append([len(r.blocks) for r in reqs])
        return eng, outputs(reqs), tables

    over, got, tables = both(True)
    _, want, _ = both(False)
    assert got == want and all(len(ids) == 12 for ids, _, _ in got)
    assert over.stats["overlapped_steps"] >= 8
    assert [2, 2] in tables and over.kv.used_blocks == 0


def test_a_stop_string_mid_chain_drops_the_next_row_and_the_others_go_on(setup, want):
    """A request whose stop string turns up when its token is read has already had its next
    row queued: that row's token is dropped, the others' tokens are gathered past it."""
    text = want[0][1]
    stop = text[len(text) // 2 :][:2]  # text of its middle tokens
    assert stop and text.index(stop) > 0
    stopped = (1, "sql", dict(max_tokens=7, temperature=0, stop=[stop]))
    (alone,) = outputs(run(engine(setup, False), [stopped]))
    over = engine(setup, True)
    assert outputs(run(over, [stopped, *REQUESTS[1:]])) == [alone, *want[1:4]]
    assert alone[2] == "stop" and len(alone[0]) < 7
    assert over.stats["overlapped_steps"] >= 2
    assert over.kv.used_blocks == 0 and not over.running


def test_arrivals_and_aborts_while_a_step_is_in_flight(setup, want):
    """A request arriving, or one aborted, while a step is in flight: the engine reads that step's
    tokens first, then schedules as usual; the others' outputs are unchanged."""
    assert outputs(run(engine(setup, True), REQUESTS, LATE)) == want
    eng = engine(setup, True)
    reqs = [eng.add_request(prompt(s, 6), SamplingParams(**p), a) for s, a, p in REQUESTS]
    step_until_in_flight(eng, reqs)
    eng.abort(reqs[0].id)
    while eng.has_work():
        eng.step()
    assert reqs[0].finish_reason == "abort" and 0 < len(reqs[0].output_ids) < 7
    assert outputs(reqs[1:]) == want[1:4]
    assert eng.kv.used_blocks == 0 and not eng.in_flight


def test_a_failed_step_drops_the_step_in_flight(setup):
    """The step after the in-flight one fails: every request fails with the engine's error
    (none is far enough to end by length, so none ends with the in-flight step's token)."""
    eng = engine(setup, True)
    reqs = [eng.add_request(prompt(s, 6), SamplingParams(**dict(p, max_tokens=20)), a) for s, a, p in REQUESTS]
    step_until_in_flight(eng, reqs)

    def broken(*args, **kw):
        raise RuntimeError("device lost")

    assert not any(r.finished for r in reqs)
    eng.runner.graphs.run = eng.runner.model = broken  # whether the next step chains or not
    eng.step()
    assert all(r.finish_reason == "error" and r.error_type == "engine" for r in reqs)
    assert not eng.in_flight and eng.kv.used_blocks == 0 and eng.failures_in_a_row == 1
