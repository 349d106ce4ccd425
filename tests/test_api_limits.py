"""Limits under abuse, against a real server: bodies past the limit, slow clients, too many requests in flight,
too many faces, out-of-range options; API keys from a file, per-key metrics and rate limits; CORS."""

from __future__ import annotations

import io
import json
import select
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from crfiqa.service.api.keys import key_id
from tests.helpers import SAMPLES
from tests.server import Server, rss_mib
from tests.test_api import metric

BODY_LIMIT = 2_000_000
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 4.0
BODY_GRACE = 1.5
BODY_MIN_RATE = 2000  # bytes/s
IN_FLIGHT = 4
QUEUE = 8  # faces
BURST = 20
RATE = 5.0  # tokens a second: the other tests' requests with key-a stay well inside it
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text("# mounted secret\nkey-a\n\nkey-limited  # rate-limit test\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys_file: Path):
    log = tmp_path_factory.mktemp("limits") / "server.log"
    srv = Server(env={"CRFIQA_API_KEYS_FILE": str(keys_file), "CRFIQA_MAX_BODY_BYTES": str(BODY_LIMIT),
                      "CRFIQA_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT), "CRFIQA_BODY_TIMEOUT_S": str(BODY_TIMEOUT),
                      "CRFIQA_BODY_GRACE_S": str(BODY_GRACE), "CRFIQA_BODY_MIN_RATE": str(BODY_MIN_RATE),
                      "CRFIQA_LIMIT_CONCURRENCY": str(IN_FLIGHT), "CRFIQA_MAX_QUEUE_SIZE": str(QUEUE),
                      "CRFIQA_RATE_LIMIT_PER_S": str(RATE), "CRFIQA_RATE_LIMIT_BURST": str(BURST),
                      "CRFIQA_CORS_ORIGINS": ORIGIN, "CRFIQA_WARMUP_ROUNDS": "1"}, log=log)
    srv.wait_ready()
    yield srv
    srv.stop()


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response with Content-Length."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the server closes the connection (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def request_head(path: str, extra: str = "", key: str = "key-a") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n{extra}\r\n".encode()


def test_chunked_body_past_the_limit_is_refused_and_not_read(server: Server) -> None:
    """No Content-Length: the limit applies while streaming, and the server stops reading there."""
    sock = connect(server)
    sock.sendall(request_head("/v1/quality", "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"))
    chunk = b"x" * 100_000
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    intended, sent = 50 * BODY_LIMIT, 0
    while sent < intended:
        readable, writable, _ = select.select([sock], [sock], [], 2.0)
        if readable or not writable:  # answered, or the server stopped reading and the buffers are full
            break
        sock.sendall(framed)
        sent += len(chunk)
    # What the kernel buffers hold on both sides is a few MB at most: far from everything we meant to send.
    assert sent < intended / 4, sent
    status, headers, body = read_response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    assert headers["connection"] == "close" and closed_by_server(sock)


def test_content_length_past_the_limit_is_refused_before_reading(server: Server) -> None:
    r = httpx.post(server.url + "/v1/quality", content=b"{}" * (BODY_LIMIT // 2 + 10),
                   headers={"X-API-Key": "key-a", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_slow_headers_time_out(server: Server) -> None:
    """Slowloris: headers trickled one byte at a time; and a connection that sends nothing."""
    sock = connect(server)
    t0 = time.monotonic()
    for byte in b"POST /v1/quality HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200:
        sock.sendall(bytes([byte]))
        if select.select([sock], [], [], 0.1)[0]:  # the server answered: stop sending
            break
    status, headers, body = read_response(sock)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert len(headers["x-request-id"]) == 32  # every response carries an id, the hand-written one too
    assert time.monotonic() - t0 < HEADER_TIMEOUT + 3 and closed_by_server(sock)
    idle = connect(server)
    t0 = time.monotonic()
    assert read_response(idle)[0] == 408 and closed_by_server(idle)
    assert HEADER_TIMEOUT - 0.2 < time.monotonic() - t0 < HEADER_TIMEOUT + 3


def trickle(server: Server, length: int, rate: float, chunk: int = 200) -> tuple[int, str, float]:
    """Send a JSON body of ``length`` bytes (whitespace, then an empty request) at ``rate`` bytes/s until the
    server answers; its status, error message and the seconds it took."""
    sock = connect(server)
    sock.sendall(request_head("/v1/quality", f"Content-Type: application/json\r\nContent-Length: {length}\r\n"))
    payload = b" " * (length - len(b'{"images": []}')) + b'{"images": []}'
    t0 = time.monotonic()
    try:
        for k in range(0, length, chunk):
            sock.sendall(payload[k:k + chunk])
            if select.select([sock], [], [], chunk / rate)[0]:  # answered: stop sending
                break
        status, _, body = read_response(sock, timeout=BODY_TIMEOUT + 10)
        return status, json.loads(body)["error"]["message"], time.monotonic() - t0
    finally:
        sock.close()


def test_slow_body_times_out(server: Server) -> None:
    """A body that stops arriving is cut after the grace; one that trickles below the minimum rate soon after;
    one at twice the rate may take past the grace and is only cut at the body timeout."""
    sock = connect(server)
    sock.sendall(request_head("/v1/quality", "Content-Type: application/json\r\nContent-Length: 1000\r\n") + b"{")
    t0 = time.monotonic()
    status, _, body = read_response(sock, timeout=BODY_TIMEOUT + 10)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert BODY_GRACE - 0.3 < time.monotonic() - t0 < BODY_GRACE + 2 and closed_by_server(sock)
    status, message, took = trickle(server, 4000, rate=BODY_MIN_RATE / 4)
    assert status == 408 and "slower than" in message and BODY_GRACE < took < BODY_GRACE + 2.5
    status, message, took = trickle(server, 6000, rate=BODY_MIN_RATE * 2)  # 1.5 s: done within the grace + rate
    assert status == 422 and took > BODY_GRACE - 0.3, (status, message)
    status, message, took = trickle(server, 40_000, rate=BODY_MIN_RATE * 4, chunk=800)  # 5 s > BODY_TIMEOUT
    assert status == 408 and "within" in message and BODY_TIMEOUT - 0.5 < took < BODY_TIMEOUT + 3


def test_a_client_gone_mid_upload_is_no_error(server: Server) -> None:
    """A client that closes while its JSON or multipart body is arriving is counted as 499 (nginx's "client
    closed request"), not as a 500 internal error or a 422 on a body it never finished."""
    def counts() -> tuple[float, float, float]:
        return (metric(server, "crfiqa_requests_total", 'status="499"'),
                metric(server, "crfiqa_requests_total", 'status="5'), metric(server, "crfiqa_errors_total"))

    before = counts()
    for ctype, start in (("application/json", b'{"images": ['),
                         ("multipart/form-data; boundary=xx", b'--xx\r\nContent-Disposition: form-data; name="images"; '
                                                              b'filename="a.jpg"\r\n\r\n\xff\xd8')):
        sock = connect(server)
        sock.sendall(request_head("/v1/quality", f"Content-Type: {ctype}\r\nContent-Length: 100000\r\n") + start)
        time.sleep(0.3)
        sock.close()
    deadline = time.monotonic() + 10
    while counts()[0] < before[0] + 2:
        assert time.monotonic() < deadline, (before, counts())
        time.sleep(0.1)
    after = counts()
    assert after[1:] == before[1:], (before, after)


def test_more_requests_in_flight_than_the_limit_get_503(server: Server) -> None:
    """IN_FLIGHT slow uploads hold every slot: the next request gets 503 + Retry-After, probes still answer,
    and once the slots free up requests succeed again."""
    holders = []
    for _ in range(IN_FLIGHT):
        s = connect(server)
        # 8,000 of 100,000 bytes at once: that buys past BODY_TIMEOUT at the minimum rate, so the slot is held
        # until the body timeout (a slow upload's worst case), not just the grace.
        s.sendall(request_head("/v1/quality", "Content-Type: application/json\r\nContent-Length: 100000\r\n")
                  + b" " * 8000)
        holders.append(s)
    deadline = time.monotonic() + 20
    while metric(server, "crfiqa_requests_in_flight") < IN_FLIGHT:  # /metrics is never refused
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        r = httpx.get(server.url + "/v1/models", headers={"X-API-Key": "key-a", "Origin": ORIGIN})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["access-control-allow-origin"] == ORIGIN  # a browser may read it and its Retry-After
        assert httpx.get(server.url + "/healthz").status_code == 200
        assert httpx.get(server.url + "/readyz").status_code == 200
    finally:
        for s in holders:
            s.close()
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/v1/models", headers={"X-API-Key": "key-a"}).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_more_faces_than_the_queue_holds_is_413(server: Server) -> None:
    """t1.jpg has 6 faces; two copies are 12 > the queue's 8: a 503 retry could never succeed."""
    files = [("images", ("t1.jpg", (SAMPLES / "t1.jpg").read_bytes()))] * 2
    r = httpx.post(server.url + "/v1/quality", files=files, headers={"X-API-Key": "key-a"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_faces", r.text
    r = httpx.post(server.url + "/v1/quality", files=files[:1], headers={"X-API-Key": "key-a"}, timeout=60)
    assert r.status_code == 200 and len(r.json()["results"][0]["faces"]) == 6


@pytest.mark.parametrize(("field", "value"), [("max_faces", -1), ("max_faces", 1001), ("min_face_size", -1),
                                              ("min_face_size", 1e6), ("det_threshold", 0.0)])
def test_options_out_of_range_are_422_naming_the_field(server: Server, field: str, value: float) -> None:
    url, headers = server.url + "/v1/quality", {"X-API-Key": "key-a"}
    files = [("images", ("t.png", (SAMPLES / "Tom_Hanks_54745.png").read_bytes()))]
    for r in (httpx.post(url, files=files, params={field: value}, headers=headers),
              httpx.post(url, json={"images": [{"data": "AAAA"}], field: value}, headers=headers)):
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
        assert r.json()["error"]["message"].startswith(field), r.text


def test_keys_file_is_reread_on_change_and_sighup(server: Server, keys_file: Path) -> None:
    def status(key: str) -> int:
        return httpx.get(server.url + "/v1/models", headers={"X-API-Key": key}).status_code

    assert status("key-a") == 200 and status("key-b") == 401 and status("") == 401
    keys_file.write_text("key-a\nkey-b\nkey-limited\n")  # a change: picked up within about a second
    deadline = time.monotonic() + 10
    while status("key-b") != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    keys_file.write_text("key-b\nkey-limited\nkey-c\n")
    server.proc.send_signal(signal.SIGHUP)  # re-read now
    time.sleep(0.3)
    assert status("key-c") == 200 and status("key-a") == 401
    keys_file.write_text("key-a\nkey-b\nkey-limited\n")
    server.proc.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    assert status("key-a") == 200 and server.proc.poll() is None
    # Metrics count requests per key under a short hash; no key appears in the metrics or the log.
    text = httpx.get(server.url + "/metrics").text
    assert f'crfiqa_api_key_requests_total{{key_id="{key_id("key-a")}"}}' in text
    log = server.log_path.read_text() if server.log_path else ""
    assert "API keys loaded" in log
    for key in ("key-a", "key-b", "key-c", "key-limited"):
        assert key not in text and key not in log


def test_rate_limit_per_key(server: Server) -> None:
    """A token bucket per key: BURST requests at once, then 429 + Retry-After; other keys are unaffected."""
    with httpx.Client(headers={"X-API-Key": "key-limited"}) as client:  # one connection: fast requests
        codes = [client.get(server.url + "/v1/models") for _ in range(BURST + 40)]
    assert [r.status_code for r in codes[:BURST]] == [200] * BURST
    limited = [r for r in codes[BURST:] if r.status_code == 429]
    assert limited and limited[0].json()["error"]["code"] == "rate_limited"
    assert int(limited[0].headers["retry-after"]) >= 1
    assert httpx.get(server.url + "/v1/models", headers={"X-API-Key": "key-a"}).status_code == 200
    time.sleep(1.5 / RATE)  # a token comes back
    assert httpx.get(server.url + "/v1/models", headers={"X-API-Key": "key-limited"}).status_code == 200
    assert metric(server, "crfiqa_errors_total", 'code="rate_limited"') >= len(limited)


def test_cors_when_configured(server: Server) -> None:
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
    r = httpx.options(server.url + "/v1/quality", headers={"Origin": ORIGIN, "X-Request-ID": "pre-1", **pre})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["x-request-id"] == "pre-1"  # preflights pass through Observe too
    r = httpx.options(server.url + "/v1/quality", headers={"Origin": "https://evil.example", **pre})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url + "/v1/models", headers={"Origin": ORIGIN, "X-API-Key": "key-a"})
    assert r.headers["access-control-allow-origin"] == ORIGIN and "x-request-id" in r.headers[
        "access-control-expose-headers"].lower()


def test_concurrent_abuse_leaves_the_server_healthy(server: Server) -> None:
    """Slow and oversized clients at once do not stop a normal request from succeeding."""
    def slow() -> None:
        s = connect(server)
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost")
            time.sleep(HEADER_TIMEOUT + 0.5)
        finally:
            s.close()

    threads = [threading.Thread(target=slow) for _ in range(20)]
    for t in threads:
        t.start()
    r = httpx.post(server.url + "/v1/quality", files=[("images", ("t1.jpg", (SAMPLES / "t1.jpg").read_bytes()))],
                   headers={"X-API-Key": "key-a"}, timeout=60)
    for t in threads:
        t.join()
    assert r.status_code == 200 and len(r.json()["results"][0]["faces"]) == 6


@pytest.mark.parametrize("batched", [False, True], ids=["per-image", "batched-detection"])
def test_large_photos_are_not_all_held_at_once(tmp_path: Path, batched: bool) -> None:
    """A request of many large photos: each one's pixels are released once it is prepared, so the server's
    peak memory grows with the worker threads (2, each with up to ~3 full-size buffers while decoding), not
    with the number of images: 12 photos held until the last was scored took 2.2 GB, 19x one image. The GPU
    path (one batched detection per request) detects in pixel-bounded groups: it held all 20 before."""
    buf = io.BytesIO()
    Image.new("RGB", (6300, 6300), (128, 128, 128)).save(buf, "PNG")  # 131 KB of PNG, 119 MB decoded
    n, decoded_mib = 20, 6300 * 6300 * 3 / 2**20
    server = Server(env={"CRFIQA_BATCH_DETECTION": str(batched).lower()}, log=tmp_path / "server.log")
    try:
        server.wait_ready()
        pid = server.proc.pid
        base, peak, done = rss_mib(pid), [0.0], threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_mib(pid))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        files = [("images", (f"i{k}.png", buf.getvalue(), "image/png")) for k in range(n)]
        r = httpx.post(server.url + "/v1/quality", files=files, timeout=600)
        done.set()
        watcher.join()
        assert r.status_code == 200 and len(r.json()["results"]) == n
        assert all(x["width"] == 6300 for x in r.json()["results"])
        growth = peak[0] - base
        assert growth < 10 * decoded_mib, f"peak grew {growth:.0f} MiB for {n} images of {decoded_mib:.0f} MiB"
    finally:
        server.stop()


def test_with_keys_only_the_schema_and_probes_are_public(server: Server) -> None:
    """As the README says: the schema and the probes answer without a key; the endpoints with data need one."""
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert httpx.get(server.url + path).status_code == 200, path
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_an_unreadable_keys_file_stops_the_start(tmp_path: Path) -> None:
    """A keys file that is not UTF-8 text (or not a file) fails the start with the reason, instead of a
    service that runs with no key accepted, not even the inline ones."""
    bad = tmp_path / "keys"
    bad.write_bytes(b"key-\xff\xfe\n")
    for path in (bad, tmp_path):
        srv = Server(env={"CRFIQA_API_KEYS_FILE": str(path), "CRFIQA_API_KEYS": "inline"}, log=tmp_path / "log")
        try:
            assert srv.proc.wait(60) != 0
            assert "cannot be read" in srv.log() and str(path) in srv.log()
        finally:
            srv.stop()
