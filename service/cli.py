"""The service's commands (detect, align, score, models): flags and runners; ``crfiqa.cli`` composes them.

This module imports nothing heavy at import time, so ``crfiqa --help`` stays fast and torch-free."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from crfiqa.service.errors import CrfiqaError

log = logging.getLogger("crfiqa")

CSV_COLUMNS = ["path", "status", "error_code", "face", "det_score", "x1", "y1", "x2", "y2",
               "quality_raw", "quality_score"]


def _at_least_zero(kind: type) -> Callable[[str], float]:
    """An argparse type: ``kind`` (int or float) of the text, refused when negative."""
    def parse(text: str) -> float:
        value = kind(text)
        if not value >= 0:  # NaN too
            raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def _detection_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that detects faces."""
    p.add_argument("paths", nargs="+", help="image files or directories (searched recursively)")
    p.add_argument("--detector", default=None, help="detector name from the manifest (default scrfd_500m)")
    p.add_argument("--det-size", type=int, default=None, help="detector input size in pixels (default: each image at its own size, up to 640)")
    p.add_argument("--det-threshold", type=float, default=None, help="detection score threshold (default 0.5)")
    p.add_argument("--max-faces", type=_at_least_zero(int), default=None, help="keep at most N faces per image (0 = all)")
    p.add_argument("--min-face-size", type=_at_least_zero(float), default=None,
                   help="drop faces whose shorter box side is smaller (px)")
    p.add_argument("--models-dir", type=Path, default=None, help="model directory (env CRFIQA_MODELS_DIR)")
    p.add_argument("--providers", default=None,
                   help="comma-separated ONNX Runtime providers (default CUDA then CPU, filtered by availability)")
    p.add_argument("--select", choices=["center", "largest", "score"], default=None,
                   help="keep one face per image: nearest the centre, largest, or highest score (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _pipeline(args: argparse.Namespace, quality: str | None = None):
    """Build a Pipeline from the ``CRFIQA_*`` environment overridden by CLI options."""
    from pydantic import ValidationError

    from crfiqa.service.pipeline import Pipeline
    from crfiqa.service.settings import Settings

    overrides = {"detector": args.detector, "quality_model": quality, "providers": args.providers,
                 "models_dir": args.models_dir, "det_size": args.det_size, "det_threshold": args.det_threshold}
    try:  # flags are validated like their CRFIQA_* variables (a bad one of either is a clear error)
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise CrfiqaError("invalid settings: " + "; ".join(
            f"{_setting_name(str(e['loc'][0]), overrides)}: {e['msg']}" for e in exc.errors()),
            code="bad_argument") from exc
    pipe = settings.pipeline_settings()
    det = pipe.detection.with_overrides(max_faces=args.max_faces, min_face_size=args.min_face_size)
    return Pipeline(replace(pipe, detection=det))


def _inputs(given: list[str], extensions: frozenset[str]) -> list[Path]:
    """The files of the arguments (folders expanded to ``extensions``); ``no_images`` when there are none."""
    from crfiqa.service.imaging import list_images

    paths = list_images(given, extensions)
    if not paths:
        raise CrfiqaError(f"no inputs in {' '.join(map(str, given))} (suffixes: {', '.join(sorted(extensions))})",
                          code="no_images")
    return paths


def _setting_name(field: str, flags: dict) -> str:
    """How the user set a setting: its flag (for those this command has) or its CRFIQA_* variable."""
    variable = f"CRFIQA_{field.upper()}"
    return f"--{field.replace('_', '-')} or {variable}" if field in flags else variable


def _iterate(args: argparse.Namespace, score: bool, quality: str | None = None):
    """Run the pipeline over the expanded paths with a progress bar; returns (paths, iterator of
    (ImageResult, Prepared))."""
    from tqdm import tqdm

    from crfiqa.service.imaging import IMAGE_EXTENSIONS
    from crfiqa.service.pipeline import Options

    paths = _inputs(args.paths, IMAGE_EXTENSIONS)
    pipe = _pipeline(args, quality)
    opts = Options(aligned=getattr(args, "aligned", False), resize_aligned=getattr(args, "resize_aligned", False),
                   select=args.select,
                   components=getattr(args, "components", False) or getattr(args, "annotate", None) is not None)
    results = pipe.run(paths, opts, score=score)
    bar = tqdm(results, total=len(paths), unit="img", file=sys.stderr, disable=args.quiet or len(paths) < 2)
    return paths, bar


def _exit_code(n_ok: int, n_total: int) -> int:
    """Non-zero only when nothing at all could be processed."""
    return 0 if n_ok > 0 or n_total == 0 else 1


def cmd_detect(args: argparse.Namespace) -> int:
    """Detect faces; print one JSON line per image."""
    paths, results = _iterate(args, score=False)
    n_ok = 0
    for result, _ in results:
        n_ok += result.ok
        print(json.dumps(result.to_dict()), flush=True)
    return _exit_code(n_ok, len(paths))


def cmd_align(args: argparse.Namespace) -> int:
    """Detect and write aligned 112x112 crops ``OUT/<input's relative path>_<k>.png``; one JSON line per image
    (a crop that cannot be written makes that image's line an error; the others go on)."""
    from crfiqa.service.imaging import mirror_paths, write_image

    paths, results = _iterate(args, score=False)
    targets = dict(zip(map(str, paths), mirror_paths(paths)))
    inputs = {p.resolve() for p in paths}  # how many crops each gets is known only after detection
    n_ok = 0
    for result, prepared in results:
        out = result.to_dict()
        rel = targets[result.source]
        out["crops"] = []
        try:
            for k, crop in enumerate(prepared.crops):
                target = args.out / rel.parent / f"{rel.name}_{k}.png"
                _refuse_overwriting(inputs, [target], "--out")
                write_image(target, crop)
                out["crops"].append(str(target))
        except CrfiqaError as exc:
            out["status"], out["error"] = "error", exc.to_dict()
        n_ok += out["status"] == "ok"
        print(json.dumps(out), flush=True)
    return _exit_code(n_ok, len(paths))


def _refuse_overwriting(inputs: set[Path], targets: list[Path], flag: str) -> None:
    """Raise when an output would replace one of the (resolved) inputs (``--annotate DIR`` on the input folder)."""
    clash = next((t for t in targets if t.resolve() in inputs), None)
    if clash is not None:
        raise CrfiqaError(f"{flag}: {clash} is one of the inputs and would be overwritten; choose another folder",
                          code="bad_argument")


def cmd_score(args: argparse.Namespace) -> int:
    """Detect, align and score; JSON lines on stdout, or a CSV/JSONL file with ``--out``."""
    from crfiqa.service.components import COMPONENT_NAMES

    paths, results = _iterate(args, score=True, quality=args.model)
    inputs = {p.resolve() for p in paths}
    if args.out is not None:
        _refuse_overwriting(inputs, [args.out], "--out")
    annotated = _annotation_targets(paths, inputs, args.annotate)
    n_ok = 0
    # surrogateescape: a file name that is not valid UTF-8 is written back as its own bytes, not a crash.
    out_fh = open(args.out, "w", newline="", encoding="utf-8", errors="surrogateescape") if args.out else None  # noqa: SIM115
    try:
        writer = None
        if out_fh is not None and args.out.suffix.lower() == ".csv":
            writer = csv.writer(out_fh)
            writer.writerow(CSV_COLUMNS + (list(COMPONENT_NAMES) if args.components else []))
        for result, prepared in results:
            n_ok += result.ok
            if annotated is not None and prepared.image is not None:
                _write_annotation(prepared.image.rgb, result, annotated[result.source])
            if not args.components:  # computed for the drawing's weakest component; output as asked
                for face in result.faces:
                    face.components = None
            if writer is not None:
                writer.writerows(_csv_rows(result, args.components))
            else:
                line = json.dumps(result.to_dict())
                print(line, file=out_fh or sys.stdout, flush=out_fh is None)
    finally:
        if out_fh is not None:
            out_fh.close()
    return _exit_code(n_ok, len(paths))


def _csv_rows(result, components: bool = False) -> list[list]:
    """One CSV row per face; an image with no face or an error still gets one row, so nothing is lost.
    With ``components``, one more column per component (its native value)."""
    from crfiqa.service.components import COMPONENT_NAMES

    code = result.error.code if result.error else ""
    status = "ok" if result.ok else "error"
    extra = len(COMPONENT_NAMES) if components else 0
    if not result.faces:
        return [[result.source, status, code, "", "", "", "", "", "", "", "", *([""] * extra)]]
    rows = []
    for k, face in enumerate(result.faces):
        d, q = face.detection, face.quality
        values = [f"{face.components[n].value:.5g}" if face.components else "" for n in COMPONENT_NAMES[:extra]]
        rows.append([result.source, status, code, k, f"{d.score:.5f}", *(f"{v:.2f}" for v in d.bbox),
                     f"{q.raw:.6f}" if q else "", f"{q.score:.3f}" if q else "", *values])
    return rows


def _annotation_targets(paths: list[Path], inputs: set[Path], directory: Path | None) -> dict[str, Path] | None:
    """``DIR/<input's relative path>.jpg`` for each input (None without --annotate)."""
    if directory is None:
        return None
    from crfiqa.service.imaging import mirror_paths

    targets = {str(p): directory / rel.parent / f"{rel.name}.jpg" for p, rel in zip(paths, mirror_paths(paths))}
    _refuse_overwriting(inputs, list(targets.values()), "--annotate")
    return targets


def _write_annotation(rgb, result, target: Path) -> None:
    """Draw the faces of one result on its image and write it as JPEG (a failure is a warning: the score
    of that image is still given)."""
    import cv2

    from crfiqa.service.annotate import annotate
    from crfiqa.service.imaging import write_image

    try:
        write_image(target, annotate(rgb, result), [cv2.IMWRITE_JPEG_QUALITY, 90])
    except CrfiqaError as exc:
        print(f"crfiqa: warning: {exc.code}: {exc.message}", file=sys.stderr)


def cmd_models(args: argparse.Namespace) -> int:
    """List, fetch or verify the models of the manifest."""
    from crfiqa.service import registry

    manifest = registry.Manifest.load()
    directory = args.models_dir or registry.models_dir()
    if args.action == "list":
        for name, e in manifest.entries.items():
            state = _state(e, directory)
            print(f"{name:16s} {e.role:12s} {state:10s} {e.file:34s} {e.licence}")
        return 0
    names = args.names or [n for n, e in manifest.entries.items() if args.action == "verify" or e.sha256_verified]
    failures = 0
    if args.action == "fetch":
        mirror = args.mirror or (Path(os.environ["CRFIQA_MODEL_MIRROR"]) if os.environ.get("CRFIQA_MODEL_MIRROR") else None)
        for name in names:
            from crfiqa.service.errors import CrfiqaError

            try:
                path = registry.fetch(manifest.get(name), directory, mirror, sha256=args.sha256, progress=not args.quiet)
                print(f"{name}: ok {path}")
            except CrfiqaError as exc:
                failures += 1
                print(f"{name}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1 if failures else 0
    for name in names:
        state = _state(manifest.get(name), directory)
        failures += state not in ("ok", "packaged")
        print(f"{name:16s} {state}")
    return 1 if failures else 0


def _state(entry, directory: Path) -> str:
    """ok / missing / mismatch (plus 'unverified-hash' for hashes not confirmed against the official file)."""
    from crfiqa.service import registry
    from crfiqa.service.errors import ModelError

    try:
        path = registry.locate(entry, directory)
        registry.verify_file(path, entry)
    except ModelError as exc:
        return "missing" if exc.code == "model_not_found" else "mismatch"
    return "ok" if entry.sha256_verified else "ok-unverified-hash"


def add_detect_arguments(p: argparse.ArgumentParser) -> None:
    """``crfiqa detect`` flags."""
    _detection_args(p)


def add_align_arguments(p: argparse.ArgumentParser) -> None:
    """``crfiqa align`` flags."""
    _detection_args(p)
    p.add_argument("--out", type=Path, required=True,
                   help="output directory; crops mirror the inputs' relative paths below it")


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    """``crfiqa score`` flags."""
    _detection_args(p)
    p.add_argument("--model", default=None, help="quality model: manifest name or .onnx path")
    p.add_argument("--aligned", action="store_true", help="inputs are aligned 112x112 faces: skip detection")
    p.add_argument("--resize-aligned", action="store_true",
                   help="with --aligned: resize inputs that are not 112x112 instead of refusing them (not_aligned)")
    p.add_argument("--out", type=Path, default=None, help="write FILE.csv (one row per face) or FILE.jsonl")
    p.add_argument("--components", action="store_true",
                   help="add each face's quality components (pose, sharpness, exposure, ...; docs/components.md)")
    p.add_argument("--annotate", type=Path, default=None, metavar="DIR",
                   help="also write each input to DIR with boxes, landmarks, score and weakest component drawn")


def cmd_best(args: argparse.Namespace) -> int:
    """Group faces into identities; print one JSON line per identity (most shots first), errors on stderr."""
    from crfiqa.service.bestshot import VIDEO_EXTENSIONS, best_shots
    from crfiqa.service.imaging import IMAGE_EXTENSIONS
    from crfiqa.service.pipeline import Options

    paths = _inputs(args.paths, IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)
    pipe = _pipeline(args, args.model)
    identities, errors = best_shots(pipe, paths, every=args.every, embedder=args.embedder,
                                    threshold=args.threshold, options=Options(select=args.select))
    for k, identity in enumerate(identities):
        print(json.dumps(identity.to_dict(k)), flush=True)
    for result in errors:
        print(json.dumps(result.to_dict()), file=sys.stderr)
    return 1 if errors and not identities else 0


def add_best_arguments(p: argparse.ArgumentParser) -> None:
    """``crfiqa best`` flags."""
    _detection_args(p)
    p.add_argument("--every", type=int, default=1, help="read every N-th frame of a video (default 1)")
    p.add_argument("--model", default=None, help="quality model: manifest name or .onnx path")
    p.add_argument("--embedder", default="w600k_mbf",
                   help="identity embeddings: a recognition model of the manifest, or 'quality' (the quality "
                        "model's embedding output)")
    p.add_argument("--threshold", type=float, default=None,
                   help="cosine similarity that joins an identity (default: the embedder's measured one)")


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    """``crfiqa models`` flags."""
    p.add_argument("action", choices=["list", "fetch", "verify"])
    p.add_argument("names", nargs="*", help="model names (default: all)")
    p.add_argument("--from", dest="mirror", type=Path, default=None,
                   help="copy from a mirror directory laid out like models/ (env CRFIQA_MODEL_MIRROR)")
    p.add_argument("--sha256", default=None, help="expected sha256 (overrides the manifest; one model)")
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--quiet", action="store_true")
