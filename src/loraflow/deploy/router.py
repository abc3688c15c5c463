"""The router: the deployment behind Ray Serve's HTTP proxy, with the OpenAI routes in front.

It reads each request's ``model`` field and passes the request on to a replica through
Serve's handle with that name as the multiplexed model id (none for the base model), so
that Serve sends it to a replica that holds the adapter. The replica answers with its own
app (``replica.py``); the router passes the answer on as it comes.

Failure: a replica that dies before it has sent anything of an answer (for a stream: before
its first piece) is replaced by Serve, and the request goes once to another replica; if
that one fails too, the answer is 503 with Retry-After. A stream that breaks after its first
piece ends with an error event (``server_error``), as the single server's streams do, and
``data: [DONE]``. No request is left without an answer.

Runtime loads and unloads are made on one replica, then reach the others through the
catalog (``catalog.py``) before the router answers. ``/metrics`` shows every replica's
series and their sum (``metrics.py``); ``/health`` answers 503 while no replica runs."""

from __future__ import annotations

import json
import logging
from collections import Counter

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray.exceptions import RayActorError

from loraflow.deploy.asgi import exchange
from loraflow.deploy.config import DeployConfig
from loraflow.deploy.metrics import merge, render
from loraflow.serve.errors import APIError, envelope, install_handlers
from loraflow.serve.guard import Guard

log = logging.getLogger("loraflow.deploy")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "authorization"}


def stopped(e: BaseException) -> bool:
    """Whether ``e`` says the replica went away (died, killed, unreachable), not that it failed."""
    return isinstance(e, RayActorError) or isinstance(getattr(e, "cause", None), RayActorError)


def _headers(pairs) -> list[tuple[str, str]]:
    return [(k, v) for k, v in pairs if k.lower() not in HOP_BY_HOP]


class Replicas:
    """The engine replicas behind Serve's handle, and what the router counted of them."""

    def __init__(self, handle):
        self.handle = handle
        self.stats = Counter(requests=0, retries=0, replica_failures=0, failed=0, broken_streams=0)

    async def relay(self, http: HTTPRequest, body: bytes, adapter: str) -> Response:
        """The replica's answer to ``http`` (``adapter``: the multiplexed id; "" for none)."""
        args = (http.method, http.url.path, http.url.query, _headers(http.headers.items()), body)
        self.stats["requests"] += 1
        for attempt in (1, 2):
            call = self.handle.options(stream=True, multiplexed_model_id=adapter).forward.remote(*args)
            try:
                head = await call.__anext__()
                stream = any(k.lower() == "content-type" and "text/event-stream" in v for k, v in head["headers"])
                if stream:  # held until the first piece: until then a retry loses nothing
                    first = await anext(call, None)
                    got = [first] if first is not None else []
                else:
                    got = [piece async for piece in call]
                break
            except Exception as e:
                call.cancel()
                if not stopped(e):
                    raise
                self.stats["replica_failures"] += 1
                log.warning("%s %s: the replica stopped (%s), attempt %d", http.method, http.url.path, e, attempt)
                if attempt == 2:
                    self.stats["failed"] += 1
                    raise APIError(
                        503,
                        f"the replica serving this request stopped ({type(e).__name__}); retry",
                        "server_error",
                        headers={"Retry-After": "1"},
                    ) from e
                self.stats["retries"] += 1
        headers = dict(_headers(head["headers"]))
        if not stream:
            return Response(b"".join(got), status_code=head["status"], headers=headers)
        return StreamingResponse(self._rest(call, got), status_code=head["status"], headers=headers)

    async def _rest(self, call, got: list[bytes]):
        finished = False
        try:
            for piece in got:
                yield piece
            async for piece in call:
                yield piece
            finished = True
        except Exception as e:
            if not stopped(e):
                log.exception("a stream from a replica failed")
            self.stats["broken_streams"] += 1
            message = f"the replica serving this request stopped ({type(e).__name__}); retry"
            yield f"data: {json.dumps(envelope(message, 'server_error'))}\n\n".encode()
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:  # the client went away: the replica stops generating
                call.cancel()

    async def admin(self, path: str, headers: list, body: bytes):
        try:
            return await self.handle.admin.remote(path, headers, body)
        except Exception as e:
            if not stopped(e):
                raise
            raise APIError(
                503,
                f"the replica making this change stopped ({type(e).__name__}) before it answered; retry",
                "server_error",
                headers={"Retry-After": "1"},
            ) from e


def _model(body: bytes) -> str | None:
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):
        return None
    model = fields.get("model") if isinstance(fields, dict) else None
    return model if isinstance(model, str) else None


def router_app(config: DeployConfig, replicas: Replicas, catalog) -> FastAPI:
    app = FastAPI(title="loraflow on Ray Serve", version="0.1.0")
    app.add_middleware(
        Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes, body_timeout=config.body_timeout
    )
    install_handlers(app)
    known: dict[str, str] = {}

    async def base_model() -> str | None:
        if "base" not in known:
            name = (await catalog.describe.remote())["base_model"]
            if name is None:
                return None
            known["base"] = name
        return known["base"]

    @app.get("/health")
    async def health():
        try:
            n = len((await catalog.describe.remote())["replicas"])
        except Exception as e:  # the catalog's own replica is being replaced
            log.warning("/health: the catalog did not answer (%s)", e)
            n = 0
        if not n:
            return JSONResponse({"status": "down", "reason": "no replica is running; retry shortly"}, status_code=503)
        return {"status": "ok", "replicas": n}

    @app.get("/metrics")
    async def metrics():
        live = await catalog.fresh.remote(config.stale_s)  # one that does not answer by then counts as gone
        s = replicas.stats
        lines = merge({r.replica: r.metrics for r in live}) + [
            ("loraflow_replicas_live", "gauge", "", len(live)),
            ("loraflow_router_requests_total", "counter", "", s["requests"]),
            ("loraflow_router_retries_total", "counter", "", s["retries"]),
            ("loraflow_router_replica_failures_total", "counter", "", s["replica_failures"]),
            ("loraflow_router_failed_requests_total", "counter", "", s["failed"]),
            ("loraflow_router_broken_streams_total", "counter", "", s["broken_streams"]),
        ]
        return PlainTextResponse(render(lines), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(http: HTTPRequest):
        return await replicas.relay(http, b"", "")

    async def generate(http: HTTPRequest):
        body = await http.body()
        model = _model(body)
        adapter = "" if model is None or model == await base_model() else model
        return await replicas.relay(http, body, adapter)

    app.post("/v1/completions")(generate)
    app.post("/v1/chat/completions")(generate)

    async def change(http: HTTPRequest):
        """Made on one replica (its checks and answer), then on every other before the answer."""
        body = await http.body()
        head, answer, folder, origin = await replicas.admin(http.url.path, _headers(http.headers.items()), body)
        if head["status"] == 200:
            name = json.loads(body)["lora_name"]
            version = await catalog.change.remote(name, folder, origin)
            pending = await catalog.wait_applied.remote(version, config.sync_timeout_s)
            if pending:
                what = "added" if folder else "removed"
                return PlainTextResponse(
                    f"Accepted: LoRA adapter '{name}' {what}; replicas {', '.join(pending)} have not applied it "
                    f"within {config.sync_timeout_s:g} s (running requests with it, or slow) and will",
                    status_code=202,
                )
        return Response(answer, status_code=head["status"], headers=dict(_headers(head["headers"])))

    app.post("/v1/load_lora_adapter")(change)
    app.post("/v1/unload_lora_adapter")(change)
    return app


class Router:
    """The Serve deployment: each HTTP request from Serve's proxy runs through ``router_app``."""

    def __init__(self, config: DeployConfig, replicas, catalog):
        self.replicas = Replicas(replicas)
        self.app = router_app(config, self.replicas, catalog)

    async def __call__(self, request):
        body = await request.body()
        headers = list(request.headers.items())
        stream = exchange(self.app, request.method, request.url.path, headers, body, request.url.query)
        head = await anext(stream)
        return StreamingResponse(stream, status_code=head["status"], headers=dict(head["headers"]))
