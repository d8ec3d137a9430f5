"""What stands in front of the routes: the API key and the body size limit (an ASGI
middleware, so that neither needs the body parsed), and the mapping of every error to
OpenAI's `{"error": {...}}` body with its status."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from onepass.server.protocol import ApiError, param_name


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"no route {request.method} {request.url.path}"
        return error_response(ApiError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises the exception after this response: the server logs the traceback
        return error_response(ApiError(500, "internal server error (see the server log)"))


def validation_error(errors: Any) -> ApiError:
    """pydantic's errors as one OpenAI error: an unknown key is an unsupported option (400),
    anything else malformed JSON or a wrong type (422)."""
    errors = list(errors)
    for e in errors:
        if e["type"] == "extra_forbidden":
            name = param_name(tuple(e["loc"]))
            return ApiError(400, f"'{name}' is not a supported option", param=name)
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid body"}
    if first["type"] == "json_invalid":
        return ApiError(422, "the request body is not valid JSON")
    name = param_name(tuple(first["loc"]))
    if not name:
        return ApiError(422, "the request body must be a JSON object")
    return ApiError(422, f"{name}: {first['msg']}", param=name)


class RequestGuard:
    """ASGI middleware in front of everything: the API key on /v1/* (before the body is even
    read) and the body size limit (Content-Length, or counted while reading a chunked body)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith("/v1") and not self._authorized(headers):
            error = ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)")
            error.headers = {"WWW-Authenticate": "Bearer"}
            await error_response(error)(scope, receive, send)
            return
        length = headers.get("content-length", b"0")
        if not length.isdigit():
            await error_response(ApiError(400, "bad Content-Length"))(scope, receive, send)
            return
        if int(length) > self.max_body:
            await error_response(self._too_large())(scope, receive, send)
            return
        body, more = [], True
        size = 0
        while more:  # read the body here, so a chunked one is cut at the limit too
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                await error_response(self._too_large())(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": b"".join(body), "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        given = headers.get("authorization", b"")
        expected = f"Bearer {self.api_key}".encode()
        return hmac.compare_digest(given, expected)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than {self.max_body} bytes")
