"""The OpenAI-compatible HTTP API (vLLM's conventions): the ``model`` field names an
adapter, or the base model.

    POST /v1/completions, /v1/chat/completions (``stream: true``: server-sent events)
    GET  /v1/models, /health, /metrics
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter (with --allow-runtime-lora)

Every error is a JSON body ``{"error": {"message", "type", "param", "code"}}``: 400 for a
request the server cannot run (the message names the field), 401 / 403 / 404 / 408 / 413,
503 + Retry-After when the queue is full or the engine failed, 504 past the request's time
limit, 500 for what is the server's own fault. Field rules: ``serve/protocol.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from loraflow.adapters.files import CONFIG_NAME, WEIGHTS_NAME
from loraflow.serve.errors import APIError, envelope, install_handlers, scrub_paths
from loraflow.serve.guard import Guard
from loraflow.serve.loop import EngineDown, EngineLoop
from loraflow.serve.protocol import (
    ChatBody,
    CompletionBody,
    LoadBody,
    Sampling,
    UnloadBody,
    chat_logprobs,
    completion_logprobs,
)
from loraflow.serve.registry import AdapterError, factors_for_bank
from loraflow.serve.request import ContextTooLong, PromptError, QueueFull
from loraflow.serve.sampling import SamplingParams

log = logging.getLogger("loraflow.serve")

# a failed request's error_type -> HTTP status and OpenAI error type
FAILURES = {
    "adapter": (400, "adapter_error"),
    "capacity": (503, "server_error"),
    "engine": (503, "server_error"),
    "timeout": (504, "timeout"),
    "request": (500, "server_error"),
}


async def _disconnected(http: HTTPRequest) -> None:
    """Return once the client has gone (the body is read: the next message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def create_app(
    loop: EngineLoop,
    api_key: str | None = None,
    adapter_dir: str | None = None,
    allow_runtime_lora: bool = False,
    *,
    max_body_bytes: int = 4 * 2**20,
    body_timeout: float = 30.0,
    max_prompt_tokens: int | None = None,
) -> FastAPI:
    engine = loop.engine
    app = FastAPI(title="loraflow", version="0.1.0")
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout=body_timeout)
    base = engine.model_name
    # adapter_requests: requests naming an adapter; resident: of those, the ones whose adapter was
    # already in host memory or on the device when they arrived (served without a read from disk)
    counters = {"requests": 0, "adapter_requests": 0, "resident": 0, "started": time.time()}

    install_handlers(app)

    @app.get("/health")
    async def health():
        if loop.down:
            return JSONResponse({"status": "down", "reason": scrub_paths(loop.down, adapter_dir)}, status_code=503)
        return {"status": "ok"}

    roots = {Path(adapter_dir), Path(adapter_dir).resolve()} if adapter_dir is not None else set()

    def _public(name: str, path: Path) -> str:
        """An adapter's folder as clients see it: relative to --adapter-dir, else only its name."""
        for root in roots:
            if Path(path).is_relative_to(root):
                return str(Path(path).relative_to(root))
        return name

    @app.get("/v1/models")
    async def models():
        now = int(counters["started"])
        data = [{"id": base, "object": "model", "created": now, "owned_by": "loraflow", "root": base, "parent": None}]
        data += [
            {
                "id": name,
                "object": "model",
                "created": now,
                "owned_by": "loraflow",
                "root": _public(name, path),
                "parent": base,
            }
            for name, path in sorted(engine.registry.paths.items())
        ]
        return {"object": "list", "data": data}

    def _runtime_lora() -> None:
        if not allow_runtime_lora or adapter_dir is None:
            raise APIError(
                403,
                "loading and unloading adapters at run time is off: start the server with "
                "--allow-runtime-lora and --adapter-dir",
                code="forbidden",
            )

    def _adapter_folder(lora_path: str) -> tuple[Path, str]:
        """The folder ``lora_path`` names (a relative path: under --adapter-dir) and how messages
        show it (relative to --adapter-dir), refused unless it and its files lie under that folder."""
        root = Path(adapter_dir).resolve()
        outside = APIError(
            403,
            "lora_path is outside the folder this server loads adapters from (--adapter-dir): "
            "give a path under it, or one relative to it",
            code="forbidden",
            param="lora_path",
        )
        try:
            path = (root / lora_path).resolve()
            if not path.is_relative_to(root):
                raise outside
            shown = str(path.relative_to(root))
            for name in (CONFIG_NAME, WEIGHTS_NAME):  # a file linked to somewhere outside the folder is refused
                if (path / name).exists() and not (path / name).resolve().is_relative_to(root):
                    raise APIError(
                        403, f"{shown}/{name} links outside --adapter-dir", code="forbidden", param="lora_path"
                    )
            if not (path / WEIGHTS_NAME).is_file():
                raise APIError(
                    400, f"{shown} is not a safetensors adapter folder (no {WEIGHTS_NAME})", param="lora_path"
                )
        except (OSError, RuntimeError) as e:  # a path the file system refuses (too long a part, a link loop)
            reason = getattr(e, "strerror", None) or type(e).__name__
            raise APIError(400, f"lora_path cannot be opened ({reason}): fix the path", param="lora_path") from e
        return path, shown

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadBody):
        _runtime_lora()
        if body.lora_name == base:
            raise APIError(400, f"{base!r} is the base model's name: choose another name for the adapter")
        path, shown = _adapter_folder(body.lora_path)
        try:  # refuse now, not at the first request; reading runs off the event loop
            await run_in_threadpool(factors_for_bank, path, engine.registry.shapes, engine.bank.r_max, body.lora_name)
            engine.registry.register(body.lora_name, path)
        except AdapterError as e:
            raise APIError(409 if "in use" in str(e) else 400, scrub_paths(str(e), adapter_dir)) from e
        except Exception as e:  # a file no reader understood: still the request's fault
            raise APIError(400, f"{shown} cannot be read as an adapter ({type(e).__name__})") from e
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadBody):
        _runtime_lora()
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
            ("loraflow_engine_failed_steps_total", "counter", engine.stats["failed_steps"]),
            ("loraflow_preemptions_total", "counter", engine.stats["preemptions"]),
            ("loraflow_adapter_requests_total", "counter", counters["adapter_requests"]),
            ("loraflow_adapter_requests_without_load_total", "counter", counters["resident"]),
            ("loraflow_adapter_hit_rate", "gauge", counters["resident"] / max(counters["adapter_requests"], 1)),
            ("loraflow_adapter_hits_total", "counter", reg["hits"]),
            ("loraflow_adapter_misses_total", "counter", reg["misses"]),
            ("loraflow_adapter_loads_total", "counter", reg["loads"]),
            ("loraflow_adapter_load_seconds_total", "counter", reg["load_seconds"]),
            ("loraflow_adapter_slot_writes_total", "counter", reg["slot_writes"]),
            ("loraflow_adapter_slot_write_seconds_total", "counter", reg["slot_write_seconds"]),
            ("loraflow_adapter_evictions_total", "counter", reg["evictions"]),
            ("loraflow_adapters_registered", "gauge", reg["registered"]),
            ("loraflow_adapters_on_device", "gauge", reg["device"]),
            ("loraflow_kv_blocks_used", "gauge", engine.kv.used_blocks),
            ("loraflow_kv_blocks_total", "gauge", engine.kv.n_blocks),
        ]
        for kind in ("graph", "decode", "prompt"):  # captured decode steps, eager ones, steps with prompt tokens
            lines += [
                (f"loraflow_{kind}_steps_total", "counter", engine.stats[f"{kind}_steps"]),
                (f"loraflow_{kind}_step_seconds_total", "counter", engine.stats[f"{kind}_step_seconds"]),
                (f"loraflow_{kind}_step_seconds_max", "gauge", engine.stats[f"{kind}_step_seconds_max"]),
            ]
        graphs = engine.graphs  # captures happen inside graph steps: a slow step may be one
        lines += [
            ("loraflow_graph_captures_total", "counter", graphs.captures if graphs else 0),
            ("loraflow_graph_capture_seconds_total", "counter", graphs.capture_seconds if graphs else 0.0),
        ]
        text = "".join(f"# TYPE {n} {t}\n{n} {v}\n" for n, t, v in lines)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def _adapter(model: str) -> str | None:
        if model == base:
            return None
        if not engine.registry.known(model):
            raise APIError(
                404,
                f"the model {model!r} does not exist: use {base!r} or one of the adapters in GET /v1/models",
                code="model_not_found",
                param="model",
            )
        return model

    async def _prompt_ids(prompt: str | list[int]) -> list[int]:
        """Token ids; a text is tokenized on a worker thread, so a long one does not stall the others."""
        try:
            ids = await run_in_threadpool(engine.tokenize, prompt) if isinstance(prompt, str) else list(prompt)
        except PromptError as e:
            raise APIError(400, str(e), param="prompt") from e
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens, above this server's limit of {max_prompt_tokens} "
                "(--max-prompt-tokens): shorten it",
                param="prompt",
            )
        return ids

    def _params(body: Sampling, n_prompt: int, chat: bool) -> SamplingParams:
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(
                400,
                f"unsupported parameter {unsupported[0]!r}: this server does not implement "
                f"{', '.join(unsupported)}; remove {'it' if len(unsupported) == 1 else 'them'} "
                "(the README lists the supported fields)",
                param=unsupported[0],
            )
        if chat:
            if body.top_logprobs is not None and not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            requested = body.max_completion_tokens or body.max_tokens
        else:
            if body.echo and body.logprobs is not None:
                raise APIError(
                    400,
                    "echo with logprobs would need the prompt's log-probabilities, which this "
                    "server does not compute: drop one of them",
                    param="echo",
                )
            logprobs, requested = body.logprobs, body.max_tokens
        try:  # not asked for: OpenAI's 16, as far as the context allows
            return SamplingParams(
                max_tokens=requested or max(1, min(16, engine.max_len - n_prompt)),
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=body.seed,
                stop=body.stop or [],
                ignore_eos=body.ignore_eos,
                frequency_penalty=body.frequency_penalty,
                presence_penalty=body.presence_penalty,
                repetition_penalty=body.repetition_penalty,
                logprobs=logprobs,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from e

    def _submit(ids: list[int], params: SamplingParams, adapter: str | None, rid: str, final_only: bool):
        resident = adapter is not None and engine.registry.resident(adapter)  # before the engine can load it
        try:
            req, queue = loop.submit(ids, params, adapter, request_id=rid, final_only=final_only)
        except ContextTooLong as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="max_tokens") from e
        except PromptError as e:
            raise APIError(400, str(e), code="invalid_prompt", param="prompt") from e
        except KeyError:  # unloaded between the check and the queue
            raise APIError(404, f"the model {adapter!r} does not exist", code="model_not_found") from None
        except QueueFull as e:
            raise APIError(
                503, f"the server is busy ({e}); retry shortly", "server_error", headers={"Retry-After": "1"}
            ) from e
        except EngineDown as e:
            raise APIError(
                503,
                f"the server is restarting ({scrub_paths(str(e), adapter_dir)})",
                "server_error",
                headers={"Retry-After": "10"},
            ) from e
        counters["requests"] += 1
        if adapter is not None:
            counters["adapter_requests"] += 1
            counters["resident"] += resident
        return req, queue

    def _log(rid: str, model: str, status, u=None, started: float = 0.0) -> None:
        ttft = f"{u.ttft:.3f}s" if u is not None and u.ttft is not None else "-"
        log.info(
            "%s model=%s prompt_tokens=%d output_tokens=%d ttft=%s total=%.3fs status=%s",
            rid,
            model,
            u.prompt_tokens if u else 0,
            u.completion_tokens if u else 0,
            ttft,
            time.perf_counter() - started,
            status,
        )

    def _failure(u) -> APIError:
        status, type_ = FAILURES.get(u.error_type, (500, "server_error"))
        message = scrub_paths(u.error, adapter_dir) if u.error else "generation failed"
        return APIError(status, message, type_, headers={"Retry-After": "1"} if status == 503 else None)

    async def _respond(prompt, body: Sampling, http: HTTPRequest, chat: bool, echo: bool = False):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        started = time.perf_counter()
        try:
            adapter = _adapter(body.model)
            ids = await _prompt_ids(prompt)
            params = _params(body, len(ids), chat)
            req, queue = _submit(ids, params, adapter, rid, final_only=not body.stream)
        except APIError as e:
            _log(rid, body.model, e.status, started=started)
            raise
        echo = (prompt if isinstance(prompt, str) else engine.tokenizer.decode(ids)) if echo else ""
        if not body.stream:
            return await _answer(req, queue, body, http, chat, rid, echo, started)
        return StreamingResponse(_events(req, queue, body, chat, rid, echo, started), media_type="text/event-stream")

    def _piece(token: int) -> str:
        return engine.tokenizer.decode([token])

    def _logprobs(u, chat: bool, start: int = 0, offset: int = 0):
        records = u.logprobs[start : u.completion_tokens]
        return chat_logprobs(records, _piece) if chat else completion_logprobs(records, _piece, offset)

    async def _answer(req, queue, body, http, chat, rid, echo, started):
        gone = asyncio.ensure_future(_disconnected(http))
        result = asyncio.ensure_future(queue.get())  # final_only: the one update is the last
        try:
            await asyncio.wait({gone, result}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not result.done():  # the client left: stop generating for nobody
                result.cancel()
                loop.abort(req.id)
                _log(rid, body.model, "client-gone", started=started)
        if result.cancelled():  # nobody to answer: an empty response that goes nowhere
            return Response(status_code=499)
        u = result.result()
        if u.finish_reason == "error":
            e = _failure(u)
            _log(rid, body.model, e.status, u, started)
            raise e
        want = body.logprobs is not None and body.logprobs is not False
        lp = _logprobs(u, chat, offset=len(echo)) if want else None
        choice = (
            {
                "index": 0,
                "message": {"role": "assistant", "content": u.text},
                "logprobs": lp,
                "finish_reason": u.finish_reason,
            }
            if chat
            else {"index": 0, "text": echo + u.text, "logprobs": lp, "finish_reason": u.finish_reason}
        )
        _log(rid, body.model, 200, u, started)
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [choice],
            "usage": _usage(u),
        }

    async def _events(req, queue, body, chat, rid, echo, started):
        created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        want = body.logprobs is not None and body.logprobs is not False

        def chunk(choice: dict, usage=None) -> str:
            out = {
                "id": rid,
                "object": kind,
                "created": created,
                "model": body.model,
                "choices": [choice] if choice else [],
            }
            if usage is not None:
                out["usage"] = usage
            return f"data: {json.dumps(out)}\n\n"

        sent = sent_lp = 0
        status, u = "client-gone", None
        try:
            if chat:
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            elif echo:
                yield chunk({"index": 0, "text": echo, "logprobs": None, "finish_reason": None})
            while True:
                u = await queue.get()
                while not queue.empty():  # behind the engine: its latest snapshot holds all the text so far
                    u = queue.get_nowait()
                if u.finish_reason == "error":
                    e = _failure(u)
                    status = e.status
                    yield f"data: {json.dumps(envelope(e.message, e.type))}\n\n"
                    break
                if len(u.text) > sent or u.finished:
                    reason = u.finish_reason if u.finished else None
                    lp = _logprobs(u, chat, sent_lp, len(echo) + sent) if want else None
                    yield chunk(
                        {"index": 0, "delta": {"content": u.text[sent:]}, "logprobs": lp, "finish_reason": reason}
                        if chat
                        else {"index": 0, "text": u.text[sent:], "logprobs": lp, "finish_reason": reason}
                    )
                    sent, sent_lp = len(u.text), u.completion_tokens
                if u.finished:
                    if include_usage:
                        yield chunk({}, _usage(u))
                    status = 200
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away: free its KV blocks and slot
            if not req.finished:
                loop.abort(req.id)
            _log(rid, body.model, status, u, started)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request is supported: send a string", param="prompt")
            prompt = prompt[0]
        return await _respond(prompt, body, http, chat=False, echo=body.echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        template = engine.tokenizer.apply_chat_template
        try:  # the template runs off the event loop too
            prompt = await run_in_threadpool(template, body.messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # the template's own errors (roles, missing content, ...)
            raise APIError(400, f"messages do not fit the model's chat template: {e}", param="messages") from e
        return await _respond(prompt, body, http, chat=True)

    return app


def _usage(u) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }
