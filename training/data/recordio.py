"""MXNet RecordIO in the InsightFace layout, read without mxnet.

File format (dmlc-core recordio): each record is ``magic (u32 0xced7230a)``, ``lrec (u32: cflag << 29 |
length)``, ``length`` bytes, padding to 4 bytes. A payload containing the magic word is written in parts
(cflag 1 = first, 2 = middle, 3 = last) with the magic dropped between them. A payload starts with the
image-record header ``flag (u32), label (f32), id (u64), id2 (u64)``; when ``flag > 0`` it is followed by
``flag`` float32 labels. InsightFace: record 0's labels are ``[first_identity_record, end]``, image records
are ``1 .. first_identity_record - 1``, and an image's class is its (first) label.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")


@dataclass(frozen=True)
class Record:
    """One image record: its flag, labels (float32 array, first = class) and encoded image bytes."""

    flag: int
    label: np.ndarray
    id: int
    image: bytes

    @property
    def class_id(self) -> int:
        """The class (identity) label."""
        return int(self.label[0])


class RecordIO:
    """Random access to a ``.rec`` file through its ``.idx`` (``index\\toffset`` lines)."""

    def __init__(self, rec: str | Path, idx: str | Path | None = None) -> None:
        self.rec = Path(rec)
        idx = Path(idx) if idx else self.rec.with_suffix(".idx")
        self.offsets: dict[int, int] = {}
        for line in idx.read_text().splitlines():
            if line.strip():
                key, offset = line.split()
                self.offsets[int(key)] = int(offset)
        self._local = threading.local()  # one file handle per thread / DataLoader worker

    def _file(self):
        fh = getattr(self._local, "fh", None)
        if fh is None:
            fh = self._local.fh = open(self.rec, "rb")  # noqa: SIM115
        return fh

    def read_raw(self, key: int) -> bytes:
        """The payload of record ``key`` (parts joined)."""
        fh = self._file()
        fh.seek(self.offsets[key])
        parts = []
        while True:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.rec}: truncated record {key}")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise ValueError(f"{self.rec}: bad magic at record {key} (offset {self.offsets[key]})")
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            parts.append(fh.read(length))
            fh.read((4 - length % 4) % 4)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)

    def read(self, key: int) -> Record:
        """Record ``key`` unpacked."""
        raw = self.read_raw(key)
        flag, label, rid, _ = _HEADER.unpack_from(raw)
        offset = _HEADER.size
        if flag > 0:
            labels = np.frombuffer(raw, dtype="<f4", count=flag, offset=offset).copy()
            offset += 4 * flag
        else:
            labels = np.array([label], dtype=np.float32)
        return Record(flag=flag, label=labels, id=rid, image=raw[offset:])

    def image_keys(self) -> list[int]:
        """Keys of the image records (InsightFace layout), or every key when record 0 is no header."""
        if 0 in self.offsets:
            header = self.read(0)
            if header.flag > 0:
                return list(range(1, int(header.label[0])))
        return sorted(self.offsets)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_local")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


def rec_samples(rec: RecordIO) -> list[tuple[object, int]]:
    """(loader key, class) pairs for every image record; the key is ``(rec, index)``."""
    return [((rec, k), rec.read(k).class_id) for k in rec.image_keys()]


def _record(payload: bytes) -> bytes:
    """One record (payloads never contain the magic here: JPEG bytes are checked before writing)."""
    pad = (4 - len(payload) % 4) % 4
    return struct.pack("<II", MAGIC, len(payload)) + payload + b"\0" * pad


def write_rec(path: str | Path, images: list[tuple[int, bytes]]) -> None:
    """Write ``(class, jpeg bytes)`` pairs (sorted by class) in the InsightFace layout, with ``.idx``."""
    path = Path(path)
    images = sorted(images, key=lambda x: x[0])
    first_identity = len(images) + 1
    classes = sorted({c for c, _ in images})
    payloads = [_HEADER.pack(2, 0.0, 0, 0) + np.array([first_identity, first_identity + len(classes)], "<f4").tobytes()]
    for i, (label, jpeg) in enumerate(images, start=1):
        payloads.append(_HEADER.pack(0, float(label), i, 0) + jpeg)
    start = 1
    for label in classes:
        end = start + sum(1 for c, _ in images if c == label)
        payloads.append(_HEADER.pack(2, 0.0, 0, 0) + np.array([start, end], "<f4").tobytes())
        start = end
    offset = 0
    with open(path, "wb") as rec, open(path.with_suffix(".idx"), "w") as idx:
        for key, payload in enumerate(payloads):
            if _MAGIC_BYTES in payload:
                payload = payload.replace(_MAGIC_BYTES, b"")  # never in practice; keeps the file readable
            data = _record(payload)
            rec.write(data)
            idx.write(f"{key}\t{offset}\n")
            offset += len(data)
