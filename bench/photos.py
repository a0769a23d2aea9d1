"""ImageNet-like JPEGs for benchmarks: natural-photo content, ~500x375, quality 90.

Cut from scikit-learn's two bundled photos at random scales, positions and orientations, so
they decode like real photos (not noise) and need no download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_photo_tree(root: Path, n: int, *, classes: int = 4, val_every: int = 5,
                    seed: int = 0, workers: int | None = None) -> None:
    """root/{train,val}/nXX/*.JPEG: images go round the classes; every `val_every`-th round
    goes to val, so every class has both splits. Written by `workers` processes."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, min(workers or os.cpu_count() or 1, -(-n // 500)))
    bounds = [(n * i // workers, n * (i + 1) // workers) for i in range(workers)]
    if workers == 1:
        _write_range(root, 0, n, classes, val_every, seed)
        return
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_range, [root] * workers, [lo for lo, _ in bounds],
                      [hi for _, hi in bounds], [classes] * workers, [val_every] * workers,
                      [seed] * workers))


def _write_range(root: Path, lo: int, hi: int, classes: int, val_every: int, seed: int) -> None:
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    for k in range(lo, hi):
        rng = np.random.default_rng([seed, k])  # per image: the same tree for any worker count
        split = "val" if (k // classes) % val_every == 0 else "train"
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
