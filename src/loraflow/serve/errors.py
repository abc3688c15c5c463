"""Every error the HTTP API answers, in OpenAI's envelope ``{"error": {"message", "type",
"param", "code"}}``: the routes' own (``APIError``), FastAPI's and Starlette's (an unknown
route, a wrong method, a body that is not JSON, or not UTF-8, or nested too deeply), and
the server's own bugs, which answer 500 without the exception's text (it may hold server
paths; the traceback goes to the server's log)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ROUTES = (
    "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics, "
    "POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter"
)
# the longest piece of a client's input (a path, a method) an error message repeats
ECHO_LIMIT = 200


class APIError(Exception):
    """An error answer: its HTTP status, the message (what to change) and OpenAI's type, code and param."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        headers: dict | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers, self.param = (
            status,
            message,
            type_,
            code,
            headers,
            param,
        )


def envelope(message: str, type_: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(envelope(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def echo(text: str) -> str:
    """A piece of the client's own input as an error message repeats it: at most ``ECHO_LIMIT`` characters."""
    return text if len(text) <= ECHO_LIMIT else text[:ECHO_LIMIT] + "..."


_ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:[^\s'\":,()]+/)*([^\s'\":,()/]+)")


def scrub_paths(message: str, root: str | os.PathLike | None = None) -> str:
    """``message`` without this server's paths: those under ``root`` (the adapter folder)
    relative to it, any other absolute path cut to its last part."""
    if root is not None:
        for prefix in {str(Path(root)), str(Path(root).resolve())}:
            message = message.replace(prefix.rstrip(os.sep) + os.sep, "")
    return _ABSOLUTE.sub(lambda m: m.group(1), message)


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    first = e.errors()[0] if e.errors() else {}
    if first.get("type") == "json_invalid":
        position = first.get("loc", ("body", "?"))[-1]
        reason = (first.get("ctx") or {}).get("error", "malformed JSON")
        return f"the request body is not valid JSON (at character {position}: {reason}): send a JSON object", None
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"invalid request: {where or 'body'}: {first.get('msg', 'malformed body')}", where or None


def _http_message(request: HTTPRequest, e: StarletteHTTPException) -> str:
    where = f"{request.method} {echo(request.url.path)}"
    if e.status_code == 404:
        return f"there is no route {where} on this server: the routes are {ROUTES}"
    if e.status_code == 405:
        allowed = (e.headers or {}).get("Allow") or (e.headers or {}).get("allow") or "another method"
        return f"{where} is not allowed: use {allowed}"
    cause = e.__cause__
    if e.status_code == 400 and isinstance(cause, UnicodeDecodeError):
        return "the request body is not UTF-8 text: send JSON encoded as UTF-8"
    if e.status_code == 400 and isinstance(cause, RecursionError):
        return "the request body's JSON is nested too deeply: flatten it"
    return str(e.detail)


def install_handlers(app: FastAPI) -> None:
    """Answer every error raised in ``app`` in the envelope."""

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: HTTPRequest, e: RequestValidationError):
        message, param = _validation_message(e)
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: HTTPRequest, e: StarletteHTTPException):
        code = {404: "unknown_route", 405: "method_not_allowed"}.get(e.status_code)
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(APIError(e.status_code, _http_message(request, e), type_, code, e.headers))

    @app.exception_handler(RecursionError)
    async def _deep(request: HTTPRequest, e: RecursionError):
        return error_response(APIError(400, "the request is nested too deeply: flatten it"))

    @app.exception_handler(Exception)
    async def _bug(request: HTTPRequest, e: Exception):  # the server logs it with its traceback
        return error_response(
            APIError(
                500,
                f"internal error ({type(e).__name__}): the server's log has the details; please report it",
                "server_error",
            )
        )
