"""Split ../shared/data/celeba by identity into a training half and a natural-photo dev half (seeded).

``ids = sorted(int ids)``, ``random.Random(SEED).shuffle(ids)``, the first ``round(len * TRAIN_SHARE)`` train,
the rest dev. Copies the images to ``<out>/{train,dev}/<id>/`` (real files: the evaluator's folder walk
does not follow symlinked folders) and writes ``<out>/split.tsv`` (``id<TAB>split``). Used by scripts/reproduce_default_model.sh; documented in
docs/model-card.md.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

SEED = 1414
TRAIN_SHARE = 0.5


def split_ids(ids: list[int], seed: int = SEED, share: float = TRAIN_SHARE) -> tuple[list[int], list[int]]:
    """(train, dev) identity lists: a seeded shuffle of the sorted ids, cut at ``share``."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    cut = round(len(order) * share)
    return sorted(order[:cut]), sorted(order[cut:])


def main(argv: list[str] | None = None) -> None:
    """Copy the two halves and write split.tsv."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("celeba", type=Path, help="shared/data/celeba")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    images = args.celeba.resolve() / "images"
    train, dev = split_ids([int(d.name) for d in images.iterdir() if d.is_dir()])
    lines = ["id\tsplit"]
    for name, ids in (("train", train), ("dev", dev)):
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in ids:
            if not (folder / str(i)).is_dir():
                shutil.copytree(images / str(i), folder / str(i))
            lines.append(f"{i}\t{name}")
    (args.out / "split.tsv").write_text("\n".join(lines) + "\n")
    print(f"celeba split (seed {SEED}): {len(train)} train identities, {len(dev)} dev identities")


if __name__ == "__main__":
    main()
