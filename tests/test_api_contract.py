"""The OpenAPI document is complete and true: checked by hand and by schemathesis against a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import Server

KEY = "contract-key"
ERROR_STATUSES = {"/v1/quality": {"401", "408", "413", "415", "422", "429", "503"}, "/v1/models": {"401", "429"},
                  "/v1/best": {"401", "408", "413", "415", "422", "429", "503"}, "/readyz": {"503"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("contract") / "server.log"
    srv = Server(env={"CRFIQA_API_KEYS": KEY, "CRFIQA_MAX_IMAGES_PER_REQUEST": "4", "CRFIQA_WARMUP_ROUNDS": "1",
                      "CRFIQA_MAX_FACES_PER_IMAGE": "20"}, log=log)
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def spec(server: Server) -> dict:
    return httpx.get(server.url + "/openapi.json").json()


def refs(node: Any) -> list[str]:
    """Every ``$ref`` in a JSON document."""
    if isinstance(node, dict):
        return [*([node["$ref"]] if "$ref" in node else []), *(r for v in node.values() for r in refs(v))]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def test_every_reference_resolves(spec: dict) -> None:
    assert spec["openapi"].startswith("3.1")
    found = refs(spec)
    assert "#/components/schemas/QualityRequest" in found and "#/components/schemas/ImageIn" in found
    for ref in found:
        node: Any = spec
        for part in ref.removeprefix("#/").split("/"):
            assert part in node, f"unresolved {ref}"
            node = node[part]


def test_bodies_responses_and_headers_documented(spec: dict) -> None:
    op = spec["paths"]["/v1/quality"]["post"]
    body = op["requestBody"]
    assert body["required"] is True and set(body["content"]) == {"multipart/form-data", "application/json"}
    form = body["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["images"] and form["properties"]["images"]["maxItems"] == 4
    request = spec["components"]["schemas"]["QualityRequest"]
    assert request["required"] == ["images"] and request["properties"]["images"]["maxItems"] == 4
    assert request["additionalProperties"] is False and request["examples"]
    for path, statuses in ERROR_STATUSES.items():
        (operation,) = spec["paths"][path].values()
        assert statuses <= set(operation["responses"]), path
        for status in statuses:
            response = operation["responses"][status]
            content = response["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/ErrorResponse"} and content["example"]["error"]
            if status in ("429", "503"):
                assert response["headers"]["Retry-After"]["required"] is True, (path, status)
        assert "HTTPValidationError" not in str(operation)  # FastAPI's default 422 is not what we send
    image = spec["components"]["schemas"]["ImageOut"]
    assert {"id", "status", "width", "height"} <= set(image["required"])
    face = spec["components"]["schemas"]["FaceOut"]["properties"]
    assert all(p.get("description") for p in face.values())
    # Security is declared exactly where it is enforced.
    assert set(spec["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}
    assert op["security"] and "security" not in spec["paths"]["/healthz"]["get"]
    assert "security" not in spec["paths"]["/metrics"]["get"]


def test_schemathesis_finds_nothing(server: Server, tmp_path: Path) -> None:
    """Every check, examples + coverage + fuzzing phases, a bounded number of cases per operation."""
    st = Path(sys.executable).with_name("st")
    cmd = [str(st), "run", server.url + "/openapi.json", "--checks", "all", "--phases", "examples,coverage,fuzzing",
           "--max-examples", "25", "--workers", "1", "--request-timeout", "60", "--max-response-time", "60", "-H", f"X-API-Key: {KEY}",
           "--report", "junit", "--report-dir", str(tmp_path)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "No issues found" in out and "Operations:       6 selected / 6 total" in out, out[-3000:]
    # The examples phase ran the documented example (a real image, scored) on /v1/quality and /v1/best.
    assert "Examples" in out and " 2 passed" in out
