"""``crfiqa evaluate`` and ``crfiqa degrade``: argument parsers (no heavy imports) and their entry points."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """``crfiqa evaluate`` flags."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", type=Path, help="LFW pairs.txt (with --images)")
    src.add_argument("--bin", type=Path, help="InsightFace verification .bin")
    src.add_argument("--all-vs-all", type=Path, help="identity-folder dataset: every pair")
    p.add_argument("--images", type=Path, help="image root for --pairs (and for relative --embeddings paths)")
    p.add_argument("--max-impostors", type=int, default=0, help="all-vs-all: seeded sample of impostor pairs (0 = all)")
    p.add_argument("--max-genuine-per-identity", type=int, default=0,
                   help="all-vs-all: at most this many genuine pairs per identity (seeded sample; 0 = all)")
    p.add_argument("--recognition", default="sface_2021dec", help="recognition model (not the quality model)")
    p.add_argument("--flip-concat", action="store_true", help="embedding = own + mirror's (released CR-FIQA protocol)")
    p.add_argument("--embeddings", type=Path, help="precomputed .npz: paths (relative to --images), embeddings [N,D]")
    p.add_argument("--quality", action="append", default=[], metavar="NAME=SOURCE",
                   help="NAME=model:<manifest name or .onnx> or NAME=FILE.csv (repeatable)")
    p.add_argument("--baseline", nargs="*", default=[],
                   help="random det_score eye_distance sharpness embedding_norm[:MODEL]")
    p.add_argument("--fmr", type=float, nargs="+", default=[1e-3])
    p.add_argument("--protocol", choices=["iso", "paper", "both"], default="iso")
    p.add_argument("--threshold-mode", choices=["per-step", "fixed"], default="per-step", help="paper protocol")
    p.add_argument("--start-fnmr", type=float, default=None, help="iso: threshold from this FNMR instead of the FMR")
    p.add_argument("--pauc-limit", type=float, nargs="+", default=[0.2, 0.3])
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--select", choices=["center", "largest", "score"], default="center")
    p.add_argument("--exclude-failures", action="store_true", help="drop pairs with an image where no face was found")
    p.add_argument("--detector", default=None)
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "crfiqa" / "embeddings")
    p.add_argument("--guidance", default=None, metavar="NAME",
                   help="threshold guidance for the model: quality source NAME (0-100 score thresholds 10..90)")
    p.add_argument("--out", type=Path, required=True)


def add_degrade_arguments(p: argparse.ArgumentParser) -> None:
    """``crfiqa degrade`` flags."""
    p.add_argument("src", type=Path, help="identity-folder or pairs dataset (its non-image files are copied)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--spec", type=Path, default=None, help="TOML overriding the chain's probabilities and ranges")
    p.add_argument("--family", choices=["crfiqa", "ofiq"], default="crfiqa",
                   help="crfiqa: evaluation/degradations.py (the training augmentation's operators); "
                        "ofiq: ISO/IEC 29794-5 operators from ofiq-syngen that training never applies")
    p.add_argument("--detector", default=None)
    p.add_argument("--models-dir", type=Path, default=None)


def run_degrade(args: argparse.Namespace) -> int:
    """Entry of ``crfiqa degrade``."""
    from crfiqa.evaluation.degrade import degrade_dataset, load_spec
    from crfiqa.service.pipeline import Pipeline, PipelineSettings

    pipe = Pipeline(PipelineSettings(detector=args.detector, models_dir=args.models_dir))
    print(json.dumps(degrade_dataset(args.src, args.out, args.seed, args.fraction, load_spec(args.spec), pipe,
                                     family=args.family)))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Entry of ``crfiqa evaluate``."""
    import numpy as np

    from crfiqa.evaluation import evaluate as ev
    from crfiqa.evaluation import protocols, sources
    from crfiqa.evaluation.report import write_report
    from crfiqa.service.pipeline import Pipeline, PipelineSettings

    if args.pairs:
        if not args.images:
            raise SystemExit("crfiqa evaluate: --pairs needs --images")
        proto = protocols.lfw_pairs(args.pairs, args.images)
    elif args.bin:
        proto = protocols.load_bin(args.bin)
    else:
        proto = protocols.all_vs_all(args.all_vs_all, args.max_impostors, args.seed, args.max_genuine_per_identity)
    pipe = Pipeline(PipelineSettings(detector=args.detector, models_dir=args.models_dir))
    faces = sources.find_faces(proto, pipe, args.select)
    if args.embeddings:
        data = np.load(args.embeddings)
        table = dict(zip([str(p) for p in data["paths"]], data["embeddings"]))
        emb = np.stack([table.get(n, np.full(data["embeddings"].shape[1], np.nan)) for n in proto.names])
    else:
        model = sources.recognition_model(args.recognition, pipe)
        setting = f"{pipe.detector_name}|{pipe.detector.settings.input_size}|{args.select}"
        emb = sources.embed(faces, model, args.flip_concat, args.cache, setting)
    ok = faces.ok & np.isfinite(emb).all(axis=1)
    qualities: dict[str, np.ndarray] = {}
    calibrations = {}
    for spec in args.quality:
        name, _, source = spec.partition("=")
        if not source:
            raise SystemExit(f"crfiqa evaluate: --quality needs NAME=SOURCE, got {spec!r}")
        if source.startswith("model:"):
            q, calibrations[name] = sources.model_quality(source[len("model:"):], faces, pipe)
        else:
            q = sources.csv_quality(source, proto, faces, args.select)
        qualities[name] = np.where(ok, q, sources.FAILURE_QUALITY)
    for name in args.baseline:
        qualities[name] = np.where(ok, sources.baseline(name, faces, pipe, args.seed), sources.FAILURE_QUALITY)
    if not qualities:
        raise SystemExit("crfiqa evaluate: name at least one --quality or --baseline")
    pairs = ev.build_pairs(emb, qualities, proto.left, proto.right, proto.genuine, proto.cluster, ok,
                           args.exclude_failures)
    settings = ev.Settings(fmrs=tuple(args.fmr), protocols=("iso", "paper") if args.protocol == "both" else (args.protocol,),
                           threshold_mode=args.threshold_mode, start_fnmr=args.start_fnmr,
                           pauc_limits=tuple(args.pauc_limit), bootstrap=args.bootstrap, seed=args.seed,
                           exclude_failures=args.exclude_failures)
    report = ev.evaluate(pairs, settings)
    report["settings"] = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
                          "protocols": list(settings.protocols), "protocol_name": proto.description}
    report["counts"] = {"images": len(proto.names), "failures": int((~ok).sum()),
                        "pairs": int(proto.left.size), "genuine": int(proto.genuine.sum()),
                        "impostor": int((~proto.genuine).sum()),
                        "excluded_pairs": int(proto.left.size - pairs.scores.size)}
    if args.guidance:
        from crfiqa.service.facemodel import calibrate

        if args.guidance not in calibrations:
            raise SystemExit(f"crfiqa evaluate: --guidance needs a model: quality source, not {args.guidance!r}")
        image_scores = np.where(ok, calibrate(qualities[args.guidance], calibrations[args.guidance]), -1.0)
        keep = (ok[proto.left] & ok[proto.right]) if args.exclude_failures else np.ones(proto.left.size, bool)
        report["guidance"] = {f"{f:g}": ev.threshold_guidance(pairs.scores, proto.left[keep], proto.right[keep],
                                                             pairs.genuine, image_scores, f) for f in args.fmr}
        report["guidance_method"] = args.guidance
    write_report(args.out, report)
    print((args.out / "summary.md").read_text())
    return 0
