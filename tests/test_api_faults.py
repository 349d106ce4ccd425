"""Faults inside inference, against a real server with small ONNX models that fail or stall on a white crop:
a failed batch fails only its requests (typed) and the next succeeds; a stalled inference drops readiness
to 503 until it ends, and one stuck past ``inference_stall_exit_s`` exits the process (code 70)."""

from __future__ import annotations

import base64
import io
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from crfiqa.service.api.service import STALL_EXIT_CODE
from tests.fault_models import build_failing_model, build_nan_model, build_stalling_model
from tests.helpers import SAMPLES
from tests.server import Server

FACE = (SAMPLES / "Tom_Hanks_54745.png").read_bytes()  # an aligned 112x112 face


def png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((112, 112, 3), value, np.uint8)).save(out, "PNG")
    return out.getvalue()


WHITE = png(255)


def post(server: Server, images: list[tuple[str, bytes]], timeout: float = 120) -> httpx.Response:
    return httpx.post(server.url + "/v1/quality", params={"aligned": "true"},
                      files=[("images", img) for img in images], timeout=timeout)


def expected_raw(data: bytes) -> float:
    """What both fault models output for an ordinary crop: the mean of the normalised pixels."""
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    return float(((rgb - 127.5) / 127.5).mean())


def test_a_failing_batch_fails_only_its_requests(tmp_path: Path) -> None:
    model = build_failing_model(tmp_path / "fails_on_white.onnx", trigger="white")
    srv = Server(env={"CRFIQA_QUALITY_MODEL": str(model), "CRFIQA_WARMUP_ROUNDS": "1",
                      "CRFIQA_MAX_QUEUE_DELAY_MS": "0"}, log=tmp_path / "log")
    try:
        srv.wait_ready()
        r = post(srv, [("face.png", FACE)])
        assert r.status_code == 200 and r.json()["results"][0]["faces"][0]["quality"]["raw"] == pytest.approx(
            expected_raw(FACE), abs=1e-5)
        # The white crop and the face share one batch (one request): both fail with a typed error.
        r = post(srv, [("white.png", WHITE), ("face.png", FACE), ("broken.png", b"not an image")])
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["status"] for x in results] == ["error", "error", "error"]
        assert [x["error"]["code"] for x in results] == ["inference_error", "inference_error", "unsupported_format"]
        # The next request, in its own batch, succeeds; so does everything after.
        for _ in range(3):
            r = post(srv, [("face.png", FACE)])
            assert r.status_code == 200 and r.json()["results"][0]["status"] == "ok"
        assert httpx.get(srv.url + "/readyz").status_code == 200
    finally:
        srv.stop()


def test_a_nan_score_fails_only_its_image(tmp_path: Path) -> None:
    """A model answering NaN for one crop: that image is a typed inference_error inside the 200; the face
    beside it in the same batch keeps its score (a NaN reached the response schema and failed the request)."""
    srv = Server(env={"CRFIQA_QUALITY_MODEL": str(build_nan_model(tmp_path / "nan.onnx")),
                      "CRFIQA_WARMUP_ROUNDS": "1"}, log=tmp_path / "log")
    try:
        srv.wait_ready()
        r = post(srv, [("white.png", WHITE), ("face.png", FACE)])
        assert r.status_code == 200, r.text
        white, face = r.json()["results"]
        assert white["status"] == "error" and white["error"]["code"] == "inference_error"
        assert face["status"] == "ok" and face["faces"][0]["quality"]["raw"] == pytest.approx(expected_raw(FACE), abs=1e-5)
    finally:
        srv.stop()


def test_stalled_inference_drops_readiness_then_recovers_or_exits(tmp_path: Path) -> None:
    """One white crop stalls inference (2 M loop steps: 1.4 s on an idle 2-core machine, up to ~20 s on a busy
    one; > the 0.3 s timeout): 503 while it runs, ready again after. Four white crops stall 256 times longer,
    far past the 45 s exit limit: the process exits with code 70."""
    model = build_stalling_model(tmp_path / "stalls_on_white.onnx", iterations_per_hit=2_000_000)
    srv = Server(env={"CRFIQA_QUALITY_MODEL": str(model), "CRFIQA_WARMUP_ROUNDS": "1",
                      "CRFIQA_INFERENCE_TIMEOUT_S": "0.3", "CRFIQA_INFERENCE_STALL_EXIT_S": "45"},
                 log=tmp_path / "log")
    try:
        srv.wait_ready()
        result: dict = {}
        stuck = threading.Thread(target=lambda: result.setdefault("r", post(srv, [("white.png", WHITE)])))
        stuck.start()
        seen: list[int] = []
        refused: list[str] = []
        while stuck.is_alive():
            r = httpx.get(srv.url + "/readyz")
            seen.append(r.status_code)
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "inference_stalled" and int(r.headers["retry-after"]) >= 1
                busy = post(srv, [("face.png", FACE)], timeout=30)  # refused at once, not queued behind it
                if busy.status_code == 503:
                    refused.append(busy.json()["error"]["code"])
            time.sleep(0.05)
        stuck.join()
        assert 503 in seen and refused and set(refused) == {"inference_stalled"}, (seen, refused)
        assert result["r"].status_code == 200 and result["r"].json()["results"][0]["status"] == "ok"
        deadline = time.monotonic() + 5
        while httpx.get(srv.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert post(srv, [("face.png", FACE)]).json()["results"][0]["status"] == "ok"

        with pytest.raises(httpx.HTTPError):  # the process exits under this request
            post(srv, [(f"w{i}.png", WHITE) for i in range(4)], timeout=120)
        assert srv.proc.wait(90) == STALL_EXIT_CODE
        assert "quality inference stuck; exiting" in srv.log()
    finally:
        srv.stop()


def test_a_killed_json_parser_process_is_replaced(tmp_path: Path) -> None:
    """The process that parses large JSON bodies dies (SIGKILL, as the OOM killer does): the next large body
    is parsed by a new one, not refused until a restart."""
    body = {"images": [{"data": base64.b64encode(FACE).decode(), "id": f"f{k}"} for k in range(2)]}
    server = Server(env={"CRFIQA_JSON_PROCESS_BYTES": "1000"}, log=tmp_path / "server.log")
    try:
        server.wait_ready()
        url = server.url + "/v1/quality?aligned=true"
        assert httpx.post(url, json=body, timeout=60).status_code == 200
        children = [int(pid) for pid in Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
                    .read_text().split()]
        parsers = [pid for pid in children
                   if b"multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes()
                   and b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(parsers) == 1, children
        os.kill(parsers[0], signal.SIGKILL)
        time.sleep(1.0)  # the pool's manager thread notices the dead process and marks the pool broken
        for _ in range(2):
            r = httpx.post(url, json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert [x["status"] for x in r.json()["results"]] == ["ok", "ok"]
        assert "starting a new one" in server.log()
    finally:
        server.stop()


def test_sigterm_ends_the_process_past_a_stuck_batch_and_during_warm_up(tmp_path: Path) -> None:
    """SIGTERM with a batch stuck in the model (minutes of it, no stall exit) ends the process within the drain
    and inference timeouts, not when the model returns; SIGTERM during a long warm-up ends it at once."""
    model = build_stalling_model(tmp_path / "stalls_on_white.onnx", iterations_per_hit=2_000_000)
    srv = Server(env={"CRFIQA_QUALITY_MODEL": str(model), "CRFIQA_WARMUP_ROUNDS": "1",
                      "CRFIQA_INFERENCE_TIMEOUT_S": "1", "CRFIQA_GRACEFUL_TIMEOUT_S": "1",
                      "CRFIQA_INFERENCE_STALL_EXIT_S": "0"}, log=tmp_path / "log")
    try:
        srv.wait_ready()
        answer: list = []

        def send() -> None:
            try:
                answer.append(post(srv, [(f"w{i}.png", WHITE) for i in range(4)]).status_code)
            except httpx.HTTPError as exc:
                answer.append(exc)

        stuck = threading.Thread(target=send)
        stuck.start()
        deadline = time.monotonic() + 30
        while httpx.get(srv.url + "/readyz").status_code != 503:  # the batch is in the model
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its shutdown
        assert time.monotonic() - t0 < 20, srv.log()
        assert "stopping with an inference call still running" in srv.log()
        stuck.join(30)
        # Cancelled by uvicorn at the drain's end: its plain 500, or the connection closed under it.
        assert answer and (answer[0] == 500 or isinstance(answer[0], httpx.HTTPError)), answer
    finally:
        srv.stop()
    warming = Server(env={"CRFIQA_WARMUP_ROUNDS": "100000"}, log=tmp_path / "log2")
    try:
        warming.wait_up()
        time.sleep(1.0)
        assert httpx.get(warming.url + "/readyz").status_code == 503
        t0 = time.monotonic()
        warming.proc.send_signal(signal.SIGTERM)
        assert warming.proc.wait(30) in (0, -signal.SIGTERM) and time.monotonic() - t0 < 10, warming.log()
    finally:
        warming.stop()
