"""The ``crfiqa`` command: the composition root of every subcommand.

Each command is (name, help, module, flags function, run function). The modules named here are light (argument
definitions only), and a command's heavy code loads only when it runs: ``crfiqa --help`` imports neither torch,
uvicorn nor ONNX Runtime, and ``crfiqa score`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

COMMANDS: list[tuple[str, str, str, str, str]] = [
    ("detect", "detect faces, print JSON lines", "crfiqa.service.cli", "add_detect_arguments", "cmd_detect"),
    ("align", "write aligned 112x112 crops", "crfiqa.service.cli", "add_align_arguments", "cmd_align"),
    ("score", "score face quality", "crfiqa.service.cli", "add_score_arguments", "cmd_score"),
    ("best", "best face of each person in bursts, folders or videos", "crfiqa.service.cli",
     "add_best_arguments", "cmd_best"),
    ("models", "list, fetch or verify models", "crfiqa.service.cli", "add_models_arguments", "cmd_models"),
    ("serve", "run the HTTP service", "crfiqa.service.api.server", "add_arguments", "main"),
    ("prepare", "align raw identity folders into a training set", "crfiqa.training.cli",
     "add_prepare_arguments", "run_prepare"),
    ("train", "train a CR-FIQA model (runs under torchrun too)", "crfiqa.training.cli",
     "add_train_arguments", "run_train"),
    ("export", "export a checkpoint to a quality ONNX model", "crfiqa.training.cli",
     "add_export_arguments", "run_export"),
    ("convert-official", "convert a released CR-FIQA checkpoint to ONNX", "crfiqa.training.cli",
     "add_convert_arguments", "run_convert"),
    ("evaluate", "Error-versus-Reject evaluation of quality scores", "crfiqa.evaluation.cli",
     "add_evaluate_arguments", "run_evaluate"),
    ("degrade", "write a reproducible cross-quality copy of a dataset", "crfiqa.evaluation.cli",
     "add_degrade_arguments", "run_degrade"),
    ("curate", "score and filter a dataset on Ray Data, with a report", "crfiqa.curation.cli",
     "add_curate_arguments", "run_curate"),
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="crfiqa", description="Face image quality assessment (CR-FIQA).")
    parser.add_argument("--log-level", default=os.environ.get("CRFIQA_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, module, add, run in COMMANDS:
        p = sub.add_parser(name, help=help_text)
        mod = importlib.import_module(module)
        getattr(mod, add)(p)
        p.set_defaults(func=_runner(module, run))
    return parser


def _runner(module: str, run: str):
    """The command's run function, looked up only when it runs."""
    return lambda args: getattr(importlib.import_module(module), run)(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crfiqa`` console script."""
    from crfiqa.service.errors import CrfiqaError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CrfiqaError as exc:
        print(f"crfiqa: error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `crfiqa score ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
