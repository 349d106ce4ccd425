"""The Observe middleware on a small ASGI app whose route raises: an unexpected exception is answered with
the error envelope and the request's X-Request-ID, and logged with that id (the service's own routes raise
nothing unexpected on any input the other tests send)."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from crfiqa.service.api.logs import JsonFormatter
from crfiqa.service.api.middleware import Observe


async def _boom(request: Request) -> Response:
    raise RuntimeError("a bug")


def test_unexpected_error_carries_the_request_id() -> None:
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("crfiqa.api")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    # As in create_app: Observe inside Starlette's ServerErrorMiddleware, outside the exception middleware.
    app = Starlette(routes=[Route("/boom", _boom)], middleware=[Middleware(Observe)])

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.get("/boom", headers={"X-Request-ID": "abc123"})

    try:
        r = asyncio.run(call())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "abc123"
    assert r.json()["error"]["code"] == "internal_error"
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    unexpected = [x for x in records if x["msg"] == "unexpected error"]
    assert len(unexpected) == 1 and unexpected[0]["request_id"] == "abc123" and "a bug" in unexpected[0]["exc"]
    assert any(x["msg"] == "request" and x["status"] == 500 and x["request_id"] == "abc123" for x in records)


async def _ok(request: Request) -> Response:
    return Response("ok")


def test_request_id_comes_back_byte_for_byte() -> None:
    """A non-ASCII X-Request-ID (HTTP headers are latin-1) is echoed as sent, not re-encoded as UTF-8."""
    app = Starlette(routes=[Route("/ok", _ok)], middleware=[Middleware(Observe)])

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.get("/ok", headers={"X-Request-ID": "caf\xe9-1".encode("latin-1")})

    r = asyncio.run(call())
    assert r.status_code == 200 and dict(r.headers.raw)[b"x-request-id"] == "caf\xe9-1".encode("latin-1")


async def _late_reader(request: Request) -> Response:
    await asyncio.sleep(0.5)  # e.g. waiting for a worker thread before reading the body
    return Response(str(len(await request.body())))


def test_body_clocks_start_when_the_app_reads() -> None:
    """The grace and minimum rate count from the app's first read: an app that waits before reading does not
    turn a body that is already there (or an empty one) into a 408 (a RequestError raised through here)."""
    from crfiqa.service.api.middleware import BodyLimit

    app = Starlette(routes=[Route("/late", _late_reader, methods=["POST"])],
                    middleware=[Middleware(BodyLimit, max_bytes=1 << 20, timeout_s=5.0, min_rate=1 << 20, grace_s=0.2)])

    async def call(body: bytes) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.post("/late", content=body)

    for body in (b"", b"x" * 4096):
        r = asyncio.run(call(body))
        assert r.status_code == 200 and r.text == str(len(body)), r.text
