"""The HTTP service, as a real server process on a free loopback port, with real models."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.fault_models import build_failing_model
from tests.helpers import SAMPLES, hostile_images, lfw_dev_images
from tests.server import Server
from tests.test_cli import ENV

KEY = "s3cret-key"
HEADERS = {"X-API-Key": KEY}
LIMIT_IMAGES = 8
LIMIT_BODY = 2_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("srv") / "server.log"
    srv = Server(env={"CRFIQA_API_KEYS": f"other-key,{KEY}", "CRFIQA_MAX_IMAGES_PER_REQUEST": str(LIMIT_IMAGES),
                      "CRFIQA_MAX_BODY_BYTES": str(LIMIT_BODY), "CRFIQA_MAX_BATCH_SIZE": "16",
                      "CRFIQA_MAX_QUEUE_DELAY_MS": "10"}, log=log)
    srv.wait_ready()
    yield srv
    srv.stop()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def post_files(server: Server, paths: list[Path], params: dict | None = None, headers=HEADERS) -> httpx.Response:
    files = [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    return httpx.post(server.url + "/v1/quality", files=files, params=params, headers=headers, timeout=60)


def metric(server: Server, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + ("{" if labels else "")) or line.startswith(name + " ")) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def calibrated(raw: float, calibration: dict) -> float:
    """The 0-100 score of a raw value, computed here from the manifest's calibration."""
    return 100.0 / (1.0 + math.exp(-(raw - calibration["centre"]) / calibration["scale"]))


def test_unknown_paths_and_methods_are_typed_and_counted(server: Server) -> None:
    """404 and 405 carry the error envelope and count in crfiqa_errors_total like every other error."""
    before = (metric(server, "crfiqa_errors_total", 'code="not_found"'),
              metric(server, "crfiqa_errors_total", 'code="method_not_allowed"'))
    r = httpx.get(server.url + "/v1/nothing", headers=HEADERS)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/quality", headers=HEADERS)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    after = (metric(server, "crfiqa_errors_total", 'code="not_found"'),
             metric(server, "crfiqa_errors_total", 'code="method_not_allowed"'))
    assert after == (before[0] + 1, before[1] + 1)


def test_t1_six_faces(server: Server) -> None:
    r = post_files(server, [SAMPLES / "t1.jpg"], headers={**HEADERS, "X-Request-ID": "abc-123"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "abc-123"
    body = r.json()
    assert body["model"]["name"] and body["model"]["provider"] == "CPUExecutionProvider"
    (res,) = body["results"]
    assert res["id"] == res["filename"] == "t1.jpg" and res["status"] == "ok" and len(res["faces"]) == 6
    assert (res["width"], res["height"]) == Image.open(SAMPLES / "t1.jpg").size
    calibration = httpx.get(server.url + "/v1/models", headers=HEADERS).json()["quality"]["calibration"]
    for face in res["faces"]:
        assert len(face["landmarks"]) == 5
        assert face["quality"]["score"] == pytest.approx(calibrated(face["quality"]["raw"], calibration), abs=2e-3)
    timing = body["timing_ms"]
    assert set(timing) == {"read", "prepare", "quality", "total"}
    # Wall-clock stages of one request, one after another: they fit inside the total (sums over threads would not).
    assert timing["read"] + timing["prepare"] + timing["quality"] <= timing["total"] + 0.01
    assert "landmarks" not in post_files(server, [SAMPLES / "t1.jpg"], {"return_landmarks": "false"}).json()[
        "results"][0]["faces"][0]


def test_json_batch_with_broken_images(server: Server) -> None:
    good = [{"data": b64(p), "id": p.stem} for p in lfw_dev_images(6)]
    truncated = base64.b64encode((SAMPLES / "t1.jpg").read_bytes()[:3000]).decode()
    images = [*good[:3], {"data": truncated, "id": "broken1"}, *good[3:], {"data": "@@not-base64@@", "id": "broken2"}]
    r = httpx.post(server.url + "/v1/quality", json={"images": images}, headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["id"] for x in results] == [i["id"] for i in images]
    assert all("filename" not in x for x in results)  # multipart only
    status = {x["id"]: x["status"] for x in results}
    assert sum(s == "ok" for s in status.values()) == 6 and status["broken1"] == status["broken2"] == "error"
    errors = {x["id"]: x["error"]["code"] for x in results if x["status"] == "error"}
    assert errors == {"broken1": "corrupt_image", "broken2": "invalid_base64"}
    assert all(x["faces"] and "quality" in x["faces"][0] for x in results if x["status"] == "ok")


@pytest.mark.parametrize("route", ["/v1/quality", "/v1/best"])
def test_hostile_files_fail_alone(server: Server, route: str) -> None:
    """Files on which Pillow raises untyped errors are typed per-image errors; the good images are answered."""
    good = lfw_dev_images(2)
    hostile = hostile_images()
    files = [("images", (good[0].name, good[0].read_bytes(), "image/jpeg")),
             *[("images", (name, data, "application/octet-stream")) for name, data in hostile.items()],
             ("images", (good[1].name, good[1].read_bytes(), "image/jpeg"))]
    r = httpx.post(server.url + route, files=files, headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    if route == "/v1/quality":
        results = {x["id"]: x for x in r.json()["results"]}
        assert all(results[p.name]["status"] == "ok" and results[p.name]["faces"] for p in good)
        assert {results[n]["error"]["code"] for n in hostile} <= {"unsupported_format", "corrupt_image"}
    else:
        body = r.json()
        assert {x["id"] for x in body["errors"]} >= set(hostile) and body["identities"], body


def test_aligned_mode_and_cli_agree(server: Server) -> None:
    """Scores over HTTP equal `crfiqa score` on the same files."""
    paths = [SAMPLES / "Tom_Hanks_54745.png", SAMPLES / "t1.jpg"]
    for aligned in (True, False):
        r = post_files(server, paths, {"aligned": str(aligned).lower()})
        assert r.status_code == 200
        http = [[f["quality"]["raw"] for f in res["faces"]] for res in r.json()["results"]]
        args = ["score", "--quiet", *map(str, paths)] + (["--aligned"] if aligned else [])
        cli = subprocess.run([sys.executable, "-m", "crfiqa.cli", *args], capture_output=True, text=True,
                             env=ENV, timeout=120)
        expected = [[f["quality"]["raw"] for f in json.loads(line)["faces"]] for line in cli.stdout.splitlines()]
        assert len(http[0]) == 1 and len(http[1]) == (0 if aligned else 6)
        if aligned:  # a 1280x886 photo is not an aligned face: refused with a typed error, in both
            assert r.json()["results"][1]["error"]["code"] == "not_aligned"
            assert json.loads(cli.stdout.splitlines()[1])["error"]["code"] == "not_aligned"
        assert [len(x) for x in http] == [len(x) for x in expected]
        assert [v for x in http for v in x] == pytest.approx([v for x in expected for v in x], abs=1e-4)


def test_auth(server: Server) -> None:
    assert post_files(server, [SAMPLES / "t1.jpg"], headers={}).status_code == 401
    assert post_files(server, [SAMPLES / "t1.jpg"], headers={"X-API-Key": "wrong"}).status_code == 401
    assert post_files(server, [SAMPLES / "t1.jpg"], headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert post_files(server, [SAMPLES / "t1.jpg"], headers={"X-API-Key": "other-key"}).status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 401
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(server.url + path).status_code == 200


def test_limits_and_validation(server: Server) -> None:
    url = server.url + "/v1/quality"
    r = post_files(server, [SAMPLES / "Tom_Hanks_54745.png"] * (LIMIT_IMAGES + 1))
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_images"  # the schema's maxItems
    r = post_files(server, [SAMPLES / "Tom_Hanks_54745.png"] * (LIMIT_IMAGES + 5))  # past starlette's max_files
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_images"
    # Counted before any entry is validated: invalid entries past the limit are too many, not invalid.
    r = httpx.post(url, json={"images": [{"data": 5}] * (LIMIT_IMAGES + 1)}, headers=HEADERS)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_images", r.text
    big = [{"data": "A" * (LIMIT_BODY + 10)}]
    r = httpx.post(url, json={"images": big}, headers=HEADERS)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the limit applies while streaming
        for _ in range(30):
            yield b"x" * 100_000

    r = httpx.post(url, content=chunks(), headers={**HEADERS, "content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(url, content=b"hello", headers={**HEADERS, "content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(url, json={"images": [], "max_faces": 1}, headers=HEADERS)
    assert r.status_code == 422 and "images" in r.json()["error"]["message"]
    r = httpx.post(url, json={"images": [{"data": b64(SAMPLES / "t1.jpg")}], "max_faces": -1}, headers=HEADERS)
    assert r.status_code == 422 and "max_faces" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"{not json", headers={**HEADERS, "content-type": "application/json"})
    assert r.status_code == 422
    r = post_files(server, [SAMPLES / "t1.jpg"], {"det_threshold": "2"})
    assert r.status_code == 422 and "det_threshold" in r.json()["error"]["message"]
    r = httpx.post(url, data={"images": "not a file"}, files=[("other", ("x", b"y"))], headers=HEADERS)
    assert r.status_code == 422


def test_json_options_apply(server: Server) -> None:
    body = {"images": [{"data": b64(SAMPLES / "t1.jpg"), "id": "t1"}], "max_faces": 2, "return_landmarks": False}
    r = httpx.post(server.url + "/v1/quality", json=body, headers=HEADERS, timeout=60)
    faces = r.json()["results"][0]["faces"]
    assert len(faces) == 2 and "landmarks" not in faces[0]


def test_models_endpoint(server: Server) -> None:
    body = httpx.get(server.url + "/v1/models", headers=HEADERS).json()
    assert body["detector"]["name"] == "scrfd_500m" and body["quality"]["role"] == "quality"
    assert body["quality"]["provider"] == "CPUExecutionProvider" and "calibration" in body["quality"]


def test_metrics_move_with_traffic(server: Server) -> None:
    text = httpx.get(server.url + "/metrics").text
    for family in ["crfiqa_requests_total", "crfiqa_request_duration_seconds", "crfiqa_stage_duration_seconds",
                   "crfiqa_inference_batch_size", "crfiqa_queue_depth", "crfiqa_faces_per_image",
                   "crfiqa_quality_score", "crfiqa_errors_total", "crfiqa_model_info", "crfiqa_ready",
                   "process_cpu_seconds_total"]:
        assert f"# TYPE {family.removesuffix('_total')}" in text, family
    before = metric(server, "crfiqa_requests_total", 'endpoint="/v1/quality",status="200"')
    faces_before = metric(server, "crfiqa_quality_score_count")
    post_files(server, [SAMPLES / "t1.jpg"])
    assert metric(server, "crfiqa_requests_total", 'endpoint="/v1/quality",status="200"') == before + 1
    assert metric(server, "crfiqa_quality_score_count") == faces_before + 6
    assert metric(server, "crfiqa_stage_duration_seconds_count", 'stage="detect"') > 0
    assert metric(server, "crfiqa_ready") == 1
    best_before = metric(server, "crfiqa_requests_total", 'endpoint="/v1/best",status="200"')
    r = httpx.post(server.url + "/v1/best", files=[("images", ("t1.jpg", (SAMPLES / "t1.jpg").read_bytes()))],
                   headers=HEADERS, timeout=60)
    assert r.status_code == 200
    assert metric(server, "crfiqa_requests_total", 'endpoint="/v1/best",status="200"') == best_before + 1
    # Refused by a middleware before any route runs: counted as an error like the routes' own.
    too_large = metric(server, "crfiqa_errors_total", 'code="body_too_large"')
    r = httpx.post(server.url + "/v1/quality", json={"images": [{"data": "A" * (LIMIT_BODY + 10)}]}, headers=HEADERS)
    assert r.status_code == 413
    assert metric(server, "crfiqa_errors_total", 'code="body_too_large"') == too_large + 1


def test_concurrent_clients_are_batched(server: Server) -> None:
    """32 clients x 10 requests: all 200, and faces from different requests share inference batches."""
    data = (SAMPLES / "Tom_Hanks_54745.png").read_bytes()
    calls_before = metric(server, "crfiqa_inference_batch_size_count")
    singles_before = metric(server, "crfiqa_inference_batch_size_bucket", 'le="1.0"')

    def client(_: int) -> list[int]:
        with httpx.Client(timeout=120, headers=HEADERS) as c:
            return [c.post(server.url + "/v1/quality", params={"aligned": "true"},
                           files=[("images", ("t.png", data))]).status_code for _ in range(10)]

    with ThreadPoolExecutor(32) as pool:
        codes = [c for cs in pool.map(client, range(32)) for c in cs]
    assert codes == [200] * 320
    calls = metric(server, "crfiqa_inference_batch_size_count") - calls_before
    singles = metric(server, "crfiqa_inference_batch_size_bucket", 'le="1.0"') - singles_before
    assert 0 < calls < 320 and singles < calls, (calls, singles)


def test_not_ready_while_warm_up_has_not_succeeded(tmp_path: Path) -> None:
    """Readiness without a race: a quality model that fails on the warm-up's black crops never lets the warm-up
    succeed, so the service stays alive and not ready (503 + Retry-After) for as long as we look."""
    model = build_failing_model(tmp_path / "fails_on_black.onnx", trigger="black")
    srv = Server(env={"CRFIQA_QUALITY_MODEL": str(model), "CRFIQA_WARMUP_ROUNDS": "1"}, log=tmp_path / "log")
    try:
        srv.wait_up()
        deadline = time.monotonic() + 60
        while "warm-up failed" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "warm-up failed" in srv.log()
        for _ in range(3):
            r = httpx.get(srv.url + "/readyz")
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and int(r.headers["retry-after"]) >= 1
            r = post_files(srv, [SAMPLES / "t1.jpg"], headers={})
            assert r.status_code == 503 and r.headers["retry-after"]
            assert httpx.get(srv.url + "/healthz").status_code == 200
            assert metric(srv, "crfiqa_ready") == 0
    finally:
        srv.stop()


def test_graceful_shutdown(tmp_path: Path) -> None:
    srv = Server(env={"CRFIQA_WARMUP_ROUNDS": "1"}, log=tmp_path / "log")
    try:
        srv.wait_ready()
        # SIGTERM while a slow request is in flight: it still completes.
        result: dict = {}
        t = threading.Thread(target=lambda: result.setdefault("r", post_files(srv, [SAMPLES / "t1.jpg"] * 24, headers={})))
        t.start()
        time.sleep(0.3)
        srv.proc.send_signal(15)
        t.join(60)
        assert result["r"].status_code == 200 and len(result["r"].json()["results"]) == 24
        assert srv.proc.wait(30) in (0, -15)  # uvicorn re-raises SIGTERM after draining
    finally:
        srv.stop()
    lines = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines() if line.startswith("{")]
    assert any(x.get("path") == "/v1/quality" and x.get("request_id") not in (None, "-") for x in lines)
    # Probes are logged at debug only: at the default info level they do not flood the log.
    assert not any(x.get("path") in ("/healthz", "/readyz", "/metrics") for x in lines)


def test_startup_fails_fast_on_missing_model(tmp_path: Path) -> None:
    srv = Server(env={"CRFIQA_MODELS_DIR": str(tmp_path)}, log=tmp_path / "log")
    code = srv.proc.wait(60)
    assert code != 0 and "crfiqa models fetch" in srv.log()


def test_cors_off_by_default(server: Server) -> None:
    r = httpx.options(server.url + "/v1/quality", headers={"Origin": "https://app.example",
                                                           "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers and r.status_code == 405
    r = httpx.get(server.url + "/healthz", headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_large_json_is_parsed_in_a_worker_process(server: Server) -> None:
    """A body over CRFIQA_JSON_PROCESS_BYTES (1 MiB) goes through the parsing process: same results, same
    typed errors (they cross the process boundary), same 422s naming the field."""
    face = b64(SAMPLES / "Tom_Hanks_54745.png")
    filler = "A" * 1_200_000  # valid base64 of zeros: not an image
    body = {"images": [{"data": face, "id": "face"}, {"data": filler, "id": "zeros"}, {"data": "@@", "id": "bad"}],
            "aligned": True}
    r = httpx.post(server.url + "/v1/quality", json=body, headers=HEADERS, timeout=120)
    assert r.status_code == 200, r.text
    results = {x["id"]: x for x in r.json()["results"]}
    assert results["zeros"]["error"]["code"] == "unsupported_format"
    assert results["bad"]["error"]["code"] == "invalid_base64"
    small = httpx.post(server.url + "/v1/quality", json={"images": [{"data": face}], "aligned": True},
                       headers=HEADERS, timeout=60).json()["results"][0]
    assert results["face"]["faces"][0]["quality"] == small["faces"][0]["quality"]
    r = httpx.post(server.url + "/v1/quality", json={"images": [{"data": filler, "bogus": 1}]}, headers=HEADERS)
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("images.0.bogus")
    many = {"images": [{"data": face}] * LIMIT_IMAGES + [{"data": filler}]}
    r = httpx.post(server.url + "/v1/quality", json=many, headers=HEADERS)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_images"
