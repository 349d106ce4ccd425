"""``crfiqa curate`` flags and runner; light: Ray, pyarrow and the models load only when it runs."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path


def add_curate_arguments(p: argparse.ArgumentParser) -> None:
    """``crfiqa curate`` flags."""
    p.add_argument("src", type=Path, help="folder tree, InsightFace train.rec (or its folder), or .txt/.parquet "
                                          "list of paths")
    p.add_argument("--out", type=Path, required=True, help="output folder (a rerun into it resumes)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--min-score", type=float, default=None, help="keep images whose face scores at least S")
    rule.add_argument("--drop-fraction", type=float, default=None,
                      help="drop the lowest-scoring fraction F of the scored images (0-1)")
    p.add_argument("--ray-address", default=None, help="join a running Ray cluster (default: start a local one)")
    p.add_argument("--components", action="store_true", help="add the quality component columns")
    p.add_argument("--batch-size", type=int, default=32, help="images per scoring call, faces per model call")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs for the scoring actors (one actor per GPU)")
    p.add_argument("--actors", type=int, default=0, help="most scoring actors (default: one per GPU); without "
                   "GPUs, most tasks at once, each preparing and scoring its batch (default: one per CPU)")
    p.add_argument("--shard-size", type=int, default=1024, help="images per output shard (the unit of resume)")
    p.add_argument("--model", default=None, help="quality model: manifest name or .onnx path")
    p.add_argument("--detector", default=None, help="detector name from the manifest (default scrfd_500m)")
    p.add_argument("--det-size", type=int, default=None, help="detector input size in pixels")
    p.add_argument("--det-threshold", type=float, default=None, help="detection score threshold (default 0.5)")
    p.add_argument("--max-faces", type=int, default=None, help="keep at most N faces per image (0 = all)")
    p.add_argument("--min-face-size", type=float, default=None, help="drop faces with a smaller shorter side (px)")
    p.add_argument("--select", choices=["center", "largest", "score"], default=None,
                   help="keep one face per image (the subject of a training image)")
    p.add_argument("--aligned", action="store_true", help="inputs are aligned 112x112 faces: skip detection")
    p.add_argument("--models-dir", type=Path, default=None, help="model directory (env CRFIQA_MODELS_DIR)")
    p.add_argument("--providers", default=None, help="comma-separated ONNX Runtime providers")
    p.add_argument("--no-report", action="store_true", help="skip report.html")


def run_curate(args: argparse.Namespace) -> int:
    """Run the job and print its summary as one JSON line."""
    from crfiqa.curation.curate import CurateConfig, curate
    from crfiqa.service.cli import _pipeline  # the one place env + flags become pipeline settings
    from crfiqa.service.errors import CrfiqaError
    from crfiqa.service.pipeline import Options

    if args.drop_fraction is not None and not 0 <= args.drop_fraction < 1:
        raise CrfiqaError("--drop-fraction must be in [0, 1)", code="bad_argument")
    if args.batch_size < 1 or args.shard_size < 1 or args.num_gpus < 0 or args.actors < 0:
        raise CrfiqaError("--batch-size and --shard-size must be positive, --num-gpus and --actors not negative",
                          code="bad_argument")
    settings = replace(_pipeline(args, args.model).settings, batch_size=args.batch_size)
    cfg = CurateConfig(args.src, args.out, settings, Options(aligned=args.aligned, select=args.select),
                       min_score=args.min_score, drop_fraction=args.drop_fraction, ray_address=args.ray_address,
                       components=args.components, batch_size=args.batch_size, num_gpus=args.num_gpus,
                       actors=args.actors, shard_size=args.shard_size, report=not args.no_report)
    summary = curate(cfg)
    out = {"images": summary.images, "faces": summary.faces, "scored": summary.scored, "errors": summary.errors,
           "no_face": summary.no_face, "kept": summary.kept, "shards_written": len(summary.shards_written),
           "shards_skipped": summary.shards_skipped, "seconds": round(summary.seconds, 2),
           "scores": str(args.out / "scores.parquet")}
    print(json.dumps(out), file=sys.stdout, flush=True)
    return 0 if summary.images == 0 or summary.scored or summary.no_face else 1
