"""Where one client's time goes: a lone request's stages, next to the pipelined in-process rate, in one run.

    python benchmarks/lone_request.py --images 80 --rounds 3

One client sends one image, waits for the answer, sends the next: nothing overlaps, so the 1-client service
rate is bounded by one image's latency, while ``Pipeline.run`` keeps every core busy with different images.
Rows (ms per image, same images, best of ``--rounds``):

- pipelined: ``Pipeline.run`` over all images (the in-process rate of ``benchmarks/service.py``);
- one at a time: ``prepare`` then ``score`` per image in one thread, back to back (solo sessions on);
- after an idle / a busy gap: the same with ``--gap-ms`` of sleep (cores idle) or of spinning between images
  (a request's HTTP work leaves the other core idle like this: on a VM an idle core comes back slower);
- service: sequential ``POST /v1/quality`` from this process, the client's round trip and the server's
  own ``timing_ms``;
- HTTP floor: the round trip of a request whose image does not decode (parsing, routing, a worker hop and
  an error answer; no model runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crfiqa.service.imaging import list_images  # noqa: E402
from crfiqa.service.pipeline import Options, Pipeline, PipelineSettings  # noqa: E402
from crfiqa.service.runtime import images_in_flight  # noqa: E402
from tests.server import Server  # noqa: E402


def one_at_a_time(pipe: Pipeline, sources: list[tuple[str, bytes]], gap: Callable[[], None] | None = None
                  ) -> tuple[float, float]:
    """Mean (prepare, score) ms of each image alone, ``gap`` run before each one."""
    opts = Options()
    prep, score = [], []
    for source in sources:
        if gap:
            gap()
        with images_in_flight(1):
            t0 = time.perf_counter()
            prepared = pipe.prepare(source, opts)
            t1 = time.perf_counter()
            pipe.score(pipe.batch_crops([prepared]))
            t2 = time.perf_counter()
        prep.append(t1 - t0)
        score.append(t2 - t1)
    return 1000 * float(np.mean(prep)), 1000 * float(np.mean(score))


def spin(seconds: float) -> None:
    """Busy-wait (the core stays awake)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def service_rows(url: str, sources: list[tuple[str, bytes]]) -> tuple[float, dict[str, float], float]:
    """(mean client round trip ms, mean server ``timing_ms``, mean round trip of an undecodable image)."""
    with httpx.Client(timeout=60) as c:
        for s in sources[:10]:
            c.post(url + "/v1/quality", files=[("images", s)])
        rtt, timing = [], []
        for s in sources:
            t = time.perf_counter()
            r = c.post(url + "/v1/quality", files=[("images", s)])
            rtt.append(time.perf_counter() - t)
            timing.append(r.json()["timing_ms"])
        junk = ("junk.jpg", b"\0" * len(sources[0][1]))
        floor = []
        for _ in range(len(sources)):
            t = time.perf_counter()
            c.post(url + "/v1/quality", files=[("images", junk)])
            floor.append(time.perf_counter() - t)
    return 1000 * float(np.mean(rtt)), {k: float(np.mean([t[k] for t in timing])) for k in timing[0]}, \
        1000 * float(np.mean(floor))


def main(argv: list[str] | None = None) -> None:
    """Measure and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gap-ms", type=float, default=4.0)
    ap.add_argument("--solo-threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lfw" / "images")
    ap.add_argument("--models-dir", type=Path, default=REPO.parent / "shared" / "models")
    args = ap.parse_args(argv)
    paths = list_images([args.data])[: args.images]
    sources = [(p.name, p.read_bytes()) for p in paths]
    pipe = Pipeline(PipelineSettings(models_dir=args.models_dir, providers=("CPUExecutionProvider",),
                                     intra_op_threads=1, solo_threads=args.solo_threads))
    list(pipe.run(paths[:4]))
    one_at_a_time(pipe, sources[:10])  # warm the solo sessions
    server = Server(env={"CRFIQA_MODELS_DIR": str(args.models_dir), "CRFIQA_PROVIDERS": "CPUExecutionProvider",
                         "CRFIQA_LOG_LEVEL": "warning", "CRFIQA_SOLO_THREADS": str(args.solo_threads)})
    gap_s = args.gap_ms / 1000
    best: dict[str, list[float]] = {}

    def keep(name: str, values: list[float]) -> None:
        """Keep the round with the lowest total (the last value)."""
        if name not in best or values[-1] < best[name][-1]:
            best[name] = values

    try:
        server.wait_ready()
        for _ in range(args.rounds):  # alternate every row each round: a noisy machine moves them alike
            t = time.perf_counter()
            list(pipe.run(paths))
            keep("pipelined (Pipeline.run)", [1000 * (time.perf_counter() - t) / len(paths)])
            for name, gap in (("one at a time", None), (f"after a {args.gap_ms:g} ms idle gap", lambda: time.sleep(gap_s)),
                              (f"after a {args.gap_ms:g} ms busy gap", lambda: spin(gap_s))):
                p, s = one_at_a_time(pipe, sources, gap)
                keep(name, [p, s, p + s])
            rtt, timing, floor = service_rows(server.url, sources)
            keep("service, 1 client (server's timing_ms)", [timing["prepare"], timing["quality"], timing["total"]])
            keep("service, 1 client (client round trip)", [rtt])
            keep("HTTP floor (undecodable image)", [floor])
    finally:
        server.stop()
    print(f"\nlone request: {len(paths)} LFW images, best of {args.rounds} (solo threads {args.solo_threads}; "
          f"load {os.getloadavg()[0]:.1f})")
    print(f"{'':>42}{'prepare':>9}{'score':>9}{'ms/img':>9}{'img/s':>8}")
    for name, v in best.items():
        cells = (f"{v[0]:>9.2f}{v[1]:>9.2f}" if len(v) == 3 else " " * 18) + f"{v[-1]:>9.2f}{1000 / v[-1]:>8.1f}"
        print(f"{name:>42}{cells}")
    pipelined = best["pipelined (Pipeline.run)"][-1]
    lower = best["one at a time"][-1] + best["HTTP floor (undecodable image)"][-1]
    print(f"1 client / pipelined: measured {pipelined / best['service, 1 client (client round trip)'][-1]:.0%}; "
          f"bound from one-at-a-time + HTTP floor {pipelined / lower:.0%}")


if __name__ == "__main__":
    main()
