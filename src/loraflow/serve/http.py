"""The HTTP server around the API: uvicorn's h11 protocol, with a deadline for each request's
headers. uvicorn closes a connection that idles between requests (``timeout_keep_alive``)
but waits forever for the rest of a request line and headers once some bytes have come (or
for the first bytes after connecting), so a client could hold connections open at no cost.
Here a request's headers must be complete within ``header_timeout`` seconds of the
connection opening or the previous response ending; else the server answers 408 and closes.
A request h11 cannot parse, or whose headers exceed ``MAX_HEADER_BYTES``, answers 400 in the
API's error envelope, not uvicorn's plain text.
The body's own deadline is the Guard middleware's (``serve/guard.py``).

Every close is a lingering one (``LingeringClose``): a server that closes a socket while the
client's bytes still arrive makes the kernel answer them with a reset, and a reset can reach
the client before it has read the response (a 408 or 413 sent while the body still drips):
the client sees "connection reset" instead of the answer."""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from loraflow.serve.errors import envelope

HEADER_TIMEOUT = 10.0  # seconds for a request line and its headers
KEEP_ALIVE = 5.0  # seconds an idle connection stays open between requests (uvicorn's default)
MAX_HEADER_BYTES = 16 * 1024  # a request line and headers larger than this answer 400 (h11's default)
LINGER_S = 2.0  # after a response that closes the connection, how long its incoming bytes are read and dropped


class LingeringClose:
    """A connection's transport whose ``close()`` sends what is queued and a FIN (half-close),
    then reads and drops what the client still sends, and closes when the client closes its
    side or after ``LINGER_S``."""

    def __init__(self, transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop = transport, loop
        self.lingering = False

    def close(self) -> None:
        t = self._transport
        if self.lingering or t.is_closing():
            return
        if not t.can_write_eof():
            t.close()
            return
        self.lingering = True
        t.write_eof()
        self._loop.call_later(LINGER_S, t.close)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def abort(self) -> None:
        self._transport.abort()

    def __getattr__(self, name):  # everything else is the transport's own
        return getattr(self._transport, name)


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol; a request whose headers are not complete within ``header_timeout`` s gets 408."""

    header_timeout: float = HEADER_TIMEOUT
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(LingeringClose(transport, self.loop))
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:  # the response is sent and the connection closing: dropped
            return
        super().data_received(data)

    def eof_received(self) -> None:
        if self.transport.lingering:  # the client has closed its side too: no reset can follow
            self.transport._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in (or the client is gone)
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # before uvicorn reads a pipelined request, which disarms it again
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self._refuse(408, f"the request headers did not arrive within {self.header_timeout:g} s (--header-timeout)")

    def send_400_response(self, msg: str) -> None:
        """What h11 cannot parse, headers over ``MAX_HEADER_BYTES`` included: 400 in the envelope
        (uvicorn's own is plain text)."""
        self._refuse(
            400,
            f"the request is not valid HTTP/1.1, or its line and headers exceed {MAX_HEADER_BYTES // 1024} KiB: "
            "fix the request",
        )

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with ``message`` in the envelope, written as it is (outside h11's
        state machine: no request may have been parsed), and close the connection."""
        self._disarm()
        body = json.dumps(envelope(message)).encode()
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()


def server_config(
    app,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    header_timeout: float = HEADER_TIMEOUT,
    keep_alive: float = KEEP_ALIVE,
    log_level: str = "warning",
) -> uvicorn.Config:
    """uvicorn's Config for ``app`` with the header deadline, the keep-alive time and the header size limit."""
    protocol = type("HeaderDeadlineH11", (HeaderDeadline,), {"header_timeout": header_timeout})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        timeout_keep_alive=keep_alive,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        log_level=log_level,
    )
