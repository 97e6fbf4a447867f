"""A multi-label labels-file dataset built from real images: 2x2 mosaics of Fashion-MNIST items.

Laid out as ChestX-ray14 users bring theirs (``Data_Entry_2017.csv``: ``Finding Labels`` like
``Effusion|Infiltration``, a patient id, ``images/<patient>_<visit>.png``)::

    DIR/images/00000003_001.png      56x56 grayscale PNG, four 28x28 items
    DIR/train.csv, val.csv, test.csv columns image,labels,group

``labels`` are the names of the item classes present, ``|``-separated in alphabetical order;
every mosaic has at least one item, so no row needs ``No Finding``. ``group`` plays the patient:
each group owns a pool of source images that no other group uses (exact duplicate pictures in
the source count as one), its mosaics are drawn from that pool only, and a split takes whole
groups, so no picture is on both sides of a split.

Run as a script to build a larger set for a documented run::

    python tests/multilabel_fixtures.py OUT_DIR --groups 600 150 150
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densenet.data import build_dataset, dataset_info

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FASHION_MNIST_DIR = SHARED / "fashion-mnist"
SPLITS = ("train", "val", "test")
COLUMNS = ("image", "labels", "group")
TILES = 4  # a 2x2 mosaic


def picture_key(pixels: np.ndarray) -> str:
    """Identity of a picture: a hash of its bytes (equal pictures, equal keys)."""
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def tiles(mosaic: np.ndarray) -> list[np.ndarray]:
    """The four ``(h, w)`` tiles of a ``(2h, 2w)`` mosaic, row by row."""
    h, w = mosaic.shape[0] // 2, mosaic.shape[1] // 2
    return [mosaic[r * h : (r + 1) * h, c * w : (c + 1) * w] for r in (0, 1) for c in (0, 1)]


def _unique_sources(images: torch.Tensor) -> list[int]:
    """Indices of the first copy of each distinct picture in ``images`` ``(N, 1, h, w)``."""
    first: dict[str, int] = {}
    for index, picture in enumerate(images[:, 0].numpy()):
        first.setdefault(picture_key(picture), index)
    return sorted(first.values())


def _mosaic(pictures: np.ndarray) -> np.ndarray:
    """``(4, h, w)`` -> ``(2h, 2w)``."""
    return np.block([[pictures[0], pictures[1]], [pictures[2], pictures[3]]])


def _write_split(root: Path, split: str, rows: list[tuple[str, str, str]]) -> None:
    with open(root / f"{split}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)


def build_mosaic_dataset(
    root: str | Path,
    groups: Sequence[int] = (12, 4, 4),
    mosaics_per_group: int = 3,
    pictures_per_group: int = 6,
    source_dir: str | Path = FASHION_MNIST_DIR,
    source_split: str = "test",
    seed: int = 0,
) -> list[str]:
    """Write the dataset under ``root``; returns the label names (Fashion-MNIST's classes).

    ``groups``: how many groups go to train, val and test. Each group owns
    ``pictures_per_group`` distinct source pictures and makes ``mosaics_per_group`` mosaics of
    four of them (repeats within a group allowed).
    """
    root = Path(root)
    source = build_dataset("fashion_mnist", source_dir, source_split)
    names = list(dataset_info("fashion_mnist").class_names)
    generator = np.random.default_rng(seed)
    available = generator.permutation(_unique_sources(source.images))
    needed = sum(groups) * pictures_per_group
    if needed > len(available):
        raise ValueError(
            f"{needed} source pictures needed, {len(available)} distinct ones in {source_split}"
        )
    (root / "images").mkdir(parents=True, exist_ok=True)
    pools = available[:needed].reshape(sum(groups), pictures_per_group)
    group_ids = iter(range(1, sum(groups) + 1))
    for split, count in zip(SPLITS, groups, strict=True):
        rows = []
        for _ in range(count):
            group = next(group_ids)
            for visit in range(mosaics_per_group):
                chosen = generator.choice(pools[group - 1], size=TILES)
                pixels = _mosaic(source.images[chosen, 0].numpy())
                image = f"images/{group:08d}_{visit:03d}.png"
                Image.fromarray(pixels).save(root / image)
                present = sorted({names[int(source.targets[i])] for i in chosen})
                rows.append((image, "|".join(present), f"{group:08d}"))
        _write_split(root, split, rows)
    return names


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="folder to write images/ and the CSVs into")
    parser.add_argument("--groups", type=int, nargs=3, default=(600, 150, 150))
    parser.add_argument("--mosaics-per-group", type=int, default=3)
    parser.add_argument("--pictures-per-group", type=int, default=6)
    parser.add_argument("--source-split", default="train", choices=("train", "test"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_mosaic_dataset(
        args.root,
        args.groups,
        args.mosaics_per_group,
        args.pictures_per_group,
        source_split=args.source_split,
        seed=args.seed,
    )
    print(f"wrote {args.root}/images and {', '.join(f'{s}.csv' for s in SPLITS)}")


if __name__ == "__main__":
    main()
