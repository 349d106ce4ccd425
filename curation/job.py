"""The Ray Data job. With GPUs: read + prepare in tasks (``Pipeline.prepare``), quality in an actor pool (one
ONNX Runtime session per actor: ``Pipeline.score`` + ``finish`` through ``score_prepared``). On CPUs only: both
in each task, batch by batch (``Resources.fused``). Only this module imports Ray.

Rows cross the stages one per image; variable-length face data travels as little-endian bytes (boxes float32
[N,4], detection scores float32 [N], crops uint8 [N,112,112,3]) so every column has a plain Arrow type."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from crfiqa.curation.sources import DataSource, Loader
from crfiqa.service.align import ALIGNED_SIZE
from crfiqa.service.errors import CrfiqaError
from crfiqa.service.pipeline import Options, Pipeline, PipelineSettings, Prepared
from crfiqa.service.results import Detection

log = logging.getLogger("crfiqa.curate")

#: Images per prepare task batch: small, so decoding streams into the scorers early.
PREPARE_BATCH = 32
_CROP = ALIGNED_SIZE * ALIGNED_SIZE * 3
_NO_LANDMARKS = np.zeros((5, 2), np.float32)


@dataclass(frozen=True)
class Resources:
    """Where the stages run: CPUs per prepare task, the scoring pool and its GPUs."""

    num_gpus: float = 0.0  # total GPUs for scoring (0: CPU scoring)
    actors: int = 1  # most scoring actors
    prepare_cpus: float = 1.0
    scorer_cpus: float = 1.0
    # CPUs only: each task prepares and scores its own batch (``curate_batch``) on ``scorer_cpus``, and
    # ``actors`` caps how many run at once (0: one per CPU). Without a GPU the model shares the cores with
    # detection either way; fused, the crops (37.6 KB a face) never cross the object store and every worker
    # keeps its opened models from batch to batch (docs/scale.md: 0.52-0.58x the score loop split, ~1x fused).
    fused: bool = False

    def actor_gpus(self) -> float:
        """GPUs per scoring actor: one each, or a fraction when fewer than one GPU is given."""
        return min(1.0, self.num_gpus / max(self.actors, 1)) if self.num_gpus else 0.0


_PIPELINES: dict[PipelineSettings, Pipeline] = {}
_KEEP_PIPELINES = 2  # a long-lived worker serves job after job: keep the models of the latest settings only


def _task_pipeline(settings: PipelineSettings) -> Pipeline:
    """One pipeline per worker process and settings: Ray reuses workers, so the models open once each."""
    pipe = _PIPELINES.pop(settings, None) or Pipeline(settings)
    _PIPELINES[settings] = pipe  # now the newest
    while len(_PIPELINES) > _KEEP_PIPELINES:
        del _PIPELINES[next(iter(_PIPELINES))]
    return pipe


def prepare_batch(batch: dict[str, np.ndarray], settings: PipelineSettings, options: Options,
                  loader: Loader) -> dict[str, np.ndarray]:
    """Read, decode, detect and align a batch of items (a Ray task); errors become rows, never raises."""
    pipe = _task_pipeline(settings)
    n = len(batch["index"])
    out: dict[str, list] = {k: [] for k in ("identity", "status", "error_code", "error_message", "width", "height",
                                            "faces", "det_score", "boxes", "crops", "components", "t_read",
                                            "t_decode", "t_detect", "t_align", "t_components")}
    for i in range(n):
        name, identity = str(batch["path"][i]), str(batch["identity"][i])
        t0 = time.perf_counter()
        try:
            source, label = loader.load(name, int(batch["key"][i]))
            prepared = pipe.prepare(source, options)
        except CrfiqaError as exc:
            label, prepared = None, Prepared(name, error=exc)
        t_read = time.perf_counter() - t0 - sum(prepared.timings.values())
        identity = label if label is not None else identity
        image, error = prepared.image, prepared.error
        out["identity"].append(identity)
        out["status"].append("ok" if error is None else "error")
        out["error_code"].append(error.code if error else "")
        out["error_message"].append(error.message if error else "")
        out["width"].append(image.width if image is not None else 0)
        out["height"].append(image.height if image is not None else 0)
        out["faces"].append(len(prepared.detections))
        out["det_score"].append(np.array([d.score for d in prepared.detections], "<f4").tobytes())
        out["boxes"].append(np.array([d.bbox for d in prepared.detections], "<f4").reshape(-1, 4).tobytes())
        out["crops"].append(np.ascontiguousarray(prepared.crops, np.uint8).tobytes())
        out["components"].append(_components_json(prepared))
        out["t_read"].append(max(t_read, 0.0))
        for stage in ("decode", "detect", "align", "components"):
            out[f"t_{stage}"].append(prepared.timings.get(stage, 0.0))
    result = {k: batch[k] for k in ("index", "shard", "path", "key")}
    for k, values in out.items():
        dtype = np.int32 if k in ("width", "height", "faces") else np.float64 if k.startswith("t_") else object
        result[k] = np.array(values, dtype=dtype)
    return result


def _components_json(prepared: Prepared) -> str:
    """Per face, each component's native value and its 0-100 score (``<name>_score``), as JSON; "[]" without."""
    faces = [{**{n: c.value for n, c in comp.items()}, **{f"{n}_score": c.score for n, c in comp.items()}}
             for comp in prepared.components]
    return json.dumps(faces)


def _unpack(batch: dict[str, np.ndarray], i: int) -> Prepared:
    """The Prepared of row ``i`` again (without the decoded image: finish needs only faces and crops)."""
    n = int(batch["faces"][i])
    scores = np.frombuffer(batch["det_score"][i], "<f4")
    boxes = np.frombuffer(batch["boxes"][i], "<f4").reshape(n, 4)
    crops = np.frombuffer(batch["crops"][i], np.uint8).reshape(n, ALIGNED_SIZE, ALIGNED_SIZE, 3)
    dets = [Detection(bbox=boxes[k], landmarks=_NO_LANDMARKS, score=float(scores[k])) for k in range(n)]
    error = None
    if batch["status"][i] != "ok":
        error = CrfiqaError(str(batch["error_message"][i]), code=str(batch["error_code"][i]))
    return Prepared(str(batch["path"][i]), detections=dets, crops=crops, error=error)


class Scorer:
    """The actor pool's callable: opens the quality model once per actor, then scores batches of prepared
    images with the pipeline's own ``score_prepared`` (one model call per batch, ``finish`` per image)."""

    def __init__(self, settings: PipelineSettings) -> None:
        self.pipe = _task_pipeline(settings)
        self.pipe.load(detector=False, quality=True)  # a bad model fails the job here, not image by image

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per image: quality raw and 0-100 as float64 bytes; a failed batch turns its images into errors."""
        n = len(batch["index"])
        t0 = time.perf_counter()
        results = self.pipe.score_prepared([_unpack(batch, i) for i in range(n)])
        t_score = (time.perf_counter() - t0) / max(n, 1)
        out = {k: v for k, v in batch.items() if k != "crops"}
        for k in ("status", "error_code", "error_message", "faces"):
            out[k] = np.array(out[k], copy=True)  # batches may be read-only views of Arrow data
        raw, score = [], []
        for i, res in enumerate(results):
            if res.error is not None and batch["status"][i] == "ok":  # the model failed on this batch
                out["status"][i], out["error_code"][i] = "error", res.error.code
                out["error_message"][i], out["faces"][i] = res.error.message, 0
            quality = [f.quality for f in res.faces if f.quality is not None]
            raw.append(np.array([q.raw for q in quality], "<f8").tobytes())
            score.append(np.array([q.score for q in quality], "<f8").tobytes())
        out["quality_raw"] = np.array(raw, dtype=object)
        out["quality_score"] = np.array(score, dtype=object)
        out["t_score"] = np.full(n, t_score)
        return out


def curate_batch(batch: dict[str, np.ndarray], settings: PipelineSettings, options: Options,
                 loader: Loader) -> dict[str, np.ndarray]:
    """``prepare_batch`` then ``Scorer`` on one batch in one task (the fused CPU job), with the worker's cached
    pipeline: Ray reuses its workers, so each opens the detector and the quality model once."""
    scorer = Scorer(settings)
    # Both models first: a broken copy on this node fails the task (and the job), typed, instead of turning
    # every image into a bad_model row of a shard that resume would then skip as complete.
    scorer.pipe.load(detector=not options.aligned, quality=False)
    return scorer(prepare_batch(batch, settings, options, loader))


def items_table(source: DataSource, indices: list[int], shard_size: int):
    """The pending items as Arrow rows: index, shard, path, key, identity (empty when not known up front)."""
    import pyarrow as pa

    keys = source.keys or [-1] * len(source)
    ids = source.identities or [""] * len(source)
    return pa.table({
        "index": pa.array(indices, pa.int64()),
        "shard": pa.array([i // shard_size for i in indices], pa.int64()),
        "path": pa.array([source.names[i] for i in indices], pa.string()),
        "key": pa.array([keys[i] for i in indices], pa.int64()),
        "identity": pa.array([ids[i] for i in indices], pa.string()),
    })


def run(source: DataSource, indices: list[int], shard_size: int, settings: PipelineSettings, options: Options,
        resources: Resources, batch_size: int) -> Iterator:
    """Stream the per-image result rows (pyarrow tables) of the items ``indices``; Ray must be initialised."""
    import ray.data

    table = items_table(source, indices, shard_size)
    blocks = [table.slice(a, PREPARE_BATCH) for a in range(0, table.num_rows, PREPARE_BATCH)]
    ds: ray.data.Dataset = ray.data.from_arrow(blocks)
    # No solo sessions: a Ray worker keeps to its CPU budget even when it happens to run alone.
    if resources.fused:
        fused_settings = replace(settings, intra_op_threads=max(1, math.floor(resources.scorer_cpus)),
                                 solo_threads=0, decode_workers=1)
        ds = ds.map_batches(curate_batch, batch_size=batch_size, batch_format="numpy",  # type: ignore[arg-type]
                            fn_kwargs={"settings": fused_settings, "options": options, "loader": Loader(source.rec)},
                            num_cpus=resources.scorer_cpus,
                            compute=ray.data.TaskPoolStrategy(size=resources.actors) if resources.actors else None)
        # One operator: Ray Data's per-operator reservation would only hold half the CPUs back while the first
        # tasks run (measured on 2 CPUs: one task at a time for the first ~1.2 s of every job).
        ds.context.op_resource_reservation_enabled = False
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
        return
    # Detection in a task uses the task's CPU; the quality session gets the actor's CPUs (or its GPU).
    prepare_settings = replace(settings, intra_op_threads=max(1, math.floor(resources.prepare_cpus)),
                               solo_threads=0, decode_workers=1)
    score_settings = replace(settings, intra_op_threads=max(1, math.ceil(resources.scorer_cpus)), solo_threads=0)
    ds = ds.map_batches(prepare_batch, batch_size=PREPARE_BATCH, batch_format="numpy",  # type: ignore[arg-type]
                        fn_kwargs={"settings": prepare_settings, "options": options, "loader": Loader(source.rec)},
                        num_cpus=resources.prepare_cpus)
    ds = ds.map_batches(Scorer, batch_size=batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"settings": score_settings},
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, resources.actors)),
                        num_cpus=resources.scorer_cpus, num_gpus=resources.actor_gpus() or None)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
