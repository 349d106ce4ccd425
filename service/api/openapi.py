"""The OpenAPI 3.1 document, made true to this instance's settings: the JSON body's schemas are in
``components``, the image-count limit is ``maxItems``, security is declared only where keys are checked."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from crfiqa.service.api.schemas import QualityRequest
from crfiqa.service.settings import Settings

REF = "#/components/schemas/{model}"
SECURED = ("/v1/quality", "/v1/models")


def build(app: FastAPI, settings: Settings, keys_enabled: bool) -> dict[str, Any]:
    """The document for ``app`` (cached on it, like FastAPI's own)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    _, defs = models_json_schema([(QualityRequest, "validation")], ref_template=REF)
    schemas.update(defs.get("$defs", {}))
    schemas["QualityRequest"]["properties"]["images"]["maxItems"] = settings.max_images_per_request
    body = doc["paths"]["/v1/quality"]["post"]["requestBody"]["content"]
    body["multipart/form-data"]["schema"]["properties"]["images"]["maxItems"] = settings.max_images_per_request
    security = doc["components"].get("securitySchemes", {})
    for path, item in doc["paths"].items():
        for op in item.values():
            op.pop("security", None)
            if keys_enabled and (path in SECURED or (path == "/metrics" and settings.metrics_require_key)):
                op["security"] = [{name: []} for name in security]
    if not keys_enabled:
        doc["components"].pop("securitySchemes", None)
    app.openapi_schema = doc
    return doc
