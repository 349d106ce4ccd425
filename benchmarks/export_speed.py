"""Faces/s of the source recognition graph vs the quality exports, at batch 1 and 32, in one run; prints a table.

    python benchmarks/export_speed.py                       # w600k_mbf vs models/crfiqa_mbf.onnx vs a fresh export
    python benchmarks/export_speed.py --export runs/v2.onnx --rounds 7

The models are timed in interleaved rounds (every model once per round, same inputs, same session settings
as the service: ONNX Runtime, CPU, all optimisations) and the median round is reported, so a load spike on a
shared machine hits all of them alike. "fresh export" is w600k_mbf through the ONNX importer and
``crfiqa export``'s optimised exporter (with a random quality head): what a checkpoint of it exports to.
Every session is opened as crfiqa opens it on the CPU (PRelu run as Max(x, x * slope), ``prelu_as_max``); the
"as is" rows open the same files without that rewrite (ONNX Runtime's own PRelu kernel).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from crfiqa.service.runtime import create_session
from crfiqa.training.optimise import op_counts

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CRFIQA_SHARED", REPO.parent / "shared"))
SOURCE = SHARED / "models" / "fr" / "insightface_w600k_mbf.onnx"


def rate(session, x: np.ndarray, seconds: float) -> float:
    """Faces/s of repeated runs on ``x`` for about ``seconds`` (after one warm-up run)."""
    name = session.get_inputs()[0].name
    session.run(None, {name: x})
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or n < 2:
        session.run(None, {name: x})
        n += 1
    return n * len(x) / elapsed


def fresh_export(out: Path) -> Path:
    """w600k_mbf -> importer -> optimised export (the path of every checkpoint fine-tuned from it)."""
    import torch

    from crfiqa.training.backbones import create_backbone
    from crfiqa.training.export import export_onnx

    torch.manual_seed(0)
    return export_onnx(create_backbone(f"onnx:{SOURCE}").eval(), out)


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(SOURCE), help="the graph the export came from")
    ap.add_argument("--export", nargs="*", default=[str(REPO / "models" / "crfiqa_mbf.onnx")])
    ap.add_argument("--no-fresh", action="store_true", help="skip exporting w600k_mbf afresh (needs torch)")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.5, help="per model, batch size and round")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = one per core)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        models = {"source": Path(args.source), **{Path(p).name: Path(p) for p in args.export}}
        if not args.no_fresh:
            models["fresh export"] = fresh_export(Path(tmp) / "fresh.onnx")
        sessions = {k: create_session(p, ("CPUExecutionProvider",), args.threads) for k, p in models.items()}
        for k in list(models):
            if k != "fresh export":
                models[f"{k}, as is"] = models[k]
                sessions[f"{k}, as is"] = create_session(models[k], ("CPUExecutionProvider",), args.threads,
                                                         cpu_rewrite=False)
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        rng = np.random.default_rng(0)
        rates: dict[tuple[str, int], list[float]] = {(k, b): [] for k in models for b in sizes}
        for _ in range(args.rounds):
            for b in sizes:
                x = rng.uniform(-1, 1, (b, 3, 112, 112)).astype(np.float32)
                for k, s in sessions.items():
                    rates[k, b].append(rate(s, x, args.seconds))
        print(f"\nquality-model speed on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"ORT threads {args.threads or 'default'}, median of {args.rounds} interleaved rounds (faces/s)")
        head = f"{'model':<32}{'nodes':>7}" + "".join(f"{'bs ' + str(b):>10}{'ratio':>8}" for b in sizes)
        print(head + "\n" + "-" * len(head))
        for k, p in models.items():
            ops = op_counts(p)
            row = f"{k:<32}{sum(ops.values()):>7}"
            for b in sizes:
                med, src = statistics.median(rates[k, b]), statistics.median(rates["source", b])
                row += f"{med:>10.1f}{med / src:>8.2f}"
            print(row)
        print("ratio = faces/s / source faces/s at the same batch size; goal >= 0.95 (both opened as crfiqa does)")
        for k, p in models.items():
            ops = op_counts(p)
            print(f"  {k}: " + ", ".join(f"{op} {n}" for op, n in sorted(ops.items())))


if __name__ == "__main__":
    main()
