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


def build(app: FastAPI, settings: Settings, keys_enabled: bool) -> dict[str, Any]:
    """The document for ``app`` (cached on it, like FastAPI's own). Routes need nothing here: a body from
    ``parsing.BODY_DOC`` gets its limit, an ``authenticate`` dependency its security."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    _, defs = models_json_schema([(QualityRequest, "validation")], ref_template=REF)
    schemas.update(defs.get("$defs", {}))
    schemas["QualityRequest"]["properties"]["images"]["maxItems"] = settings.max_images_per_request
    schemes = doc["components"].get("securitySchemes", {})
    for path, item in doc["paths"].items():
        for op in item.values():
            form = op.get("requestBody", {}).get("content", {}).get("multipart/form-data", {})
            images = form.get("schema", {}).get("properties", {}).get("images")
            if images is not None:
                images["maxItems"] = settings.max_images_per_request
            if not keys_enabled:
                op.pop("security", None)
            elif path == "/metrics" and settings.metrics_require_key:
                op["security"] = [{name: []} for name in schemes]
    if not keys_enabled:
        doc["components"].pop("securitySchemes", None)
    app.openapi_schema = doc
    return doc
