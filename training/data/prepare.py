"""``crfiqa prepare``: raw identity folders -> aligned 112x112 faces, with the service's detector and aligner."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import cv2
from tqdm import tqdm

from crfiqa.service.errors import CrfiqaError
from crfiqa.service.imaging import list_images, mirror_paths, write_image
from crfiqa.service.pipeline import Options, Pipeline, PipelineSettings
from crfiqa.training.data.recordio import write_rec

log = logging.getLogger("crfiqa.prepare")


def prepare(src: str | Path, out: str | Path, fmt: str = "folder", select: str = "center",
            detector: str | None = None, models_dir: Path | None = None) -> dict:
    """Align one face per image (``select`` rule) into ``out``; images without a face are logged and skipped."""
    src, out = Path(src), Path(out)
    identities = sorted(p for p in src.iterdir() if p.is_dir())
    jobs = []
    for label, ident in enumerate(identities):
        images = list_images([ident])
        # Mirror each input's path inside its identity folder, so a/img.jpg and b/img.jpg (or img.jpg and
        # img.png) never write the same output file.
        jobs += [(label, ident.name, path, rel) for path, rel in zip(images, mirror_paths(images))]
    pipe = Pipeline(PipelineSettings(detector=detector, models_dir=models_dir))
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    records: list[tuple[int, bytes]] = []
    results = pipe.run([j[2] for j in jobs], Options(select=select), score=False)
    for (label, name, path, rel), (result, prepared) in tqdm(zip(jobs, results), total=len(jobs), unit="img", file=sys.stderr):
        crops = prepared.crops
        if not result.ok or len(crops) == 0:
            reason = result.error.code if result.error else "no face"
            log.info("skipped %s: %s", path, reason)
            skipped.append(f"{path}: {reason}")
            continue
        if fmt == "rec":
            _, jpeg = cv2.imencode(".jpg", cv2.cvtColor(crops[0], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            records.append((label, jpeg.tobytes()))
        else:
            try:
                write_image(out / name / f"{rel.as_posix()}.png", crops[0])
            except CrfiqaError as exc:  # this image is skipped, the others go on
                log.info("skipped %s: %s", path, exc.code)
                skipped.append(f"{path}: {exc.code}: {exc.message}")
    if fmt == "rec":
        write_rec(out / "train.rec", records)
    (out / "skipped.txt").write_text("".join(s + "\n" for s in skipped))
    summary = {"images": len(jobs), "aligned": len(jobs) - len(skipped), "skipped": len(skipped),
               "identities": len(identities), "format": fmt}
    log.info("prepared %(aligned)d of %(images)d images (%(skipped)d skipped) of %(identities)d identities", summary)
    return summary


__all__ = ["prepare"]
