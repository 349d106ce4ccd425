"""Re-fit the 0-100 calibration of an exported quality model on anchor sets and rewrite its sidecar.

Good anchors: aligned crops of clean LFW training photos (identity folders with a name, i.e. not CelebA's
numbers), one per identity, taken at an even stride in name order (with 1,184 LFW identities and 600 anchors
the stride is 1: the first 600 names); bad anchors: the same crops at a 10-px inter-eye resolution and with a
sigma-3 blur (``crfiqa.training.calibrate``). Prints the anchor means before and after as JSON.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import numpy as np

from crfiqa.service.imaging import read_image
from crfiqa.service.registry import Calibration
from crfiqa.training.calibrate import anchor_report, anchor_sets, fit_anchor_calibration
from crfiqa.training.export import onnx_quality, write_sidecar_table


def lfw_crops(root: Path, limit: int) -> np.ndarray:
    """Up to ``limit`` aligned crops, one per LFW identity folder, at an integer stride in name order (CelebA
    folders are numbers). The shipped calibration was fitted on these; a finer spread would change it."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.isdigit())
    files = [sorted(f.iterdir())[0] for f in folders if any(f.iterdir())]
    step = max(1, len(files) // limit)
    return np.stack([read_image(p).rgb for p in files[::step][:limit]])


def main(argv: list[str] | None = None) -> None:
    """Fit, rewrite ``<model>.toml``, print the anchor means."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="exported .onnx with its .toml sidecar beside it")
    p.add_argument("--reference", type=Path, required=True, help="aligned <identity>/<image> folder (crfiqa prepare)")
    p.add_argument("--limit", type=int, default=600)
    args = p.parse_args(argv)
    sidecar = args.model.with_suffix(".toml")
    table = tomllib.loads(sidecar.read_text())["model"]
    before = Calibration(**table["calibration"])
    raw = {k: onnx_quality(args.model, v) for k, v in anchor_sets(lfw_crops(args.reference, args.limit)).items()}
    after = fit_anchor_calibration(raw["good"], [raw["eye10px"], raw["blur3"]])
    table["calibration"] = {"centre": round(after.centre, 6), "scale": round(after.scale, 6)}
    write_sidecar_table(args.model, table)
    print(json.dumps({"faces": len(raw["good"]), "before": {"calibration": vars(before), **anchor_report(raw, before)},
                      "after": {"calibration": table["calibration"], **anchor_report(raw, after)}}, indent=2))


if __name__ == "__main__":
    main()
