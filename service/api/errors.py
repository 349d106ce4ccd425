"""Whole-request errors: the status of each code, the ``{"error": {"code", "message"}}`` envelope, the
exception handlers, and the OpenAPI description of every error response."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from crfiqa.service.api.schemas import ErrorResponse
from crfiqa.service.errors import CrfiqaError

#: HTTP status of each whole-request error code; per-image errors stay inside a 200 response.
STATUS = {
    "unauthorized": 401, "not_found": 404, "method_not_allowed": 405, "request_timeout": 408,
    "body_too_large": 413, "too_many_images": 422, "too_many_faces": 413, "unsupported_media_type": 415,
    "validation_error": 422, "rate_limited": 429, "internal_error": 500,
    "not_ready": 503, "inference_stalled": 503, "queue_full": 503, "overloaded": 503, "parser_unavailable": 503,
    "model_unavailable": 503,
}
#: Statuses that always carry ``Retry-After`` (seconds).
RETRY_STATUSES = frozenset({429, 503})
#: Codes answered before the body was read: the connection is closed so the rest is never read.
CLOSE_CODES = frozenset({"body_too_large", "request_timeout"})
DEFAULT_RETRY_AFTER_S = 1.0

DESCRIPTIONS = {
    401: "missing or invalid API key (`unauthorized`)",
    408: "request headers or body not received in time (`request_timeout`)",
    413: "body over the size limit (`body_too_large`) or more faces than the inference queue can ever hold "
         "(`too_many_faces`)",
    415: "content type is neither multipart/form-data nor application/json (`unsupported_media_type`)",
    422: "a field is invalid; the message names it (`validation_error`); more images than `maxItems` "
         "(`too_many_images`)",
    429: "this API key's rate limit is spent (`rate_limited`); retry after `Retry-After` seconds",
    503: "not ready yet (`not_ready`), inference stalled (`inference_stalled`), queue full (`queue_full`), "
         "too many requests in flight (`overloaded`), the JSON parsing process died on this body "
         "(`parser_unavailable`) or this deployment lacks the model this endpoint needs (`model_unavailable`); "
         "retry after `Retry-After` seconds",
}
EXAMPLE_CODE = {401: "unauthorized", 408: "request_timeout", 413: "body_too_large", 415: "unsupported_media_type",
                422: "validation_error", 429: "rate_limited", 503: "not_ready"}


class RequestError(CrfiqaError):
    """An error that fails the whole request; its ``code`` picks the status from ``STATUS``."""

    # ``code`` has a default so the error pickles (it is raised in the JSON-parsing worker process too).
    def __init__(self, message: str, code: str = "validation_error", retry_after_s: float | None = None) -> None:
        super().__init__(message, code)
        self.retry_after_s = retry_after_s


def error_response(code: str, message: str, retry_after_s: float | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON envelope with the code's status (and ``Retry-After`` where the status calls for one)."""
    status = STATUS.get(code, 500)
    out = dict(headers or {})
    if code in CLOSE_CODES:
        out["Connection"] = "close"
    if status in RETRY_STATUSES:
        out["Retry-After"] = str(max(1, math.ceil(retry_after_s or DEFAULT_RETRY_AFTER_S)))
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=out)


def describe(errors: Any) -> str:
    """One line naming each invalid field (pydantic/FastAPI error list)."""
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in ('body', 'query')) or 'body'}: "
                     f"{e.get('msg')}" for e in errors)


def install(app: FastAPI) -> None:
    """Register the handlers: typed errors, validation errors, Starlette's 404/405 (anything unexpected is
    answered by the ``Observe`` middleware, which knows the request id)."""

    def count(request: Request, code: str) -> None:
        service = getattr(request.app.state, "service", None)
        if service is not None:
            service.metrics.errors.labels(code).inc()

    @app.exception_handler(CrfiqaError)
    async def _typed(request: Request, exc: CrfiqaError) -> JSONResponse:
        count(request, exc.code)
        return error_response(exc.code, exc.message, getattr(exc, "retry_after_s", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        count(request, "validation_error")
        return error_response("validation_error", describe(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "validation_error")
        count(request, code)
        response = error_response(code, str(exc.detail), headers=dict(exc.headers or {}))
        response.status_code = exc.status_code
        return response


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses: the envelope, an example, ``Retry-After`` where sent."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "model": ErrorResponse, "description": DESCRIPTIONS[status],
            "content": {"application/json": {"example": {"error": {
                "code": EXAMPLE_CODE[status], "message": DESCRIPTIONS[status].split(" (")[0]}}}},
        }
        if status in RETRY_STATUSES:
            entry["headers"] = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                                                "schema": {"type": "integer", "minimum": 1}}}
        out[status] = entry
    return out
