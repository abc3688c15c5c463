"""One HTTP request through an ASGI app in this process, its answer as plain values that can
cross a process boundary: the server's own FastAPI apps run unchanged inside Ray Serve's
deployments, and Serve carries the request and the answer's pieces between them.

    stream = exchange(app, "POST", "/v1/completions", headers, body)
    head = await anext(stream)       # {"status": 200, "headers": [("content-type", ...), ...]}
    async for piece in stream: ...   # bytes: everything the app sent since the last piece

The app sees a client that has sent its whole body and stays connected until the caller
stops reading (closes the stream, or is cancelled): then the app's next ``receive`` is the
disconnect, as from a client that went away, and it stops its work (``serve/api.py`` aborts
the generation)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

log = logging.getLogger("loraflow.deploy")
SETTLE_S = 5.0  # how long an app may take to end after its client went away, before it is cancelled


def head_of(message: dict) -> dict:
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
    return {"status": message["status"], "headers": headers}


async def exchange(
    app, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"", query: str = ""
) -> AsyncIterator[dict | bytes]:
    """The answer's head (status and headers), then its body in pieces: each piece joins what
    the app sent since the last one (one piece per engine step, not one per token)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }
    inbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait({"type": "http.request", "body": body, "more_body": False})
    outbox: asyncio.Queue = asyncio.Queue()

    async def send(message: dict) -> None:
        outbox.put_nowait(message)

    task = asyncio.ensure_future(app(scope, inbox.get, send))
    started = finished = False
    try:
        while not finished:
            if outbox.empty():
                getter = asyncio.ensure_future(outbox.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    if outbox.empty():  # the app returned without finishing its answer
                        break
                    continue
                messages = [getter.result()]
            else:
                messages = []
            while not outbox.empty():
                messages.append(outbox.get_nowait())
            pieces = []
            for m in messages:
                if m["type"] == "http.response.start":
                    started = True
                    yield head_of(m)
                elif m["type"] == "http.response.body":
                    pieces.append(m.get("body", b""))
                    finished = not m.get("more_body", False)
            if pieces and any(pieces):
                yield b"".join(pieces)
        if not finished:
            error = task.exception() if task.done() and not task.cancelled() else None
            if not started:
                raise RuntimeError(f"the app answered nothing ({type(error).__name__ if error else 'no response'})")
            log.warning("%s %s: the app stopped mid-answer (%r)", method, path, error)
    finally:
        inbox.put_nowait({"type": "http.disconnect"})
        if not task.done():
            done, _ = await asyncio.wait({task}, timeout=SETTLE_S)
            if not done:
                task.cancel()
        elif not task.cancelled() and task.exception() is not None and finished:
            log.warning("%s %s: the app failed after its answer: %r", method, path, task.exception())
