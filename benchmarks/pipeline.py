"""Throughput of each pipeline stage and end to end on LFW dev images; prints a table.

    python benchmarks/pipeline.py --images 256 --models-dir ../shared/models
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from crfiqa.service.imaging import list_images
from crfiqa.service.pipeline import Pipeline, PipelineSettings

REPO = Path(__file__).resolve().parents[1]


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(pipe: Pipeline, paths: list[Path], batch_sizes: list[int]) -> dict:
    """Per-stage and end-to-end rates (images/s, faces/s for align and score)."""
    images = [pipe.decode(p) for p in paths]
    rates: dict = {"images": len(paths)}
    rates["decode_img_s"] = len(paths) / timed(lambda: [pipe.decode(p) for p in paths])
    _ = pipe.detector
    pipe.detect(images[0].rgb)  # warm-up
    dets: list = []
    rates["detect_img_s"] = len(images) / timed(lambda: dets.__setitem__(slice(None), [pipe.detect(i.rgb) for i in images]))
    crops: list = []
    n_faces = sum(len(d) for d in dets)
    rates["faces"] = n_faces
    rates["align_face_s"] = n_faces / timed(lambda: crops.__setitem__(slice(None), [pipe.align(i.rgb, d) for i, d in zip(images, dets)]), 3)
    all_crops = np.concatenate([c for c in crops if len(c)])
    _ = pipe.quality
    for bs in batch_sizes:
        pipe.quality.predict(all_crops[:bs])  # warm-up at this batch size
        t = timed(lambda: [pipe.quality.predict(all_crops[i:i + bs]) for i in range(0, len(all_crops), bs)])
        rates[f"score_bs{bs}_face_s"] = len(all_crops) / t
        e2e = Pipeline(replace(pipe.settings, batch_size=bs), pipe.manifest)
        e2e.detector, e2e.quality = pipe.detector, pipe.quality  # same sessions, no reload
        t = timed(lambda: list(e2e.run(paths)))
        rates[f"e2e_bs{bs}_img_s"] = len(paths) / t
    return rates


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print the table (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lfw" / "images")
    ap.add_argument("--models-dir", type=Path, default=REPO.parent / "shared" / "models")
    ap.add_argument("--detector", default=None)
    ap.add_argument("--quality", default=None)
    ap.add_argument("--providers", default="", help="comma-separated (default: the best available)")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    paths = list_images([args.data])[: args.images]
    pipe = Pipeline(PipelineSettings(detector=args.detector, quality=args.quality, models_dir=args.models_dir,
                                     providers=tuple(p for p in args.providers.split(",") if p)))
    rates = measure(pipe, paths, [int(b) for b in args.batch_sizes.split(",")])
    rates.update(provider=pipe.quality.provider, detector=pipe.detector_name, quality=pipe.quality_name,
                 machine=f"{platform.machine()} {os.cpu_count()} cores")
    print(f"\npipeline benchmark: {rates['images']} images, {rates['faces']} faces, {rates['detector']} + "
          f"{rates['quality']} on {rates['provider']} ({rates['machine']})")
    print(f"{'stage':<28}{'rate':>12}")
    for key, value in rates.items():
        if key.endswith("_s"):
            unit = "faces/s" if "face_s" in key else "images/s"
            print(f"{key[:-2]:<28}{value:>10.1f} {unit}")
    if args.json:
        args.json.write_text(json.dumps(rates, indent=2))
    return rates


if __name__ == "__main__":
    main()
