"""One replica: the single-process server's engine, its loop and its HTTP app
(``serve/api.py``), run unchanged inside a Ray Serve deployment.

Requests arrive from the router (``forward``) with the adapter's name as Serve's multiplexed
model id; the replica runs them through its own app in-process (``asgi.exchange``) and
streams the answer back in pieces. ``@serve.multiplexed`` keeps an LRU of the adapters this
replica has taken on (``adapters_per_replica``): Serve reports it to its routers, which send
each adapter's requests to the replicas that hold it. Holding an adapter loads nothing by
itself: the engine's tiers (disk -> host memory -> device slots, ``serve/registry.py``) load
it at its first request, as in one process, and the multiplexing only keeps its requests
where it already is.

In the background the replica long-polls the catalog (``catalog.py``): it reports its
metrics and applies the adapters loaded or unloaded at run time through any replica."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

from ray import serve
from ray.runtime_context import get_runtime_context

from loraflow.deploy.asgi import exchange
from loraflow.deploy.catalog import Change, ReplicaReport
from loraflow.deploy.config import DeployConfig
from loraflow.deploy.metrics import RoutingCounts, render
from loraflow.serve.registry import AdapterError

log = logging.getLogger("loraflow.deploy")


class EngineReplica:
    async def __init__(self, config: DeployConfig, catalog):
        import torch

        from loraflow.serve.api import create_app
        from loraflow.serve.loop import EngineLoop
        from loraflow.serve.tp_launch import build_engine
        from loraflow.threads import configure_threads

        _log_requests(config.log_requests)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray shows a replica only its own GPUs
        configure_threads(config.replica_threads(), device)
        self.config, self.catalog = config, catalog
        self.engine = build_engine(config.engine_spec(device), device)
        self.loop = EngineLoop(self.engine)  # the engine on its own thread
        self.app = create_app(
            self.loop,
            adapter_dir=config.adapter_dir,
            allow_runtime_lora=config.allow_runtime_lora,
            max_body_bytes=config.max_body_bytes,
            body_timeout=config.body_timeout,
            max_prompt_tokens=config.max_prompt_tokens,
        )  # no API key: the router checked it
        self.id = serve.get_replica_context().replica_tag
        self.actor = get_runtime_context().get_actor_name() or ""
        self.counts = RoutingCounts()
        self.applied = 0  # the catalog version applied whole
        self.epoch = 0  # the catalog's refresh epoch last seen

        async def take_on(adapter: str) -> str:  # a miss of Serve's LRU: this replica now holds it
            self.counts.taken_on += 1
            return adapter

        self._hold = serve.multiplexed(max_num_models_per_replica=config.held_per_replica)(take_on)
        await self._sync(wait_s=0)  # the adapters loaded at run time so far, before the first request
        self._beat = asyncio.get_running_loop().create_task(self._heartbeat())

    async def forward(self, method: str, path: str, query: str, headers: list, body: bytes):
        """Run one request through this replica's app; yields the answer's head, then its pieces."""
        adapter = serve.get_multiplexed_model_id()
        if adapter and self.engine.registry.known(adapter):  # an unknown name takes no LRU place (the app 404s)
            self.counts.requests[adapter] += 1
            await self._hold(adapter)
        async for item in exchange(self.app, method, path, headers, body, query):
            yield item

    async def admin(self, path: str, headers: list, body: bytes) -> tuple[dict, bytes, str | None, str]:
        """A load or unload through this replica's own route (its checks, its registry): the
        answer's head and body, the adapter's folder as registered (None: unloaded or refused)
        and this replica's id, for the catalog to take the change to the others."""
        pieces = [item async for item in exchange(self.app, "POST", path, headers, body)]
        head, answer = pieces[0], b"".join(pieces[1:])
        folder = None
        if head["status"] == 200 and path.endswith("/load_lora_adapter"):
            folder = str(self.engine.registry.paths[json.loads(body)["lora_name"]])
        return head, answer, folder, self.id

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine gave up is replaced."""
        if self.loop is None or self.loop.down:
            raise RuntimeError(f"the engine stopped: {self.loop.down if self.loop else 'shut down'}")

    async def _metrics(self) -> str:
        pieces = [item async for item in exchange(self.app, "GET", "/metrics", [], b"")]
        page = b"".join(p for p in pieces[1:]).decode()
        return page + render(self.counts.lines() + [("loraflow_catalog_version", "gauge", "", self.applied)])

    async def _sync(self, wait_s: float) -> bool:
        """One heartbeat: report, receive the changes not applied yet, apply them. False when
        one has to wait (an adapter that running requests use cannot be unloaded yet)."""
        page = await self._metrics()
        report = ReplicaReport(self.id, self.actor, self.applied, page, self.engine.model_name, self.epoch)
        version, changes, self.epoch = await self.catalog.poll.remote(report, wait_s)
        for name, change in sorted(changes.items(), key=lambda kv: kv[1].version):
            if not self._apply(name, change):
                return False
            self.applied = change.version
        self.applied = version
        return True

    def _apply(self, name: str, change: Change) -> bool:
        registry = self.engine.registry
        if change.origin == self.id:  # this replica made the change itself
            return True
        try:
            if change.path is None:
                if registry.known(name):
                    registry.unregister(name)
            else:
                registry.register(name, Path(change.path))
        except (AdapterError, KeyError) as e:
            if registry.pins[name]:  # running requests use it: again at the next heartbeat
                return False
            log.warning("replica %s cannot apply %s -> %s: %s", self.id, name, change.path, e)
        return True

    async def _heartbeat(self) -> None:
        while True:
            try:
                done = await self._sync(self.config.heartbeat_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the catalog restarting, a network hiccup: try again
                log.warning("replica %s: heartbeat failed (%s: %s)", self.id, type(e).__name__, e)
                done = False
            if not done:
                await asyncio.sleep(self.config.heartbeat_s)

    def __del__(self):
        """Serve drains a stopping replica (no new requests, ``graceful_shutdown_timeout_s`` for
        those running), then calls this: what is still running answers 503 (retry)."""
        beat = getattr(self, "_beat", None)
        if beat is not None:
            beat.cancel()
            try:
                self.catalog.leave.remote(self.id)
            except Exception:  # Serve is shutting down as a whole
                pass
        if getattr(self, "loop", None) is not None:
            self.loop.close()
            self.loop = None


def _log_requests(on: bool) -> None:
    """One line per request to the replica's stderr (Ray shows it in the driver's and in the logs)."""
    logger = logging.getLogger("loraflow.serve")
    logger.setLevel(logging.INFO if on else logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
