"""ImageNet-like JPEGs for benchmarks: natural-photo content, ~500x375, quality 90.

Cut from scikit-learn's two bundled photos at random scales, positions and orientations, so
they decode like real photos (not noise) and need no download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_photo_tree(root: Path, n: int, *, classes: int = 4, val_every: int = 5,
                    seed: int = 0) -> None:
    """root/{train,val}/nXX/*.JPEG: every `val_every`-th image goes to val."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for k in range(n):
        split = "val" if k % val_every == 0 else "train"
        src = photos[k % len(photos)]
        scale = rng.uniform(1.0, 1.6)
        big = src.resize((int(src.width * scale), int(src.height * scale)), Image.BICUBIC)
        w, h = (500, 375) if rng.random() < 0.7 else (375, 500)
        x = int(rng.integers(0, big.width - w + 1)) if big.width >= w else 0
        y = int(rng.integers(0, big.height - h + 1)) if big.height >= h else 0
        crop = big.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        folder = root / split / f"n{k % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{k:06d}.JPEG", quality=90)
