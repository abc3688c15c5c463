"""``loraflow serve --ray`` on a local Ray cluster (loopback only, started once for the module):
two replicas of a tiny random model (``--random-weights tiny``) with eight adapters written
here. Routing is read from the replicas' own counters (their /metrics pages, labelled by
replica), never from the router's word; answers are compared with one ``lf.Engine``'s greedy
outputs, token for token."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import ray
import torch
from ray import serve

from loraflow.bench.serve import make_adapters
from loraflow.deploy.command import connect, start, stop
from loraflow.deploy.config import DeployConfig
from loraflow.deploy.metrics import samples
from loraflow.serve.llama import SHAPES, LlamaArgs, linear_shapes
from loraflow.serve.tp_launch import build_engine

BASE = "tiny"
KEY = {"Authorization": "Bearer test-key"}  # the router checks it (serve/guard.py); the replicas need none


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    shapes = linear_shapes(LlamaArgs(**SHAPES[BASE]))
    make_adapters(shapes, root / "adapters", 8, 4, seed=0, dtype=torch.float32)  # rand0 .. rand7
    # loaded at run time only: under --adapter-dir, but not directly (the start-up scan skips it)
    make_adapters(shapes, root / "adapters" / "later", 1, 4, seed=1, dtype=torch.float32)
    return root / "adapters"


@pytest.fixture(scope="module")
def config(folders):
    return DeployConfig(
        random_weights=BASE,
        adapter_dir=str(folders),
        allow_runtime_lora=True,
        replicas=2,
        replica_cpus=1,
        max_batch_tokens=64,
        max_gpu_adapters=4,
        kv_cache_bytes=16 * 2**20,
        heartbeat_s=0.25,
        stale_s=2.0,
        health_check_period_s=2.0,
        graceful_shutdown_timeout_s=2.0,
        log_requests=False,
        api_key="test-key",
    )


@pytest.fixture(scope="module")
def url(config):
    cluster = connect(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        yield start(config, "127.0.0.1", 0)
    finally:
        stop(cluster)
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def reference(config, folders):
    """One engine in this process, as ``loraflow serve --random-weights tiny`` would build it."""
    engine = build_engine(config.engine_spec(), "cpu")
    for name in ("late", "late2"):  # loaded at run time by the tests, one name each
        engine.registry.register(name, folders / "later" / "rand0")
    return engine


def expected(reference, prompts, adapters, **sampling):
    """The reference engine's greedy texts, on one thread: beside the cluster's processes on 2
    cores, two OpenMP threads wait on each other (README, Threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference.generate(prompts, adapters=adapters, temperature=0.0, **sampling)
    finally:
        torch.set_num_threads(threads)


async def complete(client, model: str, prompt: str, stream: bool, **fields) -> dict:
    """One completion: its status, its text (a stream's pieces joined) and an error's type."""
    body = {"model": model, "prompt": prompt, "temperature": 0, "stream": stream, **fields}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        raw = await r.aread()
    if r.status_code != 200:
        return {
            "status": r.status_code,
            "error": json.loads(raw)["error"]["type"],
            "retry": r.headers.get("retry-after"),
        }
    if not stream:
        return {"status": 200, "text": json.loads(raw)["choices"][0]["text"], "error": None}
    text, error, done = "", None, False
    for line in raw.decode().splitlines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["type"]
            else:
                text += event["choices"][0]["text"]
    assert done, raw  # every stream ends with [DONE], broken or not
    return {"status": 200, "text": text, "error": error}


def post(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(url + route, json=body, timeout=60, headers=KEY)


def metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=30, headers=KEY).text


def by_adapter(page: str) -> dict[str, dict[str, float]]:
    """adapter -> {replica id: requests it ran}, from the replicas' own counters."""
    out: dict[str, dict[str, float]] = {}
    for labels, n in samples(page, "loraflow_requests_by_adapter_total").items():
        fields = dict(part.split("=", 1) for part in labels.split(","))
        if "replica" in fields:
            out.setdefault(fields["adapter"].strip('"'), {})[fields["replica"].strip('"')] = n
    return out


def per_replica(page: str, name: str) -> dict[str, float]:
    return {k.split('"')[1]: v for k, v in samples(page, name).items() if k.startswith("replica=")}


def prompts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"t{i}" for i in torch.randint(3, 32000, (5 + k,), generator=g).tolist()) for k in range(n)]


def test_the_router_asks_for_the_api_key_but_on_health(url):
    assert httpx.get(url + "/health").json() == {"status": "ok", "replicas": 2}
    r = httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": "t5", "max_tokens": 1})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/metrics").status_code == 401


def test_answers_equal_a_single_engine(url, reference):
    ps = prompts(3, seed=1)
    jobs = [(p, m, s) for p in ps for m in (BASE, "rand0", "rand1", "rand2", "rand3") for s in (False, True)]

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=KEY) as client:
            return await asyncio.gather(*[complete(client, m, p, s, max_tokens=8) for p, m, s in jobs])

    got = asyncio.run(run())
    want = expected(reference, [p for p, _, _ in jobs], [None if m == BASE else m for _, m, _ in jobs], max_tokens=8)
    assert [g["text"] for g in got] == want
    assert len(set(want)) > len(ps)  # the adapters change the answers: each is applied, not the base model


def test_each_adapter_lands_on_the_replica_that_loaded_it(url):
    adapters = ["rand4", "rand5", "rand6", "rand7"]
    ps = prompts(6, seed=2)

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=KEY) as client:
            for a in adapters:  # one at a time: each replica's holdings reach the router (Serve pushes every 0.1 s)
                assert (await complete(client, a, ps[0], False, max_tokens=2))["status"] == 200
                await asyncio.sleep(1.0)
            jobs = [complete(client, a, p, i % 2 == 1, max_tokens=4) for a in adapters for i, p in enumerate(ps)]
            return await asyncio.gather(*jobs)

    assert all(r["status"] == 200 for r in asyncio.run(run()))
    page = metrics(url)
    counts = by_adapter(page)
    for a in adapters:
        assert len(counts[a]) == 1, f"{a} ran on several replicas: {counts[a]}"
        assert sum(counts[a].values()) == 1 + len(ps)
    holders = {r for a in adapters for r in counts[a]}
    assert len(per_replica(page, "loraflow_adapter_requests_total")) == 2
    assert len({r for c in counts.values() for r in c}) == 2, counts  # both replicas serve adapters
    # every request after an adapter's first found it where it went: in that replica's memory
    hits = per_replica(page, "loraflow_adapter_requests_without_load_total")
    assert sum(hits[r] for r in holders) >= len(adapters) * len(ps)
    total = per_replica(page, "loraflow_adapter_requests_total")
    rate = per_replica(page, "loraflow_adapter_hit_rate")
    assert all(rate[r] == pytest.approx(hits[r] / total[r]) for r in total)
    assert samples(page, "loraflow_adapter_hit_rate")[""] == pytest.approx(sum(hits.values()) / sum(total.values()))
    # the engine's step counters, per replica and in sum; the longest step is the fleet's longest
    steps, most = (per_replica(page, f"loraflow_prompt_{k}") for k in ("steps_total", "step_seconds_max"))
    assert len(steps) == 2 and min(steps.values()) >= 1
    assert samples(page, "loraflow_prompt_steps_total")[""] == sum(steps.values())
    assert samples(page, "loraflow_prompt_step_seconds_max")[""] == max(most.values())


def test_load_and_unload_reach_every_replica(url, reference):
    before = per_replica(metrics(url), "loraflow_adapters_registered")
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "later/rand0"})
    assert r.status_code == 200, r.text
    page = metrics(url)  # the answer came once every replica had applied it
    assert per_replica(page, "loraflow_adapters_registered") == {k: v + 1 for k, v in before.items()}
    p = prompts(1, seed=3)[0]
    out = post(url, "/v1/completions", {"model": "late", "prompt": p, "max_tokens": 8, "temperature": 0})
    assert out.json()["choices"][0]["text"] == expected(reference, [p], ["late"], max_tokens=8)[0]
    models = [m["id"] for m in httpx.get(url + "/v1/models", headers=KEY).json()["data"]]
    assert "late" in models

    r = post(url, "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert r.status_code == 200, r.text
    assert per_replica(metrics(url), "loraflow_adapters_registered") == before
    gone = post(url, "/v1/completions", {"model": "late", "prompt": p, "max_tokens": 2})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    refused = post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"})
    assert refused.status_code == 403  # the replica's own checks answer


def test_a_client_that_leaves_mid_stream_stops_its_generation(url):
    body = {"model": "rand1", "prompt": prompts(1, seed=6)[0], "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60, headers=KEY) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the response
        while not next(lines).startswith("data: {"):
            pass
        assert samples(metrics(url), "loraflow_requests_running")[""] == 1
        r.close()  # the first token came: leave
    deadline = time.monotonic() + 20  # the router, then the replica, see the client go and abort it
    while samples(metrics(url), "loraflow_requests_running")[""] != 0:
        assert time.monotonic() < deadline, "the generation went on for a client that left"
        time.sleep(0.2)


def replica_actor(replica: str):
    """The Ray actor of Serve's replica ``replica``, found through Ray's own API."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + replica)]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")


def running_replicas() -> int:
    status = serve.status().applications["loraflow"].deployments["LoraflowReplica"]
    return status.replica_states.get("RUNNING", 0)


def test_killing_a_replica_loses_no_acknowledged_request(url, reference):
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "late2", "lora_path": "later/rand0"})
    assert r.status_code == 200, r.text
    ps = prompts(8, seed=4)
    long = dict(max_tokens=160, ignore_eos=True)
    jobs = [("late2", ps[i], i % 2 == 1) for i in range(6)] + [("rand4", ps[6], False), (BASE, ps[7], True)]

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120, headers=KEY) as client:
            assert (await complete(client, "late2", ps[0], False, max_tokens=2))["status"] == 200
            await asyncio.sleep(1.0)
            (holder,) = by_adapter(metrics(url))["late2"]  # the one replica that took it on
            # a stream that has begun on the replica that holds "late2": then kill it
            first = asyncio.Event()

            async def watched():
                body = {"model": "late2", "prompt": ps[0], "temperature": 0, "stream": True, **long}
                text, error = "", None
                async with client.stream("POST", "/v1/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {"):
                            event = json.loads(line[6:])
                            if "error" in event:
                                error = event["error"]["type"]
                            else:
                                text += event["choices"][0]["text"]
                                first.set()
                return {"status": resp.status_code, "text": text, "error": error}

            tasks = [asyncio.ensure_future(watched())]
            tasks += [asyncio.ensure_future(complete(client, m, p, s, **long)) for m, p, s in jobs]
            await asyncio.wait_for(first.wait(), 60)
            ray.kill(replica_actor(holder), no_restart=True)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)  # none hangs
            return holder, results

    holder, results = asyncio.run(run())
    deadline = time.monotonic() + 30  # the catalog forgets the killed replica (its actor is gone)
    while holder in per_replica(metrics(url), "loraflow_adapters_registered"):
        assert time.monotonic() < deadline, "the killed replica still counts as live"
        time.sleep(0.2)
    survivors = by_adapter(metrics(url))["late2"]
    assert survivors and holder not in survivors  # the retried requests ran on the other replica, which had it too
    models = ["late2"] + [None if m == BASE else m for m, _, _ in jobs]
    want = expected(reference, [ps[0]] + [p for _, p, _ in jobs], models, **long)
    for got, text, streamed in zip(results, want, [True] + [s for _, _, s in jobs]):
        if got["status"] == 200 and got["error"] is None:
            assert got["text"] == text  # completed: in full and right
        else:  # or failed in a way a client retries, never silently
            assert streamed, f"a request that had sent nothing was not retried: {got}"
            assert got["status"] in (200, 503) and got["error"] == "server_error", got
            assert got["status"] == 200 or got["retry"] == "1"
    assert results[0]["error"] == "server_error"  # the stream that was running on the killed replica
    # the requests of "late2" that had sent nothing went once more, to the other replica
    assert samples(metrics(url), "loraflow_router_retries_total")[""] >= 1

    deadline = time.monotonic() + 120  # Serve starts a replica in its place
    while running_replicas() < 2 or httpx.get(url + "/health").json().get("replicas") != 2:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)
    page = metrics(url)
    replicas = per_replica(page, "loraflow_adapters_registered")
    assert holder not in replicas and len(replicas) == 2
    assert set(replicas.values()) == {9}  # the new replica applied the runtime load before serving
    p = prompts(1, seed=5)[0]
    out = post(url, "/v1/completions", {"model": "late2", "prompt": p, "max_tokens": 8, "temperature": 0})
    assert out.json()["choices"][0]["text"] == expected(reference, [p], ["late2"], max_tokens=8)[0]
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "late2"}).status_code == 200
