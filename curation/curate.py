"""``crfiqa curate`` end to end: list the source, skip complete shards, run the Ray job, merge, filter, report."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from crfiqa.curation import filters, outputs, report
from crfiqa.curation.sources import REC_SEP, DataSource, Loader, open_source
from crfiqa.service.errors import CrfiqaError
from crfiqa.service.pipeline import Options, Pipeline, PipelineSettings

log = logging.getLogger("crfiqa.curate")

#: A local Ray's object store: the job's rows are small (crops of one batch at a time), so keep it modest.
LOCAL_OBJECT_STORE = 300 * 1024 * 1024


@dataclass
class CurateConfig:
    """One curate run."""

    src: Path
    dst: Path
    settings: PipelineSettings
    options: Options = field(default_factory=Options)
    min_score: float | None = None
    drop_fraction: float | None = None
    ray_address: str | None = None
    components: bool = False
    batch_size: int = 32  # images per scoring call (and faces per model call)
    num_gpus: float = 0.0
    actors: int = 0  # most scoring actors (0: one per GPU); on CPUs only, most tasks at once (0: one per CPU)
    shard_size: int = 1024
    thumbnails: int = 8  # per decile
    report: bool = True


@dataclass
class CurateSummary:
    """What a run did (also ``DST/summary.json``)."""

    images: int
    faces: int
    scored: int
    errors: dict[str, int]
    no_face: int
    shards: int
    shards_written: list[int]
    shards_skipped: int
    seconds: float
    stages: dict[str, float]
    kept: int | None = None

    @property
    def images_per_s(self) -> float:
        """Images of this run's written shards per wall second."""
        return self.stages.get("images", 0) / self.seconds if self.seconds else 0.0


@contextmanager
def ray_session(address: str | None, num_gpus: float) -> Iterator[None]:
    """Use the Ray already initialised in this process, join ``address``, or start a small local one."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")  # set inside a RayJob / `ray job submit`
    if address:
        ray.init(address=address, configure_logging=False, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, num_gpus=math.ceil(num_gpus) or None, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE, configure_logging=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _quiet_ray_data() -> None:
    """Ray Data's progress bars only on a terminal; its per-second status lines would flood a log."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def resources(cfg: CurateConfig):
    """How the stages share the cluster: with GPUs, scoring actors on them and detection in tasks on the CPUs;
    on CPUs only, tasks that prepare and score their own batch, one CPU (one ONNX Runtime thread) each."""
    from crfiqa.curation.job import Resources

    if cfg.num_gpus:
        actors = cfg.actors or max(1, math.floor(cfg.num_gpus))
        return Resources(num_gpus=cfg.num_gpus, actors=actors, scorer_cpus=1.0)
    return Resources(actors=cfg.actors, scorer_cpus=1.0, fused=True)


def curate(cfg: CurateConfig) -> CurateSummary:
    """Run ``crfiqa curate``: ``DST/scores.parquet``, with a filter ``kept.txt`` (+ ``identities.csv``),
    ``report.html`` and ``summary.json``. A rerun into the same DST skips the complete shards."""
    t0 = time.perf_counter()
    options = replace(cfg.options, components=cfg.components)
    source = open_source(cfg.src)
    n_shards = math.ceil(len(source) / cfg.shard_size)
    config = {"settings": asdict(cfg.settings) | {"intra_op_threads": None, "solo_threads": None,
                                                   "decode_workers": None, "batch_size": None, "providers": None},
              "options": asdict(options), "source": source.location}
    # A missing or broken model fails the run here, typed, before Ray starts and before DST is claimed by a
    # manifest (every task would fail on it; the driver needs the models anyway: the report's thumbnails).
    # On this CPU, one thread: a GPU context or a second (solo) session would be held for the whole job. The
    # report's thumbnails reuse this pipeline.
    driver = Pipeline(replace(cfg.settings, providers=("CPUExecutionProvider",), intra_op_threads=1, solo_threads=0))
    driver.load(detector=not options.aligned)
    outputs.check_manifest(cfg.dst, {"source": source.location, "kind": source.kind, "items": len(source),
                                     "shard_size": cfg.shard_size, "shards": n_shards,
                                     "fingerprint": outputs.fingerprint(source.names, config)})
    done = {s for s in range(n_shards) if outputs.shard_path(cfg.dst, s).is_file()}
    todo = [i for i in range(len(source)) if i // cfg.shard_size not in done]
    if done:
        log.warning("curate: skipping %d complete shards of %d", len(done), n_shards)
    expected = {s: min(cfg.shard_size, len(source) - s * cfg.shard_size) for s in range(n_shards) if s not in done}
    writer = outputs.ShardWriter(cfg.dst, expected, source.has_identity, component_names(cfg.components))
    t_job = time.perf_counter()
    driver_s = 0.0  # the driver's own share: exploding rows and writing shards (docs/scale.md)
    if todo:
        from crfiqa.curation import job

        with ray_session(cfg.ray_address, cfg.num_gpus):
            _quiet_ray_data()
            for batch in job.run(source, todo, cfg.shard_size, replace(cfg.settings, batch_size=cfg.batch_size),
                                 options, resources(cfg), cfg.batch_size):
                t_add = time.perf_counter()
                writer.add(batch)
                driver_s += time.perf_counter() - t_add
    job_seconds = time.perf_counter() - t_job
    if writer.missing:
        raise CrfiqaError(f"the job ended with shards {writer.missing[:5]} incomplete", code="incomplete")
    scores = outputs.merge(cfg.dst, list(range(n_shards)))
    stages = outputs.stage_seconds(cfg.dst, writer.written) | ({"driver": driver_s} if writer.written else {})
    result = None
    if cfg.min_score is not None or cfg.drop_fraction is not None:
        result = filters.apply_filter(scores, cfg.min_score, cfg.drop_fraction)
        filters.write_filter(cfg.dst, result)
    summary = _summary(scores, n_shards, writer.written, len(done), job_seconds, stages, result)
    if cfg.report:
        write_report(cfg, driver, source, options, scores, result, summary, time.perf_counter() - t0)
    (cfg.dst / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


def component_names(components: bool) -> list[str]:
    """The columns ``--components`` adds: each component's native value (as ``crfiqa score --components``
    writes it), then its 0-100 score (``<name>_score``; empty where the component defines no mapping)."""
    if not components:
        return []
    from crfiqa.service.components import COMPONENT_NAMES

    return [*COMPONENT_NAMES, *(f"{n}_score" for n in COMPONENT_NAMES)]


def _summary(scores, n_shards: int, written: list[int], skipped: int, seconds: float, stages: dict,
             result: filters.FilterResult | None) -> CurateSummary:
    status, face = scores["status"].to_pylist(), scores["face"].to_pylist()
    codes = scores["error_code"].to_pylist()
    errors: dict[str, int] = {}
    for st, code in zip(status, codes):
        if st != "ok":
            errors[code] = errors.get(code, 0) + 1
    return CurateSummary(
        images=sum(1 for f in face if not f), faces=sum(f is not None for f in face),
        scored=int(scores["quality_score"].drop_null().__len__()), errors=errors,
        no_face=sum(1 for st, f in zip(status, face) if st == "ok" and f is None), shards=n_shards,
        shards_written=sorted(written), shards_skipped=skipped, seconds=seconds, stages=stages,
        kept=result.n_kept if result else None)


def thumbnails(source: DataSource, pipe: Pipeline, options: Options,
               picks: list[list[tuple[str, int, float]]]) -> list[list[tuple[str, int, float, bytes]]]:
    """JPEG crops of the picked faces, cut again by the pipeline's own ``prepare`` on the driver (a few dozen
    images), so the shards never carry pixels."""
    import cv2

    loader = Loader(source.rec)
    crops: dict[str, object] = {}
    out = []
    for group in picks:
        faces = []
        for name, face, score in group:
            if name not in crops:
                key = int(name.rsplit(REC_SEP, 1)[1]) if source.rec else -1
                item, _ = loader.load(name, key)
                crops[name] = pipe.prepare(item, options).crops
            batch = crops[name]
            if face < len(batch):  # type: ignore[arg-type]
                ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(batch[face], cv2.COLOR_RGB2BGR),  # type: ignore[index]
                                       [cv2.IMWRITE_JPEG_QUALITY, 85])
                if ok:
                    faces.append((name, face, score, jpg.tobytes()))
        out.append(faces)
    return out


def write_report(cfg: CurateConfig, pipe: Pipeline, source: DataSource, options: Options, scores, result,
                 summary: CurateSummary, seconds: float) -> Path:
    """``DST/report.html`` (its thumbnails cut by ``pipe``, the driver's pipeline)."""
    edges, picks = report.decile_faces(scores, cfg.thumbnails)
    facts = {"source": f"{source.location} ({source.kind})", "shards": f"{summary.shards} "
             f"({len(summary.shards_written)} written, {summary.shards_skipped} skipped as complete)",
             "wall time": f"{seconds:.1f} s"}
    data = report.ReportData(f"crfiqa curate: {Path(source.location).name}", scores, facts,
                             thumbnails(source, pipe, options, picks), edges, result, summary.stages)
    path = cfg.dst / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(report.render(data))
    os.replace(tmp, path)
    return path
