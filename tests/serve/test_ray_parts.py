"""The pieces of ``loraflow.deploy`` that need no Ray cluster: the configuration, the metrics'
merge, the catalog's bookkeeping, the in-process ASGI exchange, and ``--ray``'s own refusals."""

from __future__ import annotations

import asyncio
import sys

import pytest
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from loraflow.cli import main
from loraflow.deploy.asgi import exchange
from loraflow.deploy.catalog import Catalog, ReplicaReport
from loraflow.deploy.config import DeployConfig
from loraflow.deploy.metrics import RoutingCounts, merge, render, samples


def test_config_refuses_what_cannot_run_naming_the_fix():
    with pytest.raises(ValueError, match="allow_runtime_lora needs adapter_dir"):
        DeployConfig(allow_runtime_lora=True)
    with pytest.raises(ValueError, match="replicas must be at least 1"):
        DeployConfig(replicas=0)
    with pytest.raises(ValueError, match="max_batch_tokens must be at least 1"):
        DeployConfig(max_batch_tokens=0)
    with pytest.raises(ValueError, match="random_weights must be one of"):
        DeployConfig(random_weights="huge")
    with pytest.raises(ValueError, match="stale_s .* must exceed two heartbeats"):
        DeployConfig(heartbeat_s=1.0, stale_s=1.5)
    with pytest.raises(ValueError, match="whole GPUs"):
        DeployConfig(replica_gpus=1.5)
    assert DeployConfig(max_cpu_adapters=12).held_per_replica == 12
    assert DeployConfig(replica_cpus=0.5).replica_threads() == 1


def test_config_reads_serve_runs_text_arguments():
    config = DeployConfig.from_mapping(
        {"random_weights": "tiny", "replicas": "3", "replica_gpus": "0.5", "allow_runtime_lora": "true",
         "adapter_dir": "/a", "lora": "x=/a/x,y=/a/y", "request_timeout": "none"}
    )  # fmt: skip
    assert (config.replicas, config.replica_gpus, config.allow_runtime_lora) == (3, 0.5, True)
    assert config.lora == {"x": "/a/x", "y": "/a/y"} and config.request_timeout is None
    assert config.engine_spec().engine["adapters"] == {"x": "/a/x", "y": "/a/y"}
    # max_batch_tokens left out: loraflow serve's default for each replica's device
    assert (
        config.engine_spec("cpu").engine["max_batch_tokens"],
        config.engine_spec("cuda").engine["max_batch_tokens"],
    ) == (512, 2048)
    assert DeployConfig.from_mapping({"max_batch_tokens": "64"}).engine_spec("cuda").engine["max_batch_tokens"] == 64
    with pytest.raises(ValueError, match="unknown option.*'replica'.*the options are"):
        DeployConfig.from_mapping({"replica": 2})
    with pytest.raises(ValueError, match="replicas='two'"):
        DeployConfig.from_mapping({"replicas": "two"})


def test_metrics_label_each_replica_then_sum_and_recompute_ratios():
    a, b = RoutingCounts(), RoutingCounts()
    a.requests.update(["x", "x", "x", "y"])
    b.requests.update(["z"])

    def engine_page(requests: int, without_load: int) -> str:  # as serve/api.py's /metrics
        return render(
            [
                ("loraflow_adapter_requests_total", "counter", "", requests),
                ("loraflow_adapter_requests_without_load_total", "counter", "", without_load),
                ("loraflow_adapter_hit_rate", "gauge", "", without_load / requests),
                ("loraflow_catalog_version", "gauge", "", requests),
            ]
        )

    page = render(merge({"r1": engine_page(4, 2) + render(a.lines()), "r2": engine_page(1, 0) + render(b.lines())}))
    assert samples(page, "loraflow_adapter_requests_total") == {'replica="r1"': 4, 'replica="r2"': 1, "": 5}
    rate = samples(page, "loraflow_adapter_hit_rate")
    assert rate == {'replica="r1"': 0.5, 'replica="r2"': 0.0, "": 2 / 5}  # the fleet's: 2 of 5, not 0.5 + 0
    assert samples(page, "loraflow_catalog_version")[""] == 1  # what every replica has: the least
    by = samples(page, "loraflow_requests_by_adapter_total")
    assert by['replica="r1",adapter="x"'] == 3 and by['adapter="x"'] == 3 and by['adapter="z"'] == 1
    assert page.count("# TYPE loraflow_adapter_requests_total counter") == 1


def report(replica: str, version: int, epoch: int = 0) -> ReplicaReport:
    return ReplicaReport(replica, f"SERVE_REPLICA::app#d#{replica}", version, "", "base", epoch)


def test_catalog_takes_changes_to_every_replica_and_waits_for_them():
    async def run():
        catalog = Catalog(stale_s=5.0)
        assert await catalog.poll(report("r1", 0), 0) == (0, {}, 0)
        await catalog.poll(report("r2", 0), 0)
        waiting = asyncio.ensure_future(catalog.poll(report("r1", 0), 5.0))  # a long poll, woken by the change
        await asyncio.sleep(0.01)
        assert not waiting.done()
        v = await catalog.change("a", "/ad/a", origin="r2")
        version, changes, _ = await asyncio.wait_for(waiting, 1.0)
        assert version == v == 1 and changes["a"].path == "/ad/a" and changes["a"].origin == "r2"
        applied = asyncio.ensure_future(catalog.wait_applied(v, 5.0))
        await catalog.poll(report("r1", 1), 0)
        await asyncio.sleep(0.01)
        assert not applied.done()  # r2 has not said it applied it
        await catalog.poll(report("r2", 1), 0)
        assert await asyncio.wait_for(applied, 1.0) == []
        await catalog.change("a", None, origin="r1")  # unloaded
        _, changes, _ = await catalog.poll(report("r3", 0), 0)  # a replica that starts later gets the latest
        assert changes["a"].path is None and changes["a"].version == 2
        assert await catalog.wait_applied(2, 0.05) == ["r1", "r2", "r3"]  # none applied it yet: named
        await catalog.leave("r3")
        assert [r.replica for r in (await catalog.describe())["replicas"]] == ["r1", "r2"]

    asyncio.run(run())


def test_catalog_fresh_asks_every_replica_for_a_new_report():
    async def run():
        catalog = Catalog(stale_s=5.0)

        async def replica(name):  # polls as replica.py does: the epoch it saw goes in its next report
            epoch = 0
            for _ in range(3):
                _, _, epoch = await catalog.poll(report(name, 0, epoch), 5.0)

        loops = [asyncio.ensure_future(replica(n)) for n in ("r1", "r2")]
        await asyncio.sleep(0.01)
        reports = await asyncio.wait_for(catalog.fresh(5.0), 1.0)  # not after the 5 s of a poll
        assert [r.epoch for r in reports] == [1, 1]
        for loop in loops:
            loop.cancel()

    asyncio.run(run())


def test_catalog_forgets_a_replica_not_heard_from():
    async def run():
        catalog = Catalog(stale_s=0.05)
        await catalog.poll(report("r1", 0), 0)
        await asyncio.sleep(0.1)
        assert catalog.live() == [] and await catalog.wait_applied(0, 0.01) == []
        dead = {"SERVE_REPLICA::app#d#r2"}  # a late replica whose actor is gone is forgotten before stale_s
        catalog = Catalog(stale_s=60, overdue_s=0.02, gone=lambda name: name in dead)
        await catalog.poll(report("r1", 0), 0)
        await catalog.poll(report("r2", 0), 0)
        await asyncio.sleep(0.05)
        assert [r.replica for r in catalog.live()] == ["r1"]

    asyncio.run(run())


def streaming_app() -> FastAPI:
    app = FastAPI()
    seen = {}

    @app.post("/echo")
    async def echo(http: HTTPRequest):
        body = await http.body()

        async def pieces():
            try:
                for i in range(1000):
                    yield f"{body.decode()}{i};"
                    await asyncio.sleep(0.001 if i < 3 else 1.0)
            finally:
                seen["stopped"] = True

        return StreamingResponse(pieces(), media_type="text/event-stream", headers={"x-a": "1"})

    app.state.seen = seen
    return app


def test_exchange_streams_an_apps_answer_and_stops_it_when_the_caller_leaves():
    app = streaming_app()

    async def run():
        stream = exchange(app, "POST", "/echo", [("content-type", "text/plain")], b"p")
        head = await anext(stream)
        assert head["status"] == 200 and ("x-a", "1") in head["headers"]
        got = b""
        while got.count(b";") < 3:
            got += await anext(stream)
        assert got.startswith(b"p0;p1;p2;")
        await stream.aclose()  # the caller went away: the app sees the disconnect and stops
        await asyncio.sleep(0.05)
        assert app.state.seen.get("stopped")
        pieces = [p async for p in exchange(app, "GET", "/nowhere", [])]
        assert pieces[0]["status"] == 404 and b"not found" in pieces[1].lower()

    asyncio.run(run())


def test_metrics_take_the_longest_step_across_replicas_not_the_sum():
    def engine_page(seconds: float, most: float) -> str:  # as serve/api.py's /metrics
        return render(
            [
                ("loraflow_decode_step_seconds_total", "counter", "", seconds),
                ("loraflow_decode_step_seconds_max", "gauge", "", most),
            ]
        )

    page = render(merge({"r1": engine_page(3.0, 0.25), "r2": engine_page(1.0, 0.5)}))
    assert samples(page, "loraflow_decode_step_seconds_total")[""] == 4.0
    assert samples(page, "loraflow_decode_step_seconds_max") == {'replica="r1"': 0.25, 'replica="r2"': 0.5, "": 0.5}


def test_ray_flag_without_ray_installed_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: importing it fails
    with pytest.raises(SystemExit) as e:
        main(["serve", "--ray", "--random-weights", "tiny"])
    assert "install it with pip install 'loraflow[ray]'" in str(e.value.code)


def test_ray_address_needs_ray_and_ray_refuses_tensor_parallel(capsys):
    for args, message in (
        (["--ray-address", "auto"], "--ray-address needs --ray"),
        (["--ray", "--tensor-parallel", "2"], "drop --tensor-parallel"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--random-weights", "tiny", *args])
        assert e.value.code == 2 and message in capsys.readouterr().err
