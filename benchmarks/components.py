"""Cost of the quality components against the per-face time of the pipeline at its default settings.

    python benchmarks/components.py --images 64 --models-dir ../shared/models

Two measures, in one run on the same images: (1) the components alone (``face_components`` on every face,
after prepare) per face against the end-to-end per-face time of ``Pipeline.run`` without components; (2)
``Pipeline.run`` with ``Options(components=True)`` against without (the thread pool may hide part of the
cost, so (1) is the bound the issue's 10 % goal is checked on). Rounds alternate on/off; each keeps its best.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from crfiqa.service.components import face_components
from crfiqa.service.pipeline import Options, Pipeline, PipelineSettings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def measure(pipe: Pipeline, paths: list[Path], rounds: int) -> dict:
    """Best-of-``rounds`` seconds: run without/with components, and the components alone."""
    pipe.load()
    prepared = [pipe.prepare(p) for p in paths]
    faces = [(p.image.rgb, d, c) for p in prepared if p.image is not None
             for d, c in zip(p.detections, p.crops)]
    best = {"run_off": float("inf"), "run_on": float("inf"), "components": float("inf")}
    cpu = dict(best)
    list(pipe.run(paths[:4], Options(components=True)))  # warm-up
    for _ in range(rounds):
        for key, opts in (("run_off", Options()), ("run_on", Options(components=True))):
            t, c = time.perf_counter(), time.process_time()
            list(pipe.run(paths, opts))
            best[key] = min(best[key], time.perf_counter() - t)
            cpu[key] = min(cpu[key], time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        for rgb, det, crop in faces:
            face_components(rgb, det, crop)
        best["components"] = min(best["components"], time.perf_counter() - t)
        cpu["components"] = min(cpu["components"], time.process_time() - c)
    n = len(faces)
    return {
        # CPU seconds of the process (all threads): less sensitive to other jobs on a shared machine.
        "face_cpu_ms_pipeline": 1e3 * cpu["run_off"] / n,
        "face_cpu_ms_components": 1e3 * cpu["components"] / n,
        "cpu_ratio_components_to_face": cpu["components"] / cpu["run_off"],
        "images": len(paths), "faces": n,
        "face_ms_pipeline": 1e3 * best["run_off"] / n,
        "face_ms_components": 1e3 * best["components"] / n,
        "ratio_components_to_face": best["components"] / best["run_off"],
        "face_ms_pipeline_with_components": 1e3 * best["run_on"] / n,
        "ratio_run_on_to_off": best["run_on"] / best["run_off"],
    }


def main(argv: list[str] | None = None) -> dict:
    """Parse flags, measure, print a table (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64, help="LFW dev images (plus the 6-face group photo)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models-dir", type=Path, default=SHARED / "models")
    ap.add_argument("--providers", default="CPUExecutionProvider")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    paths = sorted((SHARED / "data" / "lfw" / "images").rglob("*.jpg"))[: args.images]
    paths.append(SHARED / "data" / "samples" / "t1.jpg")
    pipe = Pipeline(PipelineSettings(models_dir=args.models_dir, providers=tuple(args.providers.split(","))))
    r = measure(pipe, paths, args.rounds)
    print(f"# components cost ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{r['images']} images, {r['faces']} faces, default settings, best of {args.rounds})")
    print("| measure | wall ms per face | CPU ms per face |")
    print("|---|---:|---:|")
    print(f"| pipeline run (decode, detect, align, score) | {r['face_ms_pipeline']:.2f} "
          f"| {r['face_cpu_ms_pipeline']:.2f} |")
    print(f"| components alone | {r['face_ms_components']:.3f} | {r['face_cpu_ms_components']:.3f} |")
    print(f"| pipeline run with components | {r['face_ms_pipeline_with_components']:.2f} | |")
    print(f"\ncomponents / per-face pipeline time = {100 * r['ratio_components_to_face']:.1f} % wall, "
          f"{100 * r['cpu_ratio_components_to_face']:.1f} % CPU (goal <= 10 %)")
    print(f"run with / without components = {r['ratio_run_on_to_off']:.3f}")
    if args.json:
        print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
