"""Throughput of each pipeline stage, end to end, by thread layout and by image size / faces per image.

    python benchmarks/pipeline.py --images 256                 # stages + end to end
    python benchmarks/pipeline.py --images 128 --sweep         # thread layouts (prepare, score, ORT threads)
    python benchmarks/pipeline.py --growth --images 96         # img/s by image size and faces per image

CPU time per image (all threads of the process) is printed beside wall-clock rates: on a machine shared
with other jobs the wall rate says how much of the machine this process got, the CPU time how much work
one image costs; a layout that keeps every core busy reaches ``cores / CPU time`` on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crfiqa.service.align import align_face  # noqa: E402
from crfiqa.service.detect import DetectorSettings  # noqa: E402
from crfiqa.service.imaging import list_images  # noqa: E402
from crfiqa.service.pipeline import Pipeline, PipelineSettings, Source  # noqa: E402

SAMPLES = REPO.parent / "shared" / "data" / "samples"


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def clocked(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def load() -> str:
    """The 1-minute load average, for the table headers."""
    return f"{os.getloadavg()[0]:.1f}"


def stages(pipe: Pipeline, paths: list[Path], batch_sizes: list[int]) -> dict:
    """Per-stage rates (images/s; faces/s for align and score) and end to end with the pipeline's settings."""
    images = [pipe.decode(p) for p in paths]
    rates: dict = {"images": len(paths)}
    rates["decode_img_s"] = len(paths) / timed(lambda: [pipe.decode(p) for p in paths])
    pipe.load()
    for label, det in (("detect_auto", None), ("detect_640", DetectorSettings(input_size=640))):
        s = pipe.detection_settings() if det is None else det
        pipe.detect(images[0].rgb, s)  # warm-up at this size
        rates[f"{label}_img_s"] = len(images) / timed(lambda s=s: [pipe.detect(i.rgb, s) for i in images])
    dets = [pipe.detect(i.rgb) for i in images]
    pairs = [(i, d) for i, ds in zip(images, dets) for d in ds]
    rates["faces"] = len(pairs)
    rates["align_face_s"] = len(pairs) / timed(lambda: [align_face(i.rgb, d.landmarks) for i, d in pairs], 3)
    crops = np.stack([align_face(i.rgb, d.landmarks) for i, d in pairs])
    for bs in batch_sizes:
        pipe.score(crops[:bs])  # warm-up at this batch size
        rates[f"score_bs{bs}_face_s"] = len(crops) / timed(
            lambda bs=bs: [pipe.score(crops[i:i + bs]) for i in range(0, len(crops), bs)])
    list(pipe.run(paths[:16]))
    wall, cpu = clocked(lambda: list(pipe.run(paths)))
    rates["e2e_img_s"] = len(paths) / wall
    rates["e2e_cpu_ms_img"] = 1000 * cpu / len(paths)
    return rates


#: Thread layouts of --sweep: (prepare threads, score threads, ONNX Runtime threads per call; 0 = all cores).
LAYOUTS = [(2, 2, 1), (2, 1, 1), (1, 1, 1), (2, 2, 0), (2, 1, 0), (1, 1, 0)]


def sweep(base: PipelineSettings, paths: list[Path], rounds: int) -> list[dict]:
    """End to end for each thread layout, rounds alternating between layouts; best wall rate, least CPU."""
    pipes = {lay: Pipeline(replace(base, decode_workers=lay[0], score_workers=lay[1], intra_op_threads=lay[2]))
             for lay in LAYOUTS}
    for p in pipes.values():
        list(p.run(paths[:16]))
    runs: dict[tuple, list[tuple[float, float]]] = {lay: [] for lay in LAYOUTS}
    for _ in range(rounds):
        for lay, p in pipes.items():
            runs[lay].append(clocked(lambda p=p: list(p.run(paths))))
    rows = []
    for lay, v in runs.items():
        rows.append({"prepare": lay[0], "score": lay[1], "ort_threads": lay[2],
                     "img_s": max(len(paths) / w for w, _ in v),
                     "cpu_ms_img": min(1000 * c / len(paths) for _, c in v),
                     "cores_used": max(c / w for w, c in v)})
    return rows


def tile(rgb: np.ndarray, n: int) -> np.ndarray:
    """``n`` x ``n`` copies of an image side by side."""
    return np.concatenate([np.concatenate([rgb] * n, axis=1)] * n, axis=0)


def growth(pipe: Pipeline, paths: list[Path], count: int) -> list[dict]:
    """End-to-end img/s on encoded JPEGs of growing size (LFW faces upscaled) and face count (t1 tiled)."""
    lfw = [cv2.imread(str(p)) for p in paths[:count]]
    t1 = cv2.imread(str(SAMPLES / "t1.jpg"))
    cases: list[tuple[str, str, list[np.ndarray]]] = [
        (f"{side} px", "1 face (LFW, upscaled)", [cv2.resize(im, (side, side), interpolation=cv2.INTER_CUBIC)
                                                 for im in lfw]) for side in (250, 640, 1280, 1920)]
    cases += [("1280x886", "6 faces (t1.jpg)", [t1] * count),
              ("2560x1772", "24 faces (t1.jpg 2x2)", [tile(t1, 2)] * count)]
    rows = []
    for size, what, bgr in cases:
        sources: list[Source] = [(f"{i}.jpg", cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes())
                                 for i, im in enumerate(bgr)]
        list(pipe.run(sources[:4]))  # warm-up at this size
        results: list = []
        wall, cpu = clocked(lambda s=sources, out=results: out.extend(r for r, _ in pipe.run(s)))
        faces = np.mean([len(r.faces) for r in results])
        rows.append({"size": size, "content": what, "faces_found": float(faces), "img_s": len(sources) / wall,
                     "faces_s": faces * len(sources) / wall, "cpu_ms_img": 1000 * cpu / len(sources)})
    return rows


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
    ap.add_argument("--sweep", action="store_true", help="end to end for each thread layout instead")
    ap.add_argument("--growth", action="store_true", help="img/s by image size and faces per image instead")
    ap.add_argument("--rounds", type=int, default=2, help="--sweep: alternating rounds")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    paths = list_images([args.data])[: args.images]
    settings = PipelineSettings(detector=args.detector, quality=args.quality, models_dir=args.models_dir,
                                providers=tuple(p for p in args.providers.split(",") if p))
    pipe = Pipeline(settings)
    machine = f"{platform.machine()} {os.cpu_count()} cores"
    out: dict = {"machine": machine, "load_before": load()}
    if args.sweep:
        out["layouts"] = rows = sweep(settings, paths, args.rounds)
        print(f"\nthread layouts: {len(paths)} LFW images, {args.rounds} alternating rounds ({machine}, "
              f"load {out['load_before']} -> {load()})")
        print(f"{'prepare':>8}{'score':>7}{'ORT thr':>9}{'img/s':>8}{'CPU ms/img':>12}{'cores used':>12}")
        for r in rows:
            print(f"{r['prepare']:>8}{r['score']:>7}{r['ort_threads']:>9}{r['img_s']:>8.1f}{r['cpu_ms_img']:>12.1f}"
                  f"{r['cores_used']:>12.2f}")
    elif args.growth:
        out["growth"] = rows = growth(pipe, paths, min(args.images, 96))
        print(f"\ncost growth: {min(args.images, 96)} JPEGs per row, {pipe.detector_name} + {pipe.quality_name}, "
              f"defaults ({machine}, load {out['load_before']} -> {load()})")
        print(f"{'image':<12}{'content':<26}{'faces':>6}{'img/s':>8}{'faces/s':>9}{'CPU ms/img':>12}")
        for r in rows:
            print(f"{r['size']:<12}{r['content']:<26}{r['faces_found']:>6.1f}{r['img_s']:>8.1f}{r['faces_s']:>9.1f}"
                  f"{r['cpu_ms_img']:>12.1f}")
    else:
        out.update(stages(pipe, paths, [int(b) for b in args.batch_sizes.split(",")]))
        print(f"\npipeline benchmark: {out['images']} images, {out['faces']} faces, {pipe.detector_name} + "
              f"{pipe.quality_name} on {pipe.quality.provider} ({machine}, load {out['load_before']} -> {load()})")
        print(f"{'stage':<28}{'rate':>12}")
        for key, value in out.items():
            if key.endswith("_s"):
                unit = "faces/s" if "face_s" in key else "images/s"
                print(f"{key[:-2]:<28}{value:>10.1f} {unit}")
        print(f"{'e2e CPU per image':<28}{out['e2e_cpu_ms_img']:>10.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
