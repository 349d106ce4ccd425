"""Dependencies of the routes: the app's Service, API-key authentication and the per-key rate limit."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from crfiqa.service.api.errors import RequestError
from crfiqa.service.api.service import Service

# auto_error=False: a missing key is our typed 401, not FastAPI's 403; both schemes appear in the OpenAPI.
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key")
bearer = HTTPBearer(auto_error=False, description="an API key as a bearer token")


async def get_service(request: Request) -> Service:
    """The app's Service."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def authenticate(request: Request, service: ServiceDep,
                 key: Annotated[str | None, Security(api_key_header)] = None,
                 token: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None) -> str | None:
    """Check the API key (when keys are configured) and spend a token of its rate limit; the key's id."""
    ident: str | None = None
    if service.keys.enabled:
        ident = service.keys.check(key if key is not None else (token.credentials if token else None))
        if ident is None:
            raise RequestError("missing or invalid API key (header X-API-Key or Authorization: Bearer)",
                               code="unauthorized")
        service.metrics.key_requests.labels(ident).inc()
    wait = service.limiter.take(ident or (request.client.host if request.client else "-"))
    if wait is not None:
        raise RequestError("rate limit reached for this API key", code="rate_limited", retry_after_s=wait)
    return ident


def presented_key(request: Request) -> str | None:
    """The key a request presents: ``X-API-Key``, else an ``Authorization: Bearer`` token."""
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if key is None and auth[:7].lower() == "bearer ":
        key = auth[7:].strip()
    return key


async def authenticate_metrics(request: Request, service: ServiceDep) -> None:
    """``/metrics`` needs a key only with ``CRFIQA_METRICS_REQUIRE_KEY=true`` (and is never rate limited)."""
    if (service.settings.metrics_require_key and service.keys.enabled
            and service.keys.check(presented_key(request)) is None):
        raise RequestError("missing or invalid API key (header X-API-Key or Authorization: Bearer)",
                           code="unauthorized")


Authenticated = Depends(authenticate)
