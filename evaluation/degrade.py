"""``crfiqa degrade``: a reproducible cross-quality copy of an image dataset."""

from __future__ import annotations

import csv
import json
import random
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import cv2
from tqdm import tqdm

from crfiqa.evaluation import syngen
from crfiqa.evaluation.degradations import EVAL_SPEC, ChainSpec, Step, apply_chain, draw_chain
from crfiqa.service.detect.base import select_one
from crfiqa.service.errors import CrfiqaError
from crfiqa.service.imaging import IMAGE_EXTENSIONS, read_image, walk_files
from crfiqa.service.pipeline import Pipeline

FALLBACK_EYE_FRACTION = 0.3  # inter-eye distance assumed (of the image width) when no face is found
FAMILIES = ("crfiqa", "ofiq")  # degradations.py (also the training augmentation) / syngen.py (never trained on)
COLUMNS = ["path", "degraded", "eye_px", "steps", "error"]


def load_spec(path: str | Path | None) -> ChainSpec:
    """The default evaluation chain, with fields overridden by a TOML file."""
    if path is None:
        return EVAL_SPEC
    import tomllib

    values = tomllib.loads(Path(path).read_text())
    return replace(EVAL_SPEC, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def degrade_dataset(src: str | Path, out: str | Path, seed: int, fraction: float = 0.5,
                    spec: ChainSpec = EVAL_SPEC, pipeline: Pipeline | None = None, family: str = "crfiqa") -> dict:
    """Copy ``src`` to ``out``; a seeded ``fraction`` of its images get a random degradation chain (drawn per
    image from (seed, relative path), so the output does not depend on order). Other files are copied as is.
    The drawn parameters go to ``out/degradations.csv``; an image that cannot be read or degraded is copied
    unchanged and gets an ``error`` row, and the run goes on."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    src, out = Path(src), Path(out)
    files = walk_files(src)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    chosen = set(random.Random(seed).sample(range(len(images)), round(fraction * len(images))))
    if family == "crfiqa" and pipeline is None:
        pipeline = Pipeline()  # this family sizes resampling by the detected inter-eye distance
    rows = []
    errors = 0
    for p in (q for q in files if q.suffix.lower() not in IMAGE_EXTENSIONS):
        (out / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, out / p.relative_to(src))
    for k, path in enumerate(tqdm(images, desc="degrade", unit="img", file=sys.stderr)):
        rel = path.relative_to(src).as_posix()
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if k not in chosen:
            shutil.copyfile(path, target)
            rows.append({"path": rel, "degraded": 0, "eye_px": "", "steps": "[]", "error": ""})
            continue
        try:
            rgb = read_image(path).rgb
            if family == "ofiq":
                eye, drawn = None, syngen.draw_chain(random.Random(f"{seed}:{rel}"))
                degraded, record = syngen.apply_chain(rgb, drawn), drawn
            else:
                faces = select_one(pipeline.detect(rgb), rgb.shape[1], rgb.shape[0], "center")
                eye = (float(((faces[0].landmarks[1] - faces[0].landmarks[0]) ** 2).sum() ** 0.5) if faces
                       else FALLBACK_EYE_FRACTION * rgb.shape[1])
                steps = draw_chain(random.Random(f"{seed}:{rel}"), eye, spec)
                degraded, record = apply_chain(rgb, steps), [{"name": s.name, "params": s.params} for s in steps]
            write_image(target, degraded)
        except (CrfiqaError, ValueError, cv2.error) as exc:  # one bad file must not abort the whole set
            errors += 1
            shutil.copyfile(path, target)
            code = getattr(exc, "code", type(exc).__name__)
            rows.append({"path": rel, "degraded": 0, "eye_px": "", "steps": "[]", "error": f"{code}: {exc}"})
            continue
        rows.append({"path": rel, "degraded": 1, "eye_px": "" if eye is None else f"{eye:.3f}",
                     "steps": json.dumps(record), "error": ""})
    with open(out / "degradations.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return {"images": len(images), "degraded": len(chosen) - errors, "errors": errors, "seed": seed,
            "fraction": fraction, "family": family}


def write_image(path: Path, rgb) -> None:
    """Write in the file's own format (JPEG at quality 95, so the recorded chain dominates)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix.lower() in (".jpg", ".jpeg") else []
    ok, data = cv2.imencode(path.suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"cannot encode {path.suffix}")
    path.write_bytes(data.tobytes())


def recorded_steps(row: dict) -> list[Step]:
    """The steps of one ``degradations.csv`` row, to re-apply them."""
    return [Step(s["name"], s["params"]) for s in json.loads(row["steps"])]
