"""Augmentations of aligned RGB uint8 crops; each draws from the ``random.Random`` it is given."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

Augment = Callable[[np.ndarray, random.Random], np.ndarray]


def horizontal_flip(crop: np.ndarray, rng: random.Random) -> np.ndarray:
    """Mirror with probability 0.5 (the paper's only augmentation)."""
    return crop[:, ::-1] if rng.random() < 0.5 else crop


AUGMENTATIONS: dict[str, Augment] = {"flip": horizontal_flip}


def build_augmentations(names: list[str]) -> list[Augment]:
    """Augmentations by name, in order."""
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentations {unknown}; known: {', '.join(AUGMENTATIONS)}")
    return [AUGMENTATIONS[n] for n in names]
