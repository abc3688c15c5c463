"""Adapters loaded, unloaded and replaced while requests use them; clients that leave; steps
that fail; time limits. A failure ends its own requests and never the process."""

import asyncio
import threading
import time

import httpx
import pytest
import torch
from helpers import LiveServer, peft_adapter, prompt, reference, tiny_llama_folder, wide_llama_folder

import loraflow as lf
from loraflow.serve.loop import EngineDown, EngineLoop
from loraflow.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    tiny_llama_folder(root / "base")
    (root / "dir").mkdir()
    adapters = {
        "sql": peft_adapter(root / "base", root / "dir" / "sql", 4, ["q_proj", "v_proj"], seed=1),
        "py": peft_adapter(root / "base", root / "dir" / "py", 2, "all-linear", seed=3),
    }
    wide_llama_folder(root / "wide")
    adapters["bad"] = peft_adapter(root / "wide", root / "bad", 2, ["q_proj"], seed=6)  # another model's shapes
    return root, adapters


def engine(files, **kw):
    root, adapters = files
    kw = {"max_batch_tokens": 64, **kw}
    return lf.Engine(
        model=root / "base", adapters={"sql": str(adapters["sql"]), "py": str(adapters["py"])}, device="cpu", **kw
    )


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0)


def run(eng, reqs, limit=2000):
    for _ in range(limit):
        if all(r.finished for r in reqs):
            return
        eng.step()
        time.sleep(0.001)
    raise AssertionError("requests did not finish")


def slow_model(eng, seconds):
    """Make every model call take at least ``seconds`` (a long generation on a fast machine)."""
    forward = eng.model.forward

    def slow(*args, **kw):
        time.sleep(seconds)
        return forward(*args, **kw)

    eng.model.forward = slow


def test_unloading_an_adapter_whose_request_is_queued_fails_that_request_only(files):
    root, adapters = files
    eng = engine(files)
    queued = eng.add_request(prompt(1, 5), greedy(4), "sql")
    other = eng.add_request(prompt(2, 5), greedy(4), "py")
    eng.registry.unregister("sql")
    run(eng, [queued, other])
    assert queued.finish_reason == "error" and "unloaded" in queued.error and queued.error_type == "adapter"
    assert other.output_ids == reference(root / "base", adapters["py"], prompt(2, 5), 4)
    assert eng.kv.used_blocks == 0 and not any(eng.registry.pins.values())


def test_an_adapter_that_fails_to_load_answers_on_an_idle_engine(files):
    """The failed request's output is delivered even when no other request runs."""
    root, adapters = files
    eng = engine(files)
    eng.registry.register("bad", adapters["bad"])
    seen = []
    req = eng.add_request(prompt(3, 4), greedy(3), "bad", on_output=seen.append)
    for _ in range(2000):
        if seen:
            break
        eng.step()
        time.sleep(0.002)
    assert seen == [req] and req.error_type == "adapter" and "another base model" in req.error


def test_registering_a_name_again_serves_the_new_weights(files):
    root, adapters = files
    eng = engine(files)
    p = prompt(4, 6)
    first = eng.add_request(p, greedy(5), "sql")
    run(eng, [first])
    assert first.output_ids == reference(root / "base", adapters["sql"], p, 5)
    eng.registry.register("sql", adapters["py"])  # the host and device copies of the old ones go
    second = eng.add_request(p, greedy(5), "sql")
    run(eng, [second])
    assert second.output_ids == reference(root / "base", adapters["py"], p, 5)
    with pytest.raises(lf.serve.registry.AdapterError, match="base model's name"):
        eng.registry.register(eng.model_name, adapters["py"])


def test_a_step_that_fails_fails_the_requests_in_flight_and_the_engine_goes_on(files):
    eng = engine(files)
    forward, fail = eng.model.forward, []

    def once(*args, **kw):
        if fail:
            fail.clear()
            raise RuntimeError("CUDA out of memory (injected)")
        return forward(*args, **kw)

    eng.model.forward = once
    a = eng.add_request(prompt(5, 4), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), "sql")
    while not a.output_ids:  # its adapter loads, then its prompt runs
        eng.step()
        time.sleep(0.002)
    b = eng.add_request(prompt(6, 4), greedy(4), None)
    fail.append(1)
    eng.step()  # fails: a and b were in flight
    assert a.error_type == b.error_type == "engine" and "out of memory" in a.error
    assert eng.failures_in_a_row == 1 and eng.kv.used_blocks == 0 and not any(eng.registry.pins.values())
    c = eng.add_request(prompt(6, 4), greedy(4), "py")
    run(eng, [c])
    assert c.finish_reason in ("stop", "length") and eng.failures_in_a_row == 0


def test_an_engine_that_keeps_failing_fails_everything_and_stops_the_loop(files):
    eng = engine(files, max_batch_tokens=4)  # one 4-token prompt a step: three steps fail in turn

    def broken(*args, **kw):
        raise RuntimeError("device lost (injected)")

    eng.model.forward = broken
    loop = EngineLoop(eng, background=False, max_failures=3)
    reqs = [eng.add_request(prompt(7 + i, 4), greedy(4), None) for i in range(5)]
    with pytest.raises(EngineDown, match="3 steps in a row"):
        loop.run_forever()
    assert all(r.finish_reason == "error" and r.error_type == "engine" for r in reqs)
    assert "stopped" in reqs[-1].error  # the two never run were failed on the way out
    with pytest.raises(EngineDown):
        asyncio.run(_submit(loop))
    assert eng.kv.used_blocks == 0 and not eng.running and not eng.waiting


async def _submit(loop):
    return loop.submit([5, 6], greedy(2), None)


def test_the_request_time_limit_fails_a_long_request(files):
    eng = engine(files, request_timeout=0.3)
    slow_model(eng, 0.05)
    long = eng.add_request(prompt(8, 4), SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), "sql")
    run(eng, [long])
    assert long.error_type == "timeout" and "--request-timeout" in long.error
    assert len(long.output_ids) < 50 and eng.kv.used_blocks == 0
    with pytest.raises(ValueError, match="request_timeout"):
        engine(files, request_timeout=0)


@pytest.fixture(scope="module")
def server(files):
    root, _ = files
    eng = engine(files, request_timeout=30)
    eng.registry.scan(root / "dir")
    s = LiveServer(eng, adapter_dir=str(root / "dir"), allow_runtime_lora=True)
    yield s
    s.close()


def test_a_non_streaming_client_that_leaves_stops_its_generation(server):
    eng = server.loop.engine
    before = eng.stats["generated_tokens"]
    forward = eng.model.forward
    slow_model(eng, 0.02)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                server.url + "/v1/completions",
                timeout=0.5,
                json={"model": "sql", "prompt": prompt(9, 4), "max_tokens": 240, "ignore_eos": True},
            )
        deadline = time.time() + 10
        while eng.running and time.time() < deadline:
            time.sleep(0.02)
    finally:
        eng.model.forward = forward
    assert not eng.running and eng.kv.used_blocks == 0 and eng.registry.pins["sql"] == 0
    assert eng.stats["generated_tokens"] - before < 100  # 240 if it had run on for nobody


def test_an_adapter_that_fails_to_load_answers_when_nothing_else_runs(server, files):
    root, adapters = files
    server.loop.engine.registry.register("bad", adapters["bad"])  # as --lora does: checked at first use
    r = httpx.post(server.url + "/v1/completions", json={"model": "bad", "prompt": "w1", "max_tokens": 2}, timeout=20)
    assert r.status_code == 400 and r.json()["error"]["type"] == "adapter_error"


def test_unloading_needs_runtime_lora_to_be_allowed(files):
    eng = engine(files)
    s = LiveServer(eng)
    try:
        r = httpx.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": "sql"})
        assert r.status_code == 403 and "--allow-runtime-lora" in r.json()["error"]["message"]
        assert eng.registry.known("sql")
    finally:
        s.close()


def test_loading_and_unloading_while_requests_use_the_adapter(server, files):
    """Clients hammer 'late' while another thread loads and unloads it: every answer is a
    200, or a 4xx that says the adapter is gone; nothing is left pinned or allocated."""
    root, _ = files
    url, stop = server.url, threading.Event()
    codes = []

    def churn():
        while not stop.is_set():
            httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(root / "dir" / "py")})
            time.sleep(0.01)
            httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"})

    async def clients():
        async with httpx.AsyncClient(base_url=url, timeout=60) as h:
            rs = await asyncio.gather(
                *[
                    h.post("/v1/completions", json={"model": "late", "prompt": prompt(i, 4), "max_tokens": 3})
                    for i in range(60)
                ]
            )
            return [(r.status_code, r.json()) for r in rs]

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(3):
            codes += asyncio.run(clients())
    finally:
        stop.set()
        thread.join()
    assert {c for c, _ in codes} <= {200, 400, 404}, {c for c, _ in codes}
    for code, body in codes:
        if code != 200:
            assert "unloaded" in body["error"]["message"] or "does not exist" in body["error"]["message"]
    eng = server.loop.engine
    deadline = time.time() + 10
    while eng.running and time.time() < deadline:
        time.sleep(0.02)
    assert eng.kv.used_blocks == 0 and not any(eng.registry.pins.values())
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert torch.isfinite(next(iter(eng.bank.layers.values())).packed.a).all()


def test_stopping_the_server_ends_open_streams_with_an_error_at_once(files):
    """What Ctrl-C does: the requests in flight answer "shutting down" and the HTTP server's
    graceful stop does not wait for generations that will never finish."""
    eng = engine(files)
    slow_model(eng, 0.02)
    s = LiveServer(eng)
    lines, started = [], threading.Event()

    def stream():
        body = {"model": "sql", "prompt": prompt(3, 4), "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                lines.append(line)
                started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(30)
    t = time.perf_counter()
    s.close()
    thread.join(timeout=10)
    assert time.perf_counter() - t < 5 and not thread.is_alive()
    events = [line for line in lines if line]
    assert any("shutting down" in e for e in events) and events[-1] == "data: [DONE]"
