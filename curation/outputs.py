"""What ``crfiqa curate`` writes: shard files (atomic, so a rerun skips the complete ones), ``scores.parquet``
(one row per face, one row with empty face fields per image without a face or with an error) and the run's
``manifest.json`` that ties a DST to one source and one set of settings."""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crfiqa.service.errors import CrfiqaError

#: The columns of ``crfiqa score --out x.csv``, in its order; ``identity`` and components follow.
SCORE_COLUMNS = ["path", "status", "error_code", "face", "det_score", "x1", "y1", "x2", "y2",
                 "quality_raw", "quality_score"]
STAGES = ("t_read", "t_decode", "t_detect", "t_align", "t_components", "t_score")
TIMINGS_KEY = b"crfiqa.timings"


def shard_path(dst: Path, shard: int) -> Path:
    """The file of one shard."""
    return dst / "shards" / f"part-{shard:05d}.parquet"


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write a parquet file so that it either exists complete or not at all (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def fingerprint(names: list[str], config: dict) -> str:
    """A hash of the item list and the settings that decide the scores."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name in names:
        h.update(name.encode() + b"\0")
    return h.hexdigest()


def check_manifest(dst: Path, manifest: dict) -> None:
    """Write ``DST/manifest.json``, or check a previous run's: resuming into a DST of another source or other
    settings would mix two runs' scores (``out_mismatch``)."""
    path = dst / "manifest.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != manifest["fingerprint"] or old.get("shard_size") != manifest["shard_size"]:
            raise CrfiqaError(f"{dst} holds a run of another source or other settings; use a new --out",
                              code="out_mismatch")
        return
    dst.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, path)


def _floats(buf: bytes, dtype: str) -> list[float]:
    return np.frombuffer(buf, dtype).astype(np.float64).tolist()


def face_rows(images: pa.Table, with_identity: bool, components: list[str]) -> pa.Table:
    """Explode per-image rows into the scores schema, in item order."""
    images = images.sort_by("index")
    cols: dict[str, list] = defaultdict(list)
    d = images.to_pydict()
    for i in range(images.num_rows):
        n = d["faces"][i]
        det = _floats(d["det_score"][i], "<f4")
        boxes = np.frombuffer(d["boxes"][i], "<f4").reshape(-1, 4).astype(np.float64)
        raw, score = _floats(d["quality_raw"][i], "<f8"), _floats(d["quality_score"][i], "<f8")
        comp = json.loads(d["components"][i]) if components else []
        for k in range(max(n, 1)):
            face = k < n
            cols["path"].append(d["path"][i])
            cols["status"].append(d["status"][i])
            cols["error_code"].append(d["error_code"][i])
            cols["face"].append(k if face else None)
            cols["det_score"].append(det[k] if face else None)
            for j, c in enumerate(("x1", "y1", "x2", "y2")):
                cols[c].append(float(boxes[k, j]) if face else None)
            cols["quality_raw"].append(raw[k] if face and k < len(raw) else None)
            cols["quality_score"].append(score[k] if face and k < len(score) else None)
            if with_identity:
                cols["identity"].append(d["identity"][i])
            for name in components:
                cols[name].append(comp[k].get(name) if face and k < len(comp) else None)
    schema = [pa.field(c, pa.string() if c in ("path", "status", "error_code") else
                       pa.int32() if c == "face" else pa.float64()) for c in SCORE_COLUMNS]
    if with_identity:
        schema.append(pa.field("identity", pa.string()))
    schema += [pa.field(name, pa.float64()) for name in components]
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=pa.schema(schema))


@dataclass
class ShardWriter:
    """Collects per-image rows as they stream in (any order) and writes each shard once all its images are in."""

    dst: Path
    expected: dict[int, int]  # shard -> number of images
    with_identity: bool
    components: list[str] = field(default_factory=list)
    written: list[int] = field(default_factory=list)
    _parts: dict[int, list[pa.Table]] = field(default_factory=lambda: defaultdict(list))
    _counts: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, batch: pa.Table) -> None:
        """Take a batch of per-image rows; write every shard it completes."""
        shards = batch.column("shard").to_numpy()
        for shard in np.unique(shards):
            part = batch.filter(pa.array(shards == shard))
            s = int(shard)
            self._parts[s].append(part)
            self._counts[s] += part.num_rows
            if self._counts[s] == self.expected[s]:
                self._write(s)

    def _write(self, shard: int) -> None:
        images = pa.concat_tables(self._parts.pop(shard), promote_options="permissive")
        table = face_rows(images, self.with_identity, self.components)
        timings = {k: float(np.sum(images.column(k).to_numpy())) for k in STAGES}
        timings["images"] = images.num_rows
        table = table.replace_schema_metadata({TIMINGS_KEY: json.dumps(timings).encode()})
        write_atomic(table, shard_path(self.dst, shard))
        self.written.append(shard)

    @property
    def missing(self) -> list[int]:
        """Shards not written (a job that ended early)."""
        return sorted(set(self.expected) - set(self.written))


def merge(dst: Path, shards: list[int]) -> pa.Table:
    """``DST/scores.parquet`` from the shard files in order (written atomically); returns the table."""
    tables = [pq.read_table(shard_path(dst, s)) for s in shards]
    table = pa.concat_tables(tables, promote_options="permissive").replace_schema_metadata(None)
    write_atomic(table, dst / "scores.parquet")
    return table


def stage_seconds(dst: Path, shards: list[int]) -> dict[str, float]:
    """Summed per-stage seconds over the shards (read, decode, detect, align, score)."""
    total: dict[str, float] = defaultdict(float)
    for s in shards:
        meta = pq.read_schema(shard_path(dst, s)).metadata or {}
        for k, v in json.loads(meta.get(TIMINGS_KEY, b"{}")).items():
            total[k] += v
    return dict(total)
