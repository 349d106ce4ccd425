"""Detection sized to the image against insightface's fixed 640x640: recall, landmark differences and speed.

    python benchmarks/detect_size.py                      # all 1,549 LFW dev images and t1.jpg
    python benchmarks/detect_size.py --images 300 --detector scrfd_2.5g

The reference is each image's detections at the fixed square input (``--det-size 640``); a reference face is
found again when a detection at the image's own size (the default, ``DetectorSettings.input_size = None``)
has landmarks within half its box width. Printed: faces found at 640, found again at the own size (all and
confident ones, score >= 0.65), faces found only at the own size, the centre face of each image (the one
``crfiqa score`` assesses), its landmark difference in pixels and as a fraction of the eye distance, and
detection images/s at both sizes (one ORT thread, the pipeline's default).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crfiqa.service.detect import DetectorSettings  # noqa: E402
from crfiqa.service.detect.base import select_one  # noqa: E402
from crfiqa.service.imaging import list_images, read_image  # noqa: E402
from crfiqa.service.pipeline import Pipeline, PipelineSettings  # noqa: E402
from tests.helpers import match_faces  # noqa: E402

CONFIDENT = 0.65  # background faces near the 0.5 threshold flip both ways between input sizes


def main(argv: list[str] | None = None) -> None:
    """Measure and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=0, help="first N LFW dev images (0 = all)")
    ap.add_argument("--detector", default="scrfd_500m")
    ap.add_argument("--fixed-size", type=int, default=640)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lfw" / "images")
    ap.add_argument("--t1", type=Path, default=REPO.parent / "shared" / "data" / "samples" / "t1.jpg")
    ap.add_argument("--models-dir", type=Path, default=REPO.parent / "shared" / "models")
    args = ap.parse_args(argv)
    pipe = Pipeline(PipelineSettings(models_dir=args.models_dir, detector=args.detector,
                                     providers=("CPUExecutionProvider",), intra_op_threads=1))
    pipe.load(quality=False)
    fixed, sized = DetectorSettings(input_size=args.fixed_size), DetectorSettings()
    paths = list_images([args.data])
    paths = paths[: args.images] if args.images else paths
    images = [read_image(p).rgb for p in paths]
    for rgb in images[:5]:  # warm both shapes
        pipe.detect(rgb, fixed), pipe.detect(rgb, sized)

    seconds = {"fixed": 0.0, "sized": 0.0}
    n_ref = n_found = n_conf = n_conf_found = n_only = n_centre = n_centre_found = 0
    centre_px: list[float] = []
    centre_rel: list[float] = []
    for rgb in images:
        t = time.perf_counter()
        ref = pipe.detect(rgb, fixed)
        seconds["fixed"] += time.perf_counter() - t
        t = time.perf_counter()
        got = pipe.detect(rgb, sized)
        seconds["sized"] += time.perf_counter() - t
        found = match_faces(ref, got)
        n_ref += len(ref)
        n_found += sum(d is not None for d in found)
        n_conf += sum(f.score >= CONFIDENT for f in ref)
        n_conf_found += sum(d is not None for f, d in zip(ref, found, strict=True) if f.score >= CONFIDENT)
        n_only += sum(d is None for d in match_faces(got, ref))
        if ref:
            (centre,) = select_one(ref, rgb.shape[1], rgb.shape[0], "center")
            (d,) = match_faces([centre], got)
            n_centre += 1
            if d is not None:
                n_centre_found += 1
                centre_px.append(d)
                centre_rel.append(d / float(np.linalg.norm(centre.landmarks[1] - centre.landmarks[0])))

    t1 = read_image(args.t1).rgb
    t1_ref, t1_got = pipe.detect(t1, fixed), pipe.detect(t1, sized)
    t1_d = match_faces(t1_ref, t1_got)
    t1_shape = pipe.detector.input_shape(*t1.shape[:2], sized)[1:]
    px, rel = np.array(centre_px), np.array(centre_rel)
    print(f"\ndetection sized to the image vs {args.fixed_size}x{args.fixed_size}: {args.detector}, "
          f"{len(images)} LFW dev images (load {os.getloadavg()[0]:.1f})")
    print(f"faces at {args.fixed_size}: {n_ref}; found again at the own size: {n_found} ({n_found / max(n_ref, 1):.1%}); "
          f"confident (score >= {CONFIDENT}): {n_conf_found} of {n_conf} ({n_conf_found / max(n_conf, 1):.1%}); "
          f"found only at the own size: {n_only}")
    print(f"centre face: found in {n_centre_found} of {n_centre} images; landmark difference px median "
          f"{np.median(px):.2f}, p95 {np.percentile(px, 95):.2f}, max {px.max():.2f}; as a share of the eye "
          f"distance median {np.median(rel):.1%}, p95 {np.percentile(rel, 95):.1%}")
    t1_max = max((d for d in t1_d if d is not None), default=float("nan"))
    print(f"t1.jpg {t1.shape[1]}x{t1.shape[0]} -> {t1_shape[1]}x{t1_shape[0]}: {len(t1_ref)} faces at "
          f"{args.fixed_size}, {sum(d is not None for d in t1_d)} found again, {len(t1_got)} in all; landmarks "
          f"within {t1_max:.2f} px")
    print(f"detection images/s: {args.fixed_size}x{args.fixed_size} {len(images) / seconds['fixed']:.1f}, "
          f"own size {len(images) / seconds['sized']:.1f} ({seconds['fixed'] / seconds['sized']:.1f}x)")


if __name__ == "__main__":
    main()
