"""GPU numbers in one run (called by benchmarks/gpu.sh): quality faces/s (fp32, fp16), detection and end to end img/s.

    python benchmarks/gpu_bench.py --models-dir ../shared/models            # on a CUDA machine
    python benchmarks/gpu_bench.py --allow-cpu --images 16 --seconds 0.5    # dry run of the script on a CPU

Every session is checked to really run on CUDAExecutionProvider (ONNX Runtime silently falls back to the CPU
when onnxruntime and onnxruntime-gpu are installed together, or CUDA/cuDNN libraries are missing): the script
exits non-zero otherwise. fp16 is the quality model converted with onnxconverter-common (inputs and outputs
kept float32); its scores are compared with fp32 on real aligned faces before it is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from crfiqa.service.align import align_face
from crfiqa.service.detect.batched import BatchedSCRFD
from crfiqa.service.facemodel import QualityModel, calibrate
from crfiqa.service.imaging import list_images
from crfiqa.service.pipeline import Pipeline, PipelineSettings, Prepared
from crfiqa.service.preprocess import to_blob
from crfiqa.service.registry import resolve
from crfiqa.training.optimise import to_float16

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CRFIQA_SHARED", REPO.parent / "shared"))
CUDA = "CUDAExecutionProvider"


def check_provider(name: str, provider: str, allow_cpu: bool) -> None:
    """Exit unless ``provider`` is CUDA (or the dry run allows the CPU)."""
    print(f"  {name}: {provider}")
    if provider != CUDA and not allow_cpu:
        sys.exit(f"{name} runs on {provider}, not {CUDA}: is the CPU onnxruntime installed next to onnxruntime-gpu, "
                 f"or are CUDA/cuDNN missing? (available: {ort.get_available_providers()})")


def timed_rate(fn, items: int, seconds: float) -> float:
    """Items/s of repeated ``fn()`` calls for about ``seconds``, after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or n < 2:
        fn()
        n += 1
    return n * items / elapsed


def quality_table(model: QualityModel, model16: QualityModel | None, crops: np.ndarray, sizes: list[int],
                  seconds: float) -> None:
    """Faces/s at each batch size, fp32 and fp16."""
    print(f"\nquality model {model.entry.name} (faces/s)")
    print(f"{'batch':>8}{'fp32':>12}{'fp16':>12}")
    for b in sizes:
        batch = np.resize(crops, (b, *crops.shape[1:]))
        blob = to_blob(batch, model.entry.input)
        row = []
        for m in (model, model16):
            if m is None:
                row.append(float("nan"))
                continue
            row.append(timed_rate(lambda m=m, blob=blob: m.session.run(["quality"], {m.input_name: blob}), b, seconds))
        print(f"{b:>8}{row[0]:>12.1f}{row[1]:>12.1f}")


def fp16_parity(model: QualityModel, model16: QualityModel, crops: np.ndarray) -> tuple[float, float]:
    """(largest |score difference| in 0-100 points, smallest embedding cosine) of fp16 vs fp32."""
    q32, e32 = model.run(crops, ["quality", "embedding"])
    q16, e16 = model16.run(crops, ["quality", "embedding"])
    cal = model.entry.calibration
    diff = float(np.abs(calibrate(q32[:, 0], cal) - calibrate(q16[:, 0], cal)).max())
    cos = (e32 * e16).sum(1) / (np.linalg.norm(e32, axis=1) * np.linalg.norm(e16, axis=1))
    return diff, float(cos.min())


def main(argv: list[str] | None = None) -> None:
    """Print the tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", default=str(SHARED / "models"))
    ap.add_argument("--images", type=int, default=512, help="LFW dev images for detection and end to end")
    ap.add_argument("--batch-sizes", default="1,32,128")
    ap.add_argument("--detect-batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--allow-cpu", action="store_true", help="dry run: do not require CUDA")
    ap.add_argument("--fp16-max-score-diff", type=float, default=1.0, help="points on the 0-100 scale")
    args = ap.parse_args(argv)
    providers = (CUDA, "CPUExecutionProvider")
    print(f"onnxruntime {ort.__version__}, available providers: {ort.get_available_providers()}")
    if CUDA not in ort.get_available_providers() and not args.allow_cpu:
        sys.exit(f"{CUDA} is not available in this onnxruntime build")
    paths = sorted(list_images([SHARED / "data" / "lfw" / "images"]))[: args.images]
    pipe = Pipeline(PipelineSettings(providers=providers, models_dir=Path(args.models_dir), batch_size=128))
    pipe.load()
    check_provider("detector", pipe.detector.provider, args.allow_cpu)
    check_provider("quality", pipe.quality.provider, args.allow_cpu)
    images = [pipe.decode(p) for p in paths]
    prepared = [pipe.prepare(("img", im)) for im in images]
    crops = np.concatenate([p.crops for p in prepared if len(p.crops)])
    print(f"{len(images)} LFW images, {len(crops)} faces")

    # -- quality model: fp32 and fp16 ---------------------------------------------------------------------------
    model = pipe.quality
    model16 = None
    with tempfile.TemporaryDirectory() as tmp:
        path16 = to_float16(model.path, Path(tmp) / "quality_fp16.onnx")
        model16 = QualityModel(path16, model.entry, providers)
        check_provider("quality fp16", model16.provider, args.allow_cpu)
        diff, cos = fp16_parity(model, model16, crops[:256])
        clean = diff <= args.fp16_max_score_diff
        print(f"fp16 vs fp32 on {min(256, len(crops))} faces: largest score difference {diff:.3f} points, "
              f"smallest embedding cosine {cos:.5f} -> {'clean' if clean else 'NOT clean: fp16 not used'}")
        quality_table(model, model16 if clean else None, crops, [int(b) for b in args.batch_sizes.split(",")],
                      args.seconds)

    # -- detection: per image and batched -----------------------------------------------------------------------
    det_path, det_entry = resolve(pipe.detector_name, "detector", pipe.manifest, Path(args.models_dir))
    batched = BatchedSCRFD(det_path, pipe.detector.settings, providers, 0, det_entry.detector)
    check_provider("batched detector", batched.batch_session.get_providers()[0], args.allow_cpu)
    rgbs = [im.rgb for im in images]
    per_image = timed_rate(lambda: [pipe.detect(r) for r in rgbs], len(rgbs), args.seconds)
    groups = _by_shape(rgbs, batched)
    bs = args.detect_batch

    def detect_batched() -> list:
        out = []
        for group in groups:
            for i in range(0, len(group), bs):
                out += batched.detect_batch(group[i:i + bs])
        return out

    batched_rate = timed_rate(detect_batched, len(rgbs), args.seconds)
    print(f"\ndetection {pipe.detector_name} (img/s): per image {per_image:.1f}, batched x{bs} {batched_rate:.1f}")

    # -- end to end ----------------------------------------------------------------------------------------------
    e2e = timed_rate(lambda: list(pipe.run(paths)), len(paths), args.seconds)

    def batched_e2e() -> None:
        decoded = [(str(p), pipe.decode(p)) for p in paths]
        for group in _by_shape(decoded, batched, key=lambda item: item[1].rgb):
            for i in range(0, len(group), bs):
                chunk = group[i:i + bs]
                dets = batched.detect_batch([im.rgb for _, im in chunk])
                preps = [Prepared(name, im, ds, np.stack([align_face(im.rgb, f.landmarks) for f in ds])
                                  if ds else np.zeros((0, 112, 112, 3), np.uint8), width=im.width, height=im.height)
                         for (name, im), ds in zip(chunk, dets)]
                pipe.score_prepared(preps)

    e2e_batched = timed_rate(batched_e2e, len(paths), args.seconds)
    print(f"end to end (decode, detect, align, score; img/s): Pipeline.run {e2e:.1f}, "
          f"with batched detection {e2e_batched:.1f}")


def _by_shape(items: list, detector: BatchedSCRFD, key=lambda x: x) -> list[list]:
    """Group items (images, or objects holding one) by the detector's network input shape."""
    groups: dict[tuple, list] = {}
    for item in items:
        h, w = key(item).shape[:2]
        groups.setdefault(detector.input_shape(h, w, detector.settings)[1:], []).append(item)
    return list(groups.values())


if __name__ == "__main__":
    main()
