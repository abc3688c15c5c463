"""What every HTTP request passes before a route sees it: the API key, and a body of bounded
size that arrives in bounded time. A plain ASGI middleware (no BaseHTTPMiddleware), so a
route can still await the client's disconnect after reading the body.

    401  the key is missing or wrong (compared in constant time; /health needs none)
    413  the body is larger than ``max_body_bytes`` (by its Content-Length, or as it arrives)
    408  the body is not complete ``body_timeout`` seconds after the headers (however it trickles)

(The headers' own deadline is the HTTP protocol's: ``serve/http.py``.)
"""

from __future__ import annotations

import asyncio
import hmac
import json

from loraflow.serve.errors import envelope


async def _answer(send, status: int, message: str, type_: str, code: str | None = None) -> None:
    body = json.dumps(envelope(message, type_, code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, api_key: str | None = None, max_body_bytes: int = 4 * 2**20, body_timeout: float = 30.0):
        self.app, self.max_body_bytes, self.body_timeout = app, max_body_bytes, body_timeout
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] != "/health":
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.key):
                return await _answer(
                    send, 401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error"
                )
        limit = self.max_body_bytes
        too_large = (
            f"the request body is larger than this server's limit of {limit} bytes "
            "(--max-body-mb): send a shorter prompt"
        )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _answer(
                send,
                413 if length.isdigit() else 400,
                too_large if length.isdigit() else "invalid Content-Length",
                "invalid_request_error",
            )
        state = {"bytes": 0, "body_done": False, "answered": False}
        clock = asyncio.get_running_loop().time
        deadline = clock() + self.body_timeout  # the whole body, not each part: a byte every few s still ends

        async def refuse(status: int, message: str) -> dict:
            state["answered"] = True
            await _answer(send, status, message, "invalid_request_error")
            return {"type": "http.disconnect"}  # the route stops reading; its own answer is dropped

        async def guarded_receive():
            if state["body_done"] or state["answered"]:
                return await receive()  # after the body: the client's disconnect, when it comes
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - clock()))
            except TimeoutError:
                return await refuse(
                    408, f"the request body did not arrive within {self.body_timeout:g} s (--body-timeout)"
                )
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                if state["bytes"] > limit:
                    return await refuse(413, too_large)
                state["body_done"] = not message.get("more_body", False)
            return message

        async def guarded_send(message):
            if not state["answered"]:
                await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not state["answered"]:
                raise
