"""The OpenAI-compatible HTTP API (vLLM's conventions): the ``model`` field names an
adapter, or the base model.

    POST /v1/completions, /v1/chat/completions (``stream: true``: server-sent events)
    GET  /v1/models, /health, /metrics
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from loraflow.serve.engine import QueueFull
from loraflow.serve.loop import EngineLoop
from loraflow.serve.registry import AdapterError, factors_for_bank
from loraflow.serve.sampling import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False          # vLLM's extension: generate max_tokens tokens


class CompletionBody(Sampling):
    prompt: str | list[str] | list[int]


class ChatBody(Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)


class LoadBody(BaseModel):
    lora_name: str
    lora_path: str


class UnloadBody(BaseModel):
    lora_name: str


def _error(e: APIError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}},
                        status_code=e.status, headers=e.headers)


def create_app(loop: EngineLoop, api_key: str | None = None, adapter_dir: str | None = None,
               allow_runtime_lora: bool = False) -> FastAPI:
    engine = loop.engine
    app = FastAPI(title="loraflow", version="0.1.0")
    base = engine.model_name
    counters = {"requests": 0, "started": time.time()}

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(APIError(400, f"invalid request: {where or 'body'}: {first.get('msg', 'malformed JSON')}"))

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error(APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                       "authentication_error"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        now = int(counters["started"])
        data = [{"id": base, "object": "model", "created": now, "owned_by": "loraflow", "root": base,
                 "parent": None}]
        data += [{"id": name, "object": "model", "created": now, "owned_by": "loraflow", "root": str(path),
                  "parent": base} for name, path in sorted(engine.registry.paths.items())]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadBody):
        if not allow_runtime_lora or adapter_dir is None:
            raise APIError(403, "loading adapters at run time is off: start the server with "
                                "--allow-runtime-lora and --adapter-dir", code="forbidden")
        path = Path(body.lora_path).resolve()
        if not path.is_relative_to(Path(adapter_dir).resolve()):
            raise APIError(403, f"{body.lora_path} is outside the allowed folder {adapter_dir}", code="forbidden")
        if not (path / "adapter_model.safetensors").is_file():
            raise APIError(400, f"{body.lora_path} is not a safetensors adapter folder")
        try:
            factors_for_bank(path, engine.registry.shapes, engine.bank.r_max)   # refuse now, not later
            engine.registry.register(body.lora_name, path)
        except AdapterError as e:
            raise APIError(400, str(e)) from e
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadBody):
        try:
            engine.registry.unregister(body.lora_name)
        except KeyError:
            raise APIError(404, f"adapter {body.lora_name!r} is not loaded", code="model_not_found") from None
        except AdapterError as e:
            raise APIError(409, str(e)) from e
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/metrics")
    async def metrics():
        reg = engine.registry.snapshot()
        up = max(time.time() - counters["started"], 1e-9)
        lines = [
            ("loraflow_requests_running", "gauge", len(engine.running)),
            ("loraflow_requests_waiting", "gauge", len(engine.waiting)),
            ("loraflow_requests_total", "counter", counters["requests"]),
            ("loraflow_prompt_tokens_total", "counter", engine.stats["prompt_tokens"]),
            ("loraflow_generation_tokens_total", "counter", engine.stats["generated_tokens"]),
            ("loraflow_generation_tokens_per_second", "gauge", engine.stats["generated_tokens"] / up),
            ("loraflow_adapter_hits_total", "counter", reg["hits"]),
            ("loraflow_adapter_misses_total", "counter", reg["misses"]),
            ("loraflow_adapter_loads_total", "counter", reg["loads"]),
            ("loraflow_adapter_evictions_total", "counter", reg["evictions"]),
            ("loraflow_adapters_registered", "gauge", reg["registered"]),
            ("loraflow_adapters_on_device", "gauge", reg["device"]),
            ("loraflow_kv_blocks_used", "gauge", engine.kv.used_blocks),
            ("loraflow_kv_blocks_total", "gauge", engine.kv.n_blocks),
        ]
        text = "".join(f"# TYPE {n} {t}\n{n} {v}\n" for n, t, v in lines)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def _adapter(model: str) -> str | None:
        if model == base:
            return None
        if not engine.registry.known(model):
            raise APIError(404, f"the model {model!r} does not exist: use {base!r} or one of the adapters "
                                "in GET /v1/models", code="model_not_found")
        return model

    def _params(body: Sampling) -> SamplingParams:
        try:
            return SamplingParams(max_tokens=body.max_completion_tokens or body.max_tokens or 16,
                                  temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                  seed=body.seed, stop=body.stop or [], ignore_eos=body.ignore_eos)
        except ValueError as e:
            raise APIError(400, str(e)) from e

    def _submit(prompt, body: Sampling):
        adapter = _adapter(body.model)
        try:
            req, queue = loop.submit(prompt, _params(body), adapter)
        except ValueError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from e
        except QueueFull as e:
            raise APIError(503, f"the server is busy ({e}); retry shortly", "server_error",
                           headers={"Retry-After": "1"}) from e
        counters["requests"] += 1
        return req, queue

    async def _respond(prompt, body: Sampling, http: HTTPRequest, chat: bool):
        req, queue = _submit(prompt, body)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage(u):
            return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                    "total_tokens": u.prompt_tokens + u.completion_tokens}

        if not body.stream:
            try:
                while True:
                    u = await queue.get()
                    if u.finished:
                        break
            finally:
                if not req.finished:
                    loop.abort(req.id)
            if u.finish_reason == "error":
                if u.error_type == "adapter":
                    raise APIError(400, u.error, "adapter_error")
                raise APIError(503 if u.error_type == "capacity" else 500, u.error or "generation failed",
                               "server_error")
            choice = ({"index": 0, "message": {"role": "assistant", "content": u.text},
                       "finish_reason": u.finish_reason} if chat else
                      {"index": 0, "text": u.text, "logprobs": None, "finish_reason": u.finish_reason})
            return {"id": rid, "object": kind, "created": created, "model": body.model, "choices": [choice],
                    "usage": usage(u)}

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(text, reason, u=None):
            delta = {"content": text} if chat else None
            c = ({"index": 0, "delta": delta, "finish_reason": reason} if chat else
                 {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
            out = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created,
                   "model": body.model, "choices": [c]}
            if u is not None:
                out["usage"] = usage(u)
            return f"data: {json.dumps(out)}\n\n"

        async def events():
            sent = 0
            try:
                if chat:
                    first = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]}
                    yield f"data: {json.dumps(first)}\n\n"
                while True:
                    u = await queue.get()
                    if u.finish_reason == "error":
                        err = {"error": {"message": u.error, "type": "server_error", "param": None, "code": None}}
                        yield f"data: {json.dumps(err)}\n\n"
                        break
                    if len(u.text) > sent or u.finished:
                        yield chunk(u.text[sent:], u.finish_reason if u.finished else None)
                        sent = len(u.text)
                    if u.finished:
                        if include_usage:
                            usage_chunk = {"id": rid, "object": kind + ".chunk" if chat else kind,
                                           "created": created, "model": body.model, "choices": [],
                                           "usage": usage(u)}
                            yield f"data: {json.dumps(usage_chunk)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:                          # the client went away: free its KV blocks and slot
                if not req.finished:
                    loop.abort(req.id)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request is supported: send a string")
            prompt = prompt[0]
        return await _respond(prompt, body, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        try:
            prompt = engine.tokenizer.apply_chat_template(body.messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:   # the template's own errors (roles, missing content, ...)
            raise APIError(400, f"messages do not fit the model's chat template: {e}") from e
        return await _respond(prompt, body, http, chat=True)

    return app
