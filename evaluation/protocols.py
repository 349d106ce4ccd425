"""Verification protocols: LFW pairs files, InsightFace ``.bin`` files (restricted unpickler), all-vs-all."""

from __future__ import annotations

import io
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crfiqa.service.imaging import IMAGE_EXTENSIONS, walk_files


@dataclass
class Protocol:
    """Images (paths or encoded bytes with names) and comparison pairs between them."""

    names: list[str]  # image identifiers (paths relative to the image root, or bin indices)
    identities: list[str]  # subject of each image ("" when unknown)
    left: np.ndarray  # [P] image index
    right: np.ndarray  # [P] image index
    genuine: np.ndarray  # [P] bool
    sources: list  # what to read each image from: a Path, or bytes
    description: str = ""

    @property
    def cluster(self) -> np.ndarray:
        """Identity cluster of each pair's two images [P, 2] (left, right), for the identity bootstrap."""
        ids = {name: k for k, name in enumerate(dict.fromkeys(self.identities))}
        of_image = np.array([ids[who] for who in self.identities], dtype=np.int64)
        return np.stack([of_image[self.left], of_image[self.right]], axis=1)


def lfw_pairs(pairs_file: str | Path, images: str | Path) -> Protocol:
    """LFW ``pairs.txt``: header ``folds<TAB>pairs``, then ``name n1 n2`` (genuine) and ``name1 n1 name2 n2``
    (impostor) lines; images at ``<images>/<Name>/<Name>_NNNN.jpg``."""
    images = Path(images)
    lines = [line.split() for line in Path(pairs_file).read_text().splitlines() if line.strip()]
    header, rows = lines[0], lines[1:]
    if len(header) != 2 or not all(h.isdigit() for h in header):
        raise ValueError(f"{pairs_file}: first line must be 'folds<TAB>pairs', got {' '.join(header)!r}")
    index: dict[str, int] = {}
    names, identities, left, right, genuine = [], [], [], [], []

    def image(name: str, number: str) -> int:
        rel = f"{name}/{name}_{int(number):04d}.jpg"
        if rel not in index:
            index[rel] = len(names)
            names.append(rel)
            identities.append(name)
        return index[rel]

    for row in rows:
        if len(row) == 3:
            left.append(image(row[0], row[1]))
            right.append(image(row[0], row[2]))
            genuine.append(True)
        elif len(row) == 4:
            left.append(image(row[0], row[1]))
            right.append(image(row[2], row[3]))
            genuine.append(False)
        else:
            raise ValueError(f"{pairs_file}: bad line {' '.join(row)!r}")
    return Protocol(names, identities, np.array(left), np.array(right), np.array(genuine),
                    [images / n for n in names], f"LFW pairs {Path(pairs_file).name}")


def all_vs_all(root: str | Path, max_impostors: int = 0, seed: int = 0, max_genuine_per_identity: int = 0) -> Protocol:
    """Every same-folder pair is genuine; every cross-folder pair an impostor (or a seeded sample).
    ``max_genuine_per_identity``: at most this many genuine pairs per identity (a seeded sample), so that
    identities with many images do not dominate."""
    root = Path(root)
    paths = [p for p in walk_files(root) if p.suffix.lower() in IMAGE_EXTENSIONS]
    names = [p.relative_to(root).as_posix() for p in paths]
    identities = [p.parent.name for p in paths]
    _, ident = np.unique(np.array(identities), return_inverse=True)
    i, j = np.triu_indices(len(paths), k=1)
    same = ident[i] == ident[j]
    gi, gj = i[same], j[same]
    if max_genuine_per_identity:
        rng = np.random.default_rng(seed + 1)
        keep = []
        for who in np.unique(ident[gi]):
            rows = np.flatnonzero(ident[gi] == who)
            keep.append(rows if rows.size <= max_genuine_per_identity
                        else np.sort(rng.choice(rows, max_genuine_per_identity, replace=False)))
        pick = np.sort(np.concatenate(keep)) if keep else np.zeros(0, int)
        gi, gj = gi[pick], gj[pick]
    ii, ij = i[~same], j[~same]
    if max_impostors and ii.size > max_impostors:
        pick = np.sort(np.random.default_rng(seed).choice(ii.size, max_impostors, replace=False))
        ii, ij = ii[pick], ij[pick]
    left, right = np.r_[gi, ii], np.r_[gj, ij]
    genuine = np.r_[np.ones(gi.size, bool), np.zeros(ii.size, bool)]
    return Protocol(names, identities, left, right, genuine, list(paths), f"all-vs-all over {root.name}")


class _NoGlobals(pickle.Unpickler):
    """Unpickler that refuses every global: only plain containers, strings, bytes, numbers and booleans."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused: the file references {module}.{name}; a verification .bin "
                                     "holds only lists of bytes and booleans")


def load_bin(path: str | Path, max_bytes: int = 2 * 1024**3) -> Protocol:
    """An InsightFace verification ``.bin`` (a pickle of ``(list of JPEG bytes, list of issame)``), read
    with an unpickler that accepts no globals; anything else is rejected with a clear error."""
    data = Path(path).read_bytes()
    if len(data) > max_bytes:
        raise ValueError(f"{path}: {len(data)} bytes, over {max_bytes}")
    try:
        obj = _NoGlobals(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a verification .bin: {exc}") from exc
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected (images, issame), got {type(obj).__name__}")
    bins, issame = obj
    if not all(isinstance(b, (bytes, bytearray)) for b in bins):
        raise ValueError(f"{path}: images must be encoded bytes")
    if not all(isinstance(s, (bool, np.bool_, int)) for s in issame) or len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: need one issame flag per pair of images ({len(bins)} images, {len(issame)} flags)")
    n = len(issame)
    names = [str(k) for k in range(len(bins))]
    # No identities in the format: each genuine pair is its own cluster for the bootstrap.
    identities = [f"pair{k // 2}" for k in range(len(bins))]
    return Protocol(names, identities, np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2),
                    np.array([bool(s) for s in issame]), [bytes(b) for b in bins], f"bin {Path(path).name}")


def sample_seed(seed: int, key: str) -> random.Random:
    """An RNG for one item that depends only on (seed, key): order-independent determinism."""
    return random.Random(f"{seed}:{key}")
