"""Service throughput under concurrent HTTP load next to the raw pipeline's, measured in one run.

    python benchmarks/service.py --images 128 --clients 8

Starts ``crfiqa serve`` on a free loopback port, sends each image as its own multipart request from
N concurrent clients (one asyncio loop, so the load generator costs little CPU), and prints images/s
and p50/p95/p99 latency beside the in-process pipeline's end-to-end images/s on the same images.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.pipeline import timed  # noqa: E402
from crfiqa.service.imaging import list_images  # noqa: E402
from crfiqa.service.pipeline import Pipeline, PipelineSettings  # noqa: E402
from tests.server import Server  # noqa: E402


async def load(url: str, payloads: list[tuple[str, bytes]], clients: int, rounds: int) -> tuple[float, list[float], int]:
    """Send every payload ``rounds`` times from ``clients`` concurrent clients; (seconds, latencies, errors)."""
    queue: asyncio.Queue = asyncio.Queue()
    for _ in range(rounds):
        for p in payloads:
            queue.put_nowait(p)
    latencies: list[float] = []
    errors = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal errors
        while not queue.empty():
            name, data = queue.get_nowait()
            t = time.perf_counter()
            r = await c.post(url + "/v1/quality", files=[("images", (name, data))])
            latencies.append(time.perf_counter() - t)
            errors += r.status_code != 200

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        return time.perf_counter() - t0, latencies, errors


def main(argv: list[str] | None = None) -> None:
    """Measure and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lfw" / "images")
    ap.add_argument("--models-dir", type=Path, default=REPO.parent / "shared" / "models")
    ap.add_argument("--providers", default="CPUExecutionProvider")
    ap.add_argument("--env", action="append", default=[], help="extra server setting NAME=VALUE")
    args = ap.parse_args(argv)
    paths = list_images([args.data])[: args.images]
    payloads = [(p.name, p.read_bytes()) for p in paths]

    pipe = Pipeline(PipelineSettings(models_dir=args.models_dir, providers=tuple(args.providers.split(","))))
    list(pipe.run(paths[:4]))  # load + warm up
    raw_rate = len(paths) / timed(lambda: list(pipe.run(paths)), 2)
    del pipe

    env = {"CRFIQA_MODELS_DIR": str(args.models_dir), "CRFIQA_PROVIDERS": args.providers, "CRFIQA_LOG_LEVEL": "warning"}
    env.update(dict(kv.split("=", 1) for kv in args.env))
    server = Server(env=env)
    try:
        server.wait_ready()
        asyncio.run(load(server.url, payloads[:8], 4, 1))  # warm the connection path
        print(f"\nservice benchmark: {len(paths)} LFW images x {args.rounds}, one image per request "
              f"({args.providers}); raw pipeline end to end: {raw_rate:.1f} images/s")
        print(f"{'clients':>8}{'images/s':>10}{'vs raw':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
        for clients in (int(c) for c in args.clients.split(",")):
            seconds, lat, errors = asyncio.run(load(server.url, payloads, clients, args.rounds))
            rate = len(lat) / seconds
            p50, p95, p99 = np.percentile(np.array(lat) * 1000, [50, 95, 99])
            print(f"{clients:>8}{rate:>10.1f}{rate / raw_rate:>7.0%}{p50:>9.1f}{p95:>9.1f}{p99:>9.1f}{errors:>8}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
