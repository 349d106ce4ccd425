"""The training dataset: decode with the service's decoder, augment, normalise with the one preprocessing."""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import Dataset

from crfiqa.service.align import as_aligned
from crfiqa.service.imaging import decode_image, read_image
from crfiqa.service.preprocess import QUALITY_INPUT, to_blob
from crfiqa.training.data.augment import Augment, horizontal_flip


class FaceDataset(Dataset):
    """(tensor [3,112,112] RGB in [-1, 1], class) pairs; augmentation is seeded by (seed, epoch, index)
    so that a resumed run sees exactly the samples an uninterrupted one would."""

    def __init__(self, samples: list[tuple[object, int]], augment: list[Augment] | None = None,
                 max_per_identity: int = 0, seed: int = 0) -> None:
        if max_per_identity > 0:
            samples = cap_per_identity(samples, max_per_identity, seed)
        self.samples = samples
        self.augment = [horizontal_flip] if augment is None else augment
        self.seed, self.epoch = seed, 0
        self.num_classes = 1 + max(label for _, label in samples)

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentation draws of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> np.ndarray:
        """The aligned RGB uint8 crop of sample ``index`` (resized to 112 if needed)."""
        key, _ = self.samples[index]
        if isinstance(key, tuple):  # (RecordIO, record index)
            rec, k = key
            image = decode_image(rec.read(k).image)
        else:
            image = read_image(key)
        return as_aligned(image.rgb)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = random.Random(hash((self.seed, self.epoch, index)))
        crop = self.load(index)
        for aug in self.augment:
            crop = aug(crop, rng)
        blob = to_blob(np.ascontiguousarray(crop)[None], QUALITY_INPUT)[0]
        return torch.from_numpy(blob), self.samples[index][1]


def cap_per_identity(samples: list[tuple[object, int]], cap: int, seed: int) -> list[tuple[object, int]]:
    """Keep at most ``cap`` samples per class (a seeded choice), so big classes do not dominate."""
    by_class: dict[int, list[tuple[object, int]]] = defaultdict(list)
    for s in samples:
        by_class[s[1]].append(s)
    rng = random.Random(seed)
    kept = []
    for label in sorted(by_class):
        group = by_class[label]
        kept += group if len(group) <= cap else rng.sample(group, cap)
    return kept
