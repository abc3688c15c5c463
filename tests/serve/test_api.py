"""The HTTP API through the official openai client and raw HTTP, on a live local server."""

import asyncio
import json
import time

import httpx
import openai
import pytest
from helpers import LiveServer, peft_adapter, prompt, reference, tiny_llama_folder, wide_llama_folder

import loraflow as lf


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    tiny_llama_folder(root / "base")
    tiny_llama_folder(root / "other", seed=1)
    (root / "dir").mkdir()
    adapters = {
        "sql": peft_adapter(root / "base", root / "dir" / "sql", 4, ["q_proj", "v_proj"], seed=1),
        "med": peft_adapter(root / "base", root / "dir" / "med", 8, ["k_proj", "o_proj"], seed=2),
        "py": peft_adapter(root / "base", root / "dir" / "py", 2, "all-linear", seed=3),
        "x0": peft_adapter(root / "base", root / "dir" / "x0", 2, ["v_proj"], seed=4),
        "x1": peft_adapter(root / "base", root / "dir" / "x1", 2, ["up_proj"], seed=5),
    }
    import shutil

    wide_llama_folder(root / "wide")
    bad = peft_adapter(root / "wide", root / "bad", 2, ["q_proj"], seed=6)  # another base model's shapes
    shutil.copytree(bad, root / "dir" / "wrong")
    return root, adapters


@pytest.fixture(scope="module")
def server(files):
    root, adapters = files
    engine = lf.Engine(
        model=root / "base",
        adapter_dir=root / "dir",
        adapters={"bad": str(root / "bad")},
        device="cpu",
        max_gpu_adapters=2,
        max_batch_tokens=64,
    )
    s = LiveServer(engine, adapter_dir=str(root / "dir"), allow_runtime_lora=True)
    yield s
    s.close()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def decode(files, ids):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(files[0] / "base").decode(ids, skip_special_tokens=True)


def test_completions_non_stream_and_stream_equal_the_reference(server, files):
    root, adapters = files
    c = client(server)
    p = prompt(1, 7)
    out = c.completions.create(model="sql", prompt=p, max_tokens=8, temperature=0)
    assert out.choices[0].text == decode(files, reference(root / "base", adapters["sql"], p, 8))
    assert out.usage.prompt_tokens == 7 and out.usage.completion_tokens >= 1
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    pieces = list(c.completions.create(model="sql", prompt=p, max_tokens=8, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in pieces) == out.choices[0].text
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    base = c.completions.create(model="base", prompt=p, max_tokens=8, temperature=0)
    assert base.choices[0].text == decode(files, reference(root / "base", None, p, 8))


def test_chat_non_stream_and_stream(server, files):
    c = client(server)
    msgs = [{"role": "user", "content": prompt(2, 5)}]
    out = c.chat.completions.create(model="med", messages=msgs, max_tokens=6, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.usage.completion_tokens >= 1
    stream = c.chat.completions.create(
        model="med", messages=msgs, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_models_lists_base_and_adapters(server):
    models = {m.id: m for m in client(server).models.list().data}
    assert {"base", "sql", "med", "py", "x0", "x1", "bad"} <= set(models)
    assert models["sql"].model_extra["parent"] == "base" and models["base"].model_extra["parent"] is None


def test_errors_have_openai_bodies(server, files):
    url = server.url
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json() and r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"model": "sql", "prompt": "w1", "temperature": 5})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "w1"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url + "/v1/completions", json={"model": "sql", "prompt": prompt(0, 400)})
    assert r.status_code == 400 and "context holds" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="nope", prompt="w1")


def test_an_adapter_that_fails_to_load_fails_only_its_requests(server):
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
            return await asyncio.gather(
                h.post("/v1/completions", json={"model": "bad", "prompt": prompt(3, 4), "max_tokens": 3}),
                h.post("/v1/completions", json={"model": "sql", "prompt": prompt(3, 4), "max_tokens": 3}),
            )

    bad, good = asyncio.run(run())
    assert bad.status_code == 400 and "another base model" in bad.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["choices"][0]["text"]


def test_runtime_load_and_unload(server, files):
    root, _ = files
    url = server.url
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(root / "bad")})
    assert r.status_code == 403 and "outside" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "w", "lora_path": str(root / "dir" / "wrong")})
    assert r.status_code == 400 and "another base model" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(root / "dir" / "py")})
    assert r.status_code == 200
    assert client(server).completions.create(model="late", prompt="w3 w4", max_tokens=2, temperature=0).choices
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 404
    assert httpx.post(url + "/v1/completions", json={"model": "late", "prompt": "w1"}).status_code == 404


def test_eviction_with_two_device_slots_and_five_adapters_in_use(server, files):
    root, adapters = files
    names = ["sql", "med", "py", "x0", "x1"] * 2

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as h:
            return await asyncio.gather(
                *[
                    h.post(
                        "/v1/completions",
                        json={"model": n, "prompt": prompt(40 + i, 5), "max_tokens": 4, "temperature": 0},
                    )
                    for i, n in enumerate(names)
                ]
            )

    outs = asyncio.run(run())
    for i, (r, n) in enumerate(zip(outs, names)):
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == decode(
            files, reference(root / "base", adapters[n], prompt(40 + i, 5), 4)
        )
    assert len(server.loop.engine.registry.device) <= 2
    metrics = httpx.get(server.url + "/metrics").text
    values = dict(line.split() for line in metrics.splitlines() if line and not line.startswith("#"))
    evictions = float(values["loraflow_adapter_evictions_total"])
    assert evictions >= 3
    requests, resident = (float(values[f"loraflow_adapter_{k}_total"]) for k in ("requests", "requests_without_load"))
    assert requests >= len(names) and 0 <= resident < requests  # each adapter's first request had to load it
    assert float(values["loraflow_adapter_hit_rate"]) == pytest.approx(resident / requests)


def test_a_stream_behind_the_engine_sends_its_backlog_as_one_chunk(server, files):
    """The HTTP loop held up for 0.5 s while the engine runs on: the updates queued meanwhile go
    out as one chunk of all their text and log-probabilities, equal to the answer unstreamed."""
    body = {"model": "py", "prompt": prompt(6, 5), "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    body["logprobs"] = 1
    whole = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]
    pieces = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0])
                if len(pieces) == 1:
                    server.server.servers[0].get_loop().call_soon_threadsafe(time.sleep, 0.5)
    assert "".join(p["text"] for p in pieces) == whole["text"]
    tokens = [t for p in pieces for t in p["logprobs"]["tokens"]]
    assert tokens == whole["logprobs"]["tokens"]
    assert [round(v, 4) for p in pieces for v in p["logprobs"]["token_logprobs"]] == [
        round(v, 4) for v in whole["logprobs"]["token_logprobs"]
    ]
    assert len(pieces) < 12  # 24 tokens, most of them queued while the loop slept


def test_metrics_split_the_steps_by_how_they_ran(server):
    c = client(server)
    c.completions.create(model="sql", prompt=prompt(7, 6), max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    values = dict(
        line.split() for line in httpx.get(server.url + "/metrics").text.splitlines() if line and line[0] != "#"
    )
    steps = {k: float(values[f"loraflow_{k}_steps_total"]) for k in ("graph", "decode", "prompt")}
    assert steps["prompt"] >= 1 and steps["decode"] >= 4  # the CPU runs no CUDA graphs
    assert sum(steps.values()) == server.loop.engine.stats["steps"]
    for k in steps:
        total, most = float(values[f"loraflow_{k}_step_seconds_total"]), float(values[f"loraflow_{k}_step_seconds_max"])
        assert 0 <= most <= total and (total > 0) == (steps[k] > 0)
    assert float(values["loraflow_graph_captures_total"]) == 0  # no decode graphs on the CPU
    tiers = {k: float(values[f"loraflow_adapter_{k}_total"]) for k in ("loads", "load_seconds", "slot_writes")}
    assert tiers["loads"] >= 1 and tiers["load_seconds"] > 0 and tiers["slot_writes"] >= 1, tiers


def test_disconnect_mid_stream_frees_blocks_and_slot(server):
    engine = server.loop.engine
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"model": "py", "prompt": prompt(5, 5), "max_tokens": 200, "temperature": 1.0, "stream": True, "seed": 1},
        timeout=30,
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    deadline = time.time() + 10
    while (engine.running or engine.kv.used_blocks) and time.time() < deadline:
        time.sleep(0.02)
    assert not engine.running and engine.kv.used_blocks == 0
    assert engine.registry.pins["py"] == 0


def test_64_concurrent_requests_are_all_answered(server):
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as h:
            return await asyncio.gather(
                *[
                    h.post(
                        "/v1/completions",
                        json={
                            "model": ["sql", "base", "med"][i % 3],
                            "prompt": prompt(i, 4),
                            "max_tokens": 3,
                            "temperature": 0.7,
                            "seed": i,
                            "ignore_eos": True,  # a sampled end of text would end one early
                        },
                    )
                    for i in range(64)
                ]
            )

    outs = asyncio.run(run())
    assert [r.status_code for r in outs] == [200] * 64
    assert all(r.json()["usage"]["completion_tokens"] == 3 for r in outs)


def test_api_key_and_busy_server(files):
    root, _ = files
    engine = lf.Engine(model=root / "base", device="cpu", max_waiting=0)
    s = LiveServer(engine, api_key="sekrit")
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/metrics").status_code == 401
        auth = {"Authorization": "Bearer sekrit"}
        assert httpx.get(s.url + "/v1/models", headers=auth).status_code == 200
        r = httpx.post(s.url + "/v1/completions", json={"model": "base", "prompt": "w1"}, headers=auth)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "busy" in r.json()["error"]["message"]
    finally:
        s.close()


def test_the_serve_command_answers_with_each_adapter_and_stops_on_sigterm(files):
    """``loraflow serve`` as a user starts it: its own process, the engine on the main
    thread and HTTP on another; greedy answers equal transformers + PEFT; SIGTERM stops it."""
    import signal
    import socket
    import subprocess
    import sys

    root, adapters = files
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loraflow.cli",
            "serve",
            "--model",
            str(root / "base"),
            "--lora",
            f"sql={adapters['sql']}",
            "--lora",
            f"py={adapters['py']}",
            "--port",
            str(port),
            "--max-batch-tokens",
            "64",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.time() < deadline, "the server did not start in 2 minutes"
                time.sleep(0.2)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        for name in ("sql", "py"):
            out = api.completions.create(model=name, prompt=prompt(7, 6), max_tokens=5, temperature=0)
            assert out.usage.completion_tokens == 5
            assert out.choices[0].text == decode(files, reference(root / "base", adapters[name], prompt(7, 6), 5))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, proc.stdout.read()
