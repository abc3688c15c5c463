"""500 concurrent mixed requests, some clients leaving at random: every request that stays
is answered (200) or turned away (503 + Retry-After), and afterwards the KV blocks and the
adapter slots are back to idle."""

import asyncio
import random
import time

import httpx
import pytest
from helpers import LiveServer, peft_adapter, prompt, tiny_llama_folder

import loraflow as lf


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    tiny_llama_folder(root / "base")
    (root / "dir").mkdir()
    for i, targets in enumerate([["q_proj"], ["v_proj", "o_proj"], "all-linear", ["up_proj"]]):
        peft_adapter(root / "base", root / "dir" / f"a{i}", 2 + i, targets, seed=i)
    engine = lf.Engine(
        model=root / "base",
        adapter_dir=root / "dir",
        device="cpu",
        max_batch_tokens=256,
        max_gpu_adapters=2,
        max_waiting=300,
    )
    s = LiveServer(engine)
    yield s
    s.close()


def test_500_concurrent_mixed_requests_with_random_disconnects(server):
    rng = random.Random(0)
    models = ["base", "a0", "a1", "a2", "a3"]

    async def one(h, i):
        body = {
            "model": rng.choice(models),
            "prompt": prompt(i, rng.randint(1, 12)),
            "max_tokens": rng.randint(1, 8),
            "temperature": rng.choice([0, 0.8]),
            "seed": i,
            "stream": rng.random() < 0.3,
            "logprobs": rng.choice([None, 2]),
        }
        leave = rng.random() < 0.2  # this client gives up after a random short wait
        try:
            if body["stream"]:

                async def read():
                    async with h.stream("POST", "/v1/completions", json=body) as r:
                        return r.status_code, [line async for line in r.aiter_lines()]

                call = read()
            else:
                call = h.post("/v1/completions", json=body)
            out = await asyncio.wait_for(call, rng.uniform(0.05, 1.0)) if leave else await call
        except TimeoutError:
            return "left", None
        return body["stream"], out

    async def run():
        limits = httpx.Limits(max_connections=600, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=180, limits=limits) as h:
            return await asyncio.gather(*[one(h, i) for i in range(500)])

    outs = asyncio.run(run())
    answered = busy = left = 0
    for stream, out in outs:
        if stream == "left":
            left += 1
        elif stream:
            code, lines = out
            assert code in (200, 503), code
            if code == 200:
                assert "data: [DONE]" in lines and '"error"' not in "".join(lines), lines[-3:]
                answered += 1
            else:
                busy += 1
        else:
            assert out.status_code in (200, 503), (out.status_code, out.text)
            if out.status_code == 503:
                assert out.headers["retry-after"] and "busy" in out.json()["error"]["message"]
                busy += 1
            else:
                assert out.json()["choices"][0]["finish_reason"] in ("stop", "length")
                answered += 1
    assert answered + busy + left == 500 and answered >= 100 and left >= 50, (answered, busy, left)
    engine = server.loop.engine
    deadline = time.time() + 30
    while (engine.running or engine.waiting or engine.kv.used_blocks) and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.running and not engine.waiting and engine.kv.used_blocks == 0
    assert not any(engine.registry.pins.values())
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
