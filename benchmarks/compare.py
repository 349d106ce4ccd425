"""crfiqa end to end next to the naive insightface chain, on the same images in one run; prints the ratio.

    python benchmarks/compare.py --images 256 --rounds 3

The naive chain is what gluing insightface together gives: ``cv2.imread``, insightface's SCRFD at 640x640,
``face_align.norm_crop`` and w600k_mbf in ONNX Runtime, one face at a time, sessions with ONNX Runtime's
default threads. crfiqa is ``Pipeline.run`` with its defaults (what ``crfiqa score`` runs). Rounds
alternate between the two so a machine shared with other jobs slows both alike; each side's best round
counts, and the load average is printed beside the numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crfiqa.service.imaging import list_images  # noqa: E402
from crfiqa.service.pipeline import Pipeline, PipelineSettings  # noqa: E402

TARGET_IMG_S, TARGET_RATIO = 60.0, 2.0  # issue 13, goal 4


class NaiveChain:
    """insightface SCRFD (640) + norm_crop + w600k_mbf, batch 1, default ONNX Runtime sessions."""

    def __init__(self, models_dir: Path) -> None:
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX
        from insightface.model_zoo.scrfd import SCRFD

        self.det = SCRFD(model_file=str(models_dir / "det" / "scrfd_500m.onnx"))
        self.det.prepare(-1, input_size=(640, 640), det_thresh=0.5)
        self.rec = ArcFaceONNX(model_file=str(models_dir / "fr" / "insightface_w600k_mbf.onnx"))
        self.rec.prepare(-1)

    def __call__(self, path: Path) -> list[float]:
        """Quality of every face of one image (the embedding's L2 norm, MagFace-style)."""
        from insightface.utils import face_align

        img = cv2.imread(str(path))
        _, kpss = self.det.detect(img, input_size=(640, 640))
        out = []
        for kps in kpss if kpss is not None else []:
            emb = self.rec.get_feat(face_align.norm_crop(img, kps))
            out.append(float(np.linalg.norm(emb)))
        return out


def best_rate(fn, n: int) -> float:
    """Images/s of one call of ``fn`` over ``n`` images."""
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict:
    """Run both chains, alternating, and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lfw" / "images")
    ap.add_argument("--models-dir", type=Path, default=REPO.parent / "shared" / "models")
    args = ap.parse_args(argv)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # SCRFD's declared 640 output shapes warn at other sizes
    warnings.filterwarnings("ignore", category=FutureWarning)  # insightface's skimage deprecation
    paths = list_images([args.data])[: args.images]
    naive = NaiveChain(args.models_dir)
    pipe = Pipeline(PipelineSettings(models_dir=args.models_dir, providers=("CPUExecutionProvider",)))
    for p in paths[:8]:  # warm both: sessions, allocators, page cache
        naive(p)
    list(pipe.run(paths[:16]))
    load0 = os.getloadavg()[0]
    rates: dict[str, list[float]] = {"naive": [], "crfiqa": []}
    for _ in range(args.rounds):
        rates["naive"].append(best_rate(lambda: [naive(p) for p in paths], len(paths)))
        rates["crfiqa"].append(best_rate(lambda: list(pipe.run(paths)), len(paths)))
    load1 = os.getloadavg()[0]
    faces = sum(len(r.faces) for r, _ in pipe.run(paths[:64]))
    best = {k: max(v) for k, v in rates.items()}
    ratio = best["crfiqa"] / best["naive"]
    print(f"\ncompare: {len(paths)} LFW images ({faces} faces in the first 64), {args.rounds} alternating rounds, "
          f"{os.cpu_count()} cores, load average {load0:.1f} -> {load1:.1f}")
    print(f"{'chain':<66}{'best img/s':>11}   rounds")
    print(f"{'naive: insightface SCRFD-500m 640 + norm_crop + w600k_mbf, bs 1':<66}{best['naive']:>11.1f}   "
          + " / ".join(f"{r:.1f}" for r in rates["naive"]))
    print(f"{'crfiqa: Pipeline.run, defaults (detection at image size, overlap)':<66}{best['crfiqa']:>11.1f}   "
          + " / ".join(f"{r:.1f}" for r in rates["crfiqa"]))
    per_round = [c / n for c, n in zip(rates["crfiqa"], rates["naive"])]
    print(f"ratio crfiqa / naive: {ratio:.2f}x (per round {' / '.join(f'{r:.2f}' for r in per_round)}); "
          f"targets >= {TARGET_IMG_S:.0f} img/s: {'met' if best['crfiqa'] >= TARGET_IMG_S else 'NOT met'}, "
          f">= {TARGET_RATIO:.0f}x: {'met' if ratio >= TARGET_RATIO else 'NOT met'}")
    return {"naive": best["naive"], "crfiqa": best["crfiqa"], "ratio": ratio, "load": (load0, load1)}


if __name__ == "__main__":
    main()
