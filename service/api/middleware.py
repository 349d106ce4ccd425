"""ASGI middlewares: request id + access log + request metrics, the in-flight limit, the body limit."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from starlette.requests import ClientDisconnect

from crfiqa.service.api.errors import RequestError, error_response
from crfiqa.service.api.logs import request_id

log = logging.getLogger("crfiqa.api")
ENDPOINTS = frozenset({"/v1/quality", "/v1/best", "/v1/models", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"})
#: Probes and scrapes: logged at debug, never refused by the in-flight limit.
QUIET = frozenset({"/healthz", "/readyz", "/metrics"})

Scope = dict[str, Any]


def _service(scope: Scope) -> Any:
    app = scope.get("app")
    return getattr(app.state, "service", None) if app is not None else None


async def _refuse(scope: Scope, receive: Any, send: Any, code: str, message: str) -> None:
    """Answer with the error envelope in the app's place (it did not run, or failed before answering),
    counted in ``crfiqa_errors_total`` like the errors the app's handlers answer."""
    service = _service(scope)
    if service is not None:
        service.metrics.errors.labels(code).inc()
    await error_response(code, message)(scope, receive, send)


class BodyLimit:
    """Refuse bodies over ``max_bytes`` (at once by Content-Length, else while streaming, so the read stops
    there), and bodies that take longer than ``timeout_s`` to arrive or, after ``grace_s``, arrive slower
    than ``min_rate`` bytes/s on average (408): a trickling upload would otherwise hold an in-flight slot
    for the whole ``timeout_s`` (Apache's mod_reqtimeout ``MinRate`` rule: each ``min_rate`` bytes received
    buy one more second)."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float, min_rate: int = 0, grace_s: float = 5.0) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.min_rate, self.grace_s = min_rate, grace_s

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _refuse(scope, receive, send, "body_too_large", f"body over the limit of {self.max_bytes} bytes")
        seen, complete = 0, False
        start: float | None = None

        async def limited() -> dict:
            nonlocal seen, complete, start
            if complete:  # the body is in: later receives only wait for a disconnect, without a deadline
                return await receive()
            if start is None:  # the clocks start when the app reads, not when the request came (it may wait first)
                start = time.monotonic()
            deadline, why = start + self.timeout_s, f"request body not received within {self.timeout_s:g} s"
            if self.min_rate and start + self.grace_s + seen / self.min_rate < deadline:
                deadline = start + self.grace_s + seen / self.min_rate
                why = f"request body arriving slower than {self.min_rate} bytes/s"
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RequestError(why, code="request_timeout") from None
            seen += len(message.get("body", b""))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if seen > self.max_bytes:
                raise RequestError(f"body over the limit of {self.max_bytes} bytes", code="body_too_large")
            return message

        await self.app(scope, limited, send)


class InFlightLimit:
    """At most ``limit`` requests in flight (probes excepted); more are answered 503 + Retry-After at once."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit, self.in_flight = app, limit, 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in QUIET:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            return await _refuse(scope, receive, send, "overloaded",
                                 f"{self.in_flight} requests in flight; the limit is {self.limit}")
        self.in_flight += 1
        service = _service(scope)
        if service is not None:
            service.metrics.in_flight.set(self.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if service is not None:
                service.metrics.in_flight.set(self.in_flight)


class Observe:
    """Request id (X-Request-ID in and out), access log and request metrics for every HTTP request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
        token = request_id.set(rid)
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # Gone mid-upload: nobody to answer and nothing wrong here (nginx logs this as 499).
            status["code"] = 499
        except Exception:
            # Answered here, not by a handler of Starlette's ServerErrorMiddleware: that one runs outside this
            # middleware, after the request id is reset and without the X-Request-ID header.
            log.exception("unexpected error")
            if status.get("started"):
                raise  # the response is under way: nothing can be answered, the server drops the connection
            await _refuse(scope, receive, send_with_id, "internal_error", "internal error (logged with this request's id)")
        finally:
            elapsed = time.perf_counter() - t0
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else "other"
            service = _service(scope)
            if service is not None:
                service.metrics.requests.labels(endpoint, str(status["code"])).inc()
                service.metrics.request_duration.labels(endpoint).observe(elapsed)
            log.log(logging.DEBUG if path in QUIET else logging.INFO, "request",
                    extra={"method": scope.get("method"), "path": path, "status": status["code"],
                           "duration_ms": round(1000 * elapsed, 2)})
            request_id.reset(token)
