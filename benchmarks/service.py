"""Service throughput under concurrent HTTP load next to the raw pipeline's, measured in one run.

    python benchmarks/service.py --images 128 --clients 8

Starts ``crfiqa serve`` on a free loopback port, sends each image as its own multipart request (or
``--per-request`` images per request) from N concurrent clients (one asyncio loop), and prints images/s and
p50/p95/p99 latency beside the in-process pipeline's end-to-end images/s on the same images, and the load
generator's own CPU per request: it shares the cores with the server, which the in-process run does not pay.
``--client raw`` (the default) writes pre-encoded HTTP/1.1 requests on keep-alive connections and reads each
answer by its Content-Length, like wrk or hey (about 0.3 ms of CPU per request here); ``--client httpx`` uses
httpx's AsyncClient (about 3 ms per request on the 2-core development machine, a fifth of a request's server
time, which one client waits for in full).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.pipeline import timed  # noqa: E402
from crfiqa.service.imaging import list_images  # noqa: E402
from crfiqa.service.pipeline import Pipeline, PipelineSettings  # noqa: E402
from tests.server import Server  # noqa: E402

#: One request of a load generator: sends its item, True when answered 200 with a QualityResponse.
Send = Callable[[Any], Awaitable[bool]]


async def drive(items: list, clients: int, rounds: int, connect: Callable[[], AbstractAsyncContextManager[Send]]
                ) -> tuple[float, list[float], int, float]:
    """Send every item ``rounds`` times from ``clients`` concurrent clients, each on its own ``connect()``;
    (seconds, per-request latencies, errors, the load generator's own CPU seconds)."""
    queue: asyncio.Queue = asyncio.Queue()
    for _ in range(rounds):
        for item in items:
            queue.put_nowait(item)
    latencies: list[float] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        async with connect() as send:
            while not queue.empty():
                item = queue.get_nowait()
                t = time.perf_counter()
                ok = await send(item)
                latencies.append(time.perf_counter() - t)
                errors += not ok

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - t0, latencies, errors, time.process_time() - cpu0


def groups(payloads: list[tuple[str, bytes]], per_request: int) -> list[list[tuple[str, bytes]]]:
    """The payloads, ``per_request`` images per request."""
    return [payloads[i:i + per_request] for i in range(0, len(payloads), per_request)]


async def load(url: str, payloads: list[tuple[str, bytes]], clients: int, rounds: int, per_request: int = 1
               ) -> tuple[float, list[float], int, float]:
    """``drive`` with httpx's AsyncClient (its pool holds one connection per client)."""
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as c:
        async def send(group: list[tuple[str, bytes]]) -> bool:
            r = await c.post(url + "/v1/quality", files=[("images", p) for p in group])
            return r.status_code == 200

        @asynccontextmanager
        async def connect() -> AsyncIterator[Send]:
            yield send

        return await drive(groups(payloads, per_request), clients, rounds, connect)


def encode(url: str, group: list[tuple[str, bytes]]) -> bytes:
    """One ``POST /v1/quality`` request, multipart, as the bytes a client writes (keep-alive)."""
    boundary = "crfiqa-bench-boundary"
    parts = [b"--%s\r\nContent-Disposition: form-data; name=\"images\"; filename=\"%s\"\r\n"
             b"Content-Type: application/octet-stream\r\n\r\n%s\r\n" % (boundary.encode(), name.encode(), data)
             for name, data in group]
    body = b"".join(parts) + b"--%s--\r\n" % boundary.encode()
    host = url.split("//", 1)[1]
    head = (f"POST /v1/quality HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def raw_load(url: str, payloads: list[tuple[str, bytes]], clients: int, rounds: int, per_request: int = 1
                   ) -> tuple[float, list[float], int, float]:
    """``drive`` with pre-encoded requests on one keep-alive connection per client; each answer is read by its
    Content-Length (uvicorn sends one on every JSON response)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)

    @asynccontextmanager
    async def connect() -> AsyncIterator[Send]:
        reader, writer = await asyncio.open_connection(host, int(port))

        async def send(request: bytes) -> bool:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next(int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length")
            body = await reader.readexactly(length)
            return lines[0].split()[1] == "200" and body.startswith(b'{"model"')  # a QualityResponse

        try:
            yield send
        finally:
            writer.close()

    return await drive([encode(url, g) for g in groups(payloads, per_request)], clients, rounds, connect)


async def loop_probe(url: str, megabytes: float, every_s: float = 0.002) -> tuple[float, float, float]:
    """Event-loop responsiveness: the slowest ``/healthz`` (ms) idle and while one JSON request of about
    ``megabytes`` MB (three base64 images) is received, parsed and answered; and that request's time (ms).
    The big request is sent from another process, so sending it does not delay the probe."""
    data = "A" * int(megabytes * 1e6 / 3)
    body = json.dumps({"images": [{"data": data, "id": str(i)} for i in range(3)]}).encode()

    def send() -> float:  # in another process: sending 45 MB would hold this process's GIL
        with tempfile.NamedTemporaryFile(suffix=".json") as fh:
            fh.write(body)
            fh.flush()
            code = (f"import httpx, sys, time; d = open({fh.name!r}, 'rb').read(); t = time.perf_counter(); "
                    f"r = httpx.post({url + '/v1/quality'!r}, content=d, headers={{'content-type': 'application/json'}}, "
                    "timeout=300); print(r.status_code, 1000 * (time.perf_counter() - t))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        status, ms = out.split()
        assert status == "200", out
        return float(ms)

    async def probe(c: httpx.AsyncClient, until: Callable[[], bool]) -> float:
        worst = 0.0
        while not until():
            t = time.perf_counter()
            await c.get(url + "/healthz")
            worst = max(worst, time.perf_counter() - t)
            await asyncio.sleep(every_s)
        return 1000 * worst

    async with httpx.AsyncClient(timeout=300) as c:
        end = time.perf_counter() + 1.0
        idle = await probe(c, lambda: time.perf_counter() > end)
        sender = asyncio.get_running_loop().run_in_executor(None, send)
        busy = await probe(c, sender.done)
    return idle, busy, await sender


def probe_table(env: dict[str, str], megabytes: float, rounds: int = 3) -> None:
    """The event-loop probe with large JSON parsed in the worker process (default) and on the event loop."""
    print(f"\nevent loop during one {megabytes:g} MB JSON request (slowest /healthz, median of {rounds})")
    print(f"{'JSON parsed':>22}{'idle ms':>9}{'busy ms':>9}{'request ms':>12}")
    for label, value in (("in a worker process", None), ("on the event loop", "0")):
        server = Server(env={**env, **({"CRFIQA_JSON_PROCESS_BYTES": value} if value else {})})
        try:
            server.wait_ready()
            asyncio.run(loop_probe(server.url, megabytes))  # first use: the parsing process starts
            runs = np.array([asyncio.run(loop_probe(server.url, megabytes)) for _ in range(rounds)])
        finally:
            server.stop()
        idle, busy, took = np.median(runs, axis=0)
        print(f"{label:>22}{idle:>9.1f}{busy:>9.1f}{took:>12.0f}")


def main(argv: list[str] | None = None) -> None:
    """Measure and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--per-request", type=int, default=1, help="images per request")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="load generator: pre-encoded requests on raw connections, or httpx's AsyncClient")
    ap.add_argument("--repeat", type=int, default=3, help="alternating in-process/service runs per client count")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lfw" / "images")
    ap.add_argument("--models-dir", type=Path, default=REPO.parent / "shared" / "models")
    ap.add_argument("--providers", default="CPUExecutionProvider")
    ap.add_argument("--env", action="append", default=[], help="extra server setting NAME=VALUE")
    ap.add_argument("--loop-probe-mb", type=float, default=45.0, help="size of the JSON request of the event-loop "
                    "probe (0 = skip)")
    args = ap.parse_args(argv)
    paths = list_images([args.data])[: args.images]
    payloads = [(p.name, p.read_bytes()) for p in paths]

    pipe = Pipeline(PipelineSettings(models_dir=args.models_dir, providers=tuple(args.providers.split(","))))
    list(pipe.run(paths[:4]))  # load + warm up

    def raw() -> float:
        """The in-process pipeline's end-to-end images/s on the same images, now."""
        return len(paths) / timed(lambda: list(pipe.run(paths)))

    env = {"CRFIQA_MODELS_DIR": str(args.models_dir), "CRFIQA_PROVIDERS": args.providers, "CRFIQA_LOG_LEVEL": "warning"}
    env.update(dict(kv.split("=", 1) for kv in args.env))
    server = Server(env=env)
    try:
        server.wait_ready()
        send = raw_load if args.client == "raw" else load
        asyncio.run(send(server.url, payloads[:8], 4, 1))  # warm the connection path
        # The in-process rate is measured right before each client count (the server idles meanwhile:
        # its ONNX Runtime threads sleep), so a machine shared with other jobs moves both alike.
        print(f"\nservice benchmark: {len(paths)} LFW images x {args.rounds}, {args.per_request} per request "
              f"({args.providers}; {' '.join(args.env) or 'default settings'}; {args.client} client; "
              f"load {os.getloadavg()[0]:.1f})")
        # The client runs on the same cores as the server (the in-process run has none): its CPU share is
        # printed so that the ratio can be read as what it is.
        print(f"{'clients':>8}{'images/s':>10}{'in-process':>12}{'ratio':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
              f"{'errors':>8}{'client CPU ms/req':>19}")
        for clients in (int(c) for c in args.clients.split(",")):
            raw_rate, rate = 0.0, 0.0
            for _ in range(args.repeat):  # alternate; each side's best run counts
                raw_rate = max(raw_rate, raw())
                seconds, run_lat, run_errors, run_cpu = asyncio.run(send(server.url, payloads, clients, args.rounds,
                                                                         args.per_request))
                if len(paths) * args.rounds / seconds > rate:
                    rate, lat, errors = len(paths) * args.rounds / seconds, run_lat, run_errors
                    client_ms = 1000 * run_cpu / len(run_lat)
            p50, p95, p99 = np.percentile(np.array(lat) * 1000, [50, 95, 99])
            print(f"{clients:>8}{rate:>10.1f}{raw_rate:>12.1f}{rate / raw_rate:>7.0%}{p50:>9.1f}{p95:>9.1f}"
                  f"{p99:>9.1f}{errors:>8}{client_ms:>19.2f}")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        server.stop()
    if args.loop_probe_mb > 0:
        probe_table(env, args.loop_probe_mb)


if __name__ == "__main__":
    main()
