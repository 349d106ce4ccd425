"""Argument parsers of the training commands; torch-free, so ``crfiqa --help`` never imports torch."""

from __future__ import annotations

import argparse


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """``crfiqa train`` flags (each overrides the config file)."""
    p.add_argument("--config", default=None, help="YAML file or shipped config name (casia_r50, ms1mv2_r100, ...)")
    p.add_argument("--data", default=None, help="train.rec (with .idx) or an aligned <identity>/<image> folder")
    p.add_argument("--backbone", default=None, help="iresnet18/34/50/100, mobilefacenet")
    p.add_argument("--batch-size", type=int, default=None, help="per process")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory (checkpoints, log.csv, config.yaml)")
    p.add_argument("--init-backbone", default=None, help="arcface_torch state dict or .onnx recognition model")
    p.add_argument("--resume", default=None, help="checkpoint file or run directory (its latest.pt)")
    p.add_argument("--cr-target", choices=["paper", "official", "ccs"], default=None)
    p.add_argument("--mode", choices=["simultaneous", "on_top"], default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="data loader processes")


def train_parser() -> argparse.ArgumentParser:
    """Stand-alone parser (``python -m crfiqa.training.train``, torchrun)."""
    p = argparse.ArgumentParser(prog="crfiqa train", description="Train a CR-FIQA model.")
    add_train_arguments(p)
    return p


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """``crfiqa export`` flags."""
    p.add_argument("checkpoint", help="checkpoint file or run directory, or an .onnx export to re-optimise")
    p.add_argument("--out", required=True, help="output .onnx (a .toml manifest entry is written beside it)")
    p.add_argument("--name", default=None, help="model name in the manifest entry (default: file stem)")
    p.add_argument("--reference", nargs="*", default=None,
                   help="images or folders of reference faces: real-face parity and the 0-100 calibration")


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """``crfiqa convert-official`` flags."""
    p.add_argument("checkpoint", help="released {step}backbone.pth")
    p.add_argument("--arch", required=True, choices=["iresnet50", "iresnet100"])
    p.add_argument("--out", required=True)
    p.add_argument("--reference", nargs="*", default=None)


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    """``crfiqa prepare`` flags."""
    p.add_argument("src", help="folder of <identity>/<image> (raw, unaligned)")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["folder", "rec"], default="folder")
    p.add_argument("--select", choices=["center", "largest", "score"], default="center")
    p.add_argument("--detector", default=None)
    p.add_argument("--models-dir", default=None)


def run_export(args: argparse.Namespace) -> int:
    """Lazy entry of ``crfiqa export``."""
    import json

    from crfiqa.training.export import export_checkpoint

    print(json.dumps(export_checkpoint(args.checkpoint, args.out, args.reference, args.name), indent=2))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """Lazy entry of ``crfiqa convert-official``."""
    import json

    from crfiqa.training.convert_official import convert

    print(json.dumps(convert(args.checkpoint, args.arch, args.out, args.reference), indent=2))
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    """Lazy entry of ``crfiqa prepare``."""
    import json
    import logging
    from pathlib import Path

    from crfiqa.training.data.prepare import prepare

    logging.getLogger("crfiqa.prepare").setLevel(logging.INFO)
    summary = prepare(args.src, args.out, args.format, args.select, args.detector,
                      Path(args.models_dir) if args.models_dir else None)
    print(json.dumps(summary))
    return 0 if summary["aligned"] else 1


def run_train(args: argparse.Namespace) -> int:
    """Lazy entry of ``crfiqa train``."""
    from crfiqa.training.train import run

    run(args)
    return 0
