"""The API's routers, one per concern. Adding a route is one module with a ``router`` and one line here."""

from __future__ import annotations

from crfiqa.service.api.routes import best, health, models, quality

ROUTERS = [quality.router, best.router, models.router, health.router]
