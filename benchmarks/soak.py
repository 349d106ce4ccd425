"""Soak test: does the service leak memory or file descriptors under steady load?

    python benchmarks/soak.py --minutes 10 --clients 2

Starts ``crfiqa serve`` on a free loopback port, keeps M clients sending requests (LFW images, one per
multipart request, with a bad image and a JSON request mixed in) for N minutes, samples the server's RSS and
open file descriptors every 10 s, and prints the samples and their least-squares slopes after the warm-up.
Goal: RSS slope < 1 MB/min after warm-up over 10 minutes, fds flat.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crfiqa.service.imaging import list_images  # noqa: E402
from tests.server import Server, rss_mib  # noqa: E402


def open_fds(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_min(t_s: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y per minute."""
    return float(np.polyfit(t_s / 60.0, y, 1)[0]) if len(t_s) >= 2 else float("nan")


async def run(url: str, payloads: list[tuple[str, bytes]], clients: int, seconds: float, pid: int,
              every_s: float) -> tuple[list[tuple[float, float, int, int]], int, int]:
    """Load for ``seconds``; samples (t, rss, fds, requests so far), requests, non-200 answers."""
    stop = time.monotonic() + seconds
    done = errors = 0
    samples: list[tuple[float, float, int, int]] = []
    bad = ("bad.jpg", payloads[0][1][:2000])  # a truncated image: an error result, never a failed request
    as_json = {"images": [{"data": base64.b64encode(payloads[0][1]).decode(), "id": "j"}]}

    async def client(i: int) -> None:
        nonlocal done, errors
        async with httpx.AsyncClient(timeout=120) as c:
            k = i
            while time.monotonic() < stop:
                k += 1
                if k % 50 == 0:
                    r = await c.post(url + "/v1/quality", json=as_json)
                else:
                    name, data = bad if k % 25 == 0 else payloads[k % len(payloads)]
                    r = await c.post(url + "/v1/quality", files=[("images", (name, data))])
                done += 1
                errors += r.status_code != 200

    async def sampler() -> None:
        t0 = time.monotonic()
        while time.monotonic() < stop:
            samples.append((time.monotonic() - t0, rss_mib(pid), open_fds(pid), done))
            await asyncio.sleep(every_s)
        samples.append((time.monotonic() - t0, rss_mib(pid), open_fds(pid), done))

    await asyncio.gather(sampler(), *(client(i) for i in range(clients)))
    return samples, done, errors


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print samples and slopes; exit 1 when a goal is missed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--warmup-minutes", type=float, default=2.0, help="samples before this are not in the slopes")
    ap.add_argument("--every", type=float, default=10.0, help="sampling period, seconds")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lfw" / "images")
    ap.add_argument("--models-dir", type=Path, default=REPO.parent / "shared" / "models")
    ap.add_argument("--providers", default="CPUExecutionProvider")
    ap.add_argument("--env", action="append", default=[], help="extra server setting NAME=VALUE")
    args = ap.parse_args(argv)
    payloads = [(p.name, p.read_bytes()) for p in list_images([args.data])[: args.images]]
    env = {"CRFIQA_MODELS_DIR": str(args.models_dir), "CRFIQA_PROVIDERS": args.providers,
           "CRFIQA_LOG_LEVEL": "warning", **dict(kv.split("=", 1) for kv in args.env)}
    server = Server(env=env)
    try:
        server.wait_ready()
        samples, done, errors = asyncio.run(run(server.url, payloads, args.clients, 60 * args.minutes,
                                                server.proc.pid, args.every))
    finally:
        server.stop()
    print(f"\nsoak: {args.minutes:g} min, {args.clients} clients, {done} requests, {errors} non-200 "
          f"({args.providers}); sampled every {args.every:g} s")
    print(f"{'t s':>7}{'RSS MiB':>10}{'fds':>6}{'requests':>10}")
    for t, rss, fds, n in samples:
        print(f"{t:>7.0f}{rss:>10.1f}{fds:>6}{n:>10}")
    arr = np.array([(t, rss, fds) for t, rss, fds, _ in samples if t >= 60 * args.warmup_minutes])
    rss_slope = slope_per_min(arr[:, 0], arr[:, 1]) if len(arr) else float("nan")
    fd_slope = slope_per_min(arr[:, 0], arr[:, 2]) if len(arr) else float("nan")
    fds_flat = len(arr) > 0 and arr[:, 2].max() - arr[:, 2].min() <= 2
    print(f"after {args.warmup_minutes:g} min warm-up ({len(arr)} samples): RSS slope {rss_slope:+.3f} MiB/min "
          f"(goal < 1), fd slope {fd_slope:+.3f}/min, fds {int(arr[:, 2].min()) if len(arr) else 0}-"
          f"{int(arr[:, 2].max()) if len(arr) else 0} ({'flat' if fds_flat else 'NOT flat'})")
    return 0 if rss_slope < 1.0 and fds_flat and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
