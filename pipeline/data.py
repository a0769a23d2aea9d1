"""Image trees, class order, and torchvision's eval transform (the reference path).

Every sample is addressed by its index in an explicit, sorted file list. What a file holds
(sniffing, header size, crop geometry) is in `imagefile`; the decoders are in `readers`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DataError, ref, render
from .imagefile import pil_decode, read_bytes, sniff  # noqa: F401 - re-exported
from .models import Preprocess

log = logging.getLogger("quickfix")

KNOWN_SPLITS = ("train", "val", "validation", "test")
ORDER = ref("extract.class_order")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")

# ---------------------------------------------------------------------------------------------
# File lists and class order


@dataclass
class Split:
    name: str
    root: Path
    files: list[str]  # relative to root, "class/file.jpg" (os.fsdecode form: any bytes)
    labels: np.ndarray  # int32, index into the class list
    stats: np.ndarray | None = None  # int64 [n, 2]: size and mtime_ns of each file (-1: no stat)


def find_splits(data_root: Path, requested: Sequence[str] | None) -> list[str]:
    if not data_root.is_dir():
        raise DataError(f"{ref('extract.data_root')} {data_root} is not a directory")
    if requested:
        missing = [s for s in requested if not (data_root / s).is_dir()]
        if missing:
            raise DataError(
                f"split folder(s) {', '.join(missing)} not found under {data_root}; "
                f"present: {', '.join(sorted(p.name for p in data_root.iterdir() if p.is_dir()))}"
            )
        return list(requested)
    present = [s for s in KNOWN_SPLITS if (data_root / s).is_dir()]
    if not present:
        raise DataError(
            f"no split folders ({', '.join(KNOWN_SPLITS)}) under {data_root}; expected the "
            f"ImageFolder layout root/train/<class>/*.JPEG, or name the splits with "
            f"{ref('extract.splits')}"
        )
    return present


def class_folders(split_root: Path) -> list[str]:
    return sorted(p.name for p in split_root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_class_order(path: Path) -> list[str]:
    """A class-order file: one class id per line, or imagenet_class_index.json form."""
    return read_class_table(path)[0]


def read_class_table(path: Path) -> tuple[list[str], list[str] | None]:
    """A class-order file's class ids, and their human names when it gives them
    (imagenet_class_index.json form: `{"0": ["n01440764", "tench"], ...}`)."""
    if not path.is_file():
        raise DataError(f"{ORDER} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{ORDER} {path} is not UTF-8 text (byte {exc.start}): save it as "
                        "UTF-8, one class id per line or imagenet_class_index.json") from exc
    except OSError as exc:
        raise DataError(f"{ORDER} {path}: cannot read it ({exc.strerror})") from exc
    names = None
    if text.lstrip().startswith(("{", "[")):
        entries = _parse_json_order(path, text)
        classes = [str(e[0] if isinstance(e, list) else e) for e in entries]
        if entries and all(isinstance(e, list) and len(e) >= 2 and isinstance(e[1], str)
                           for e in entries):
            names = [e[1] for e in entries]
    else:
        classes = [ln.strip() for ln in text.splitlines()]
        classes = [c for c in classes if c and not c.startswith("#")]
    if not classes:
        raise DataError(f"{ORDER} {path} lists no classes")
    dupes = sorted(c for c, n in Counter(classes).items() if n > 1)
    if dupes:
        raise DataError(f"{ORDER} {path} lists {', '.join(dupes[:5])} more than once")
    return classes, names


def _parse_json_order(path: Path, text: str) -> list:
    """The entries in index order: a class id, or a list [id, name, ...]."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{ORDER} {path} is not valid JSON: {exc}") from exc
    if isinstance(data, list):
        return [c if isinstance(c, list) and c else str(c) for c in data]
    if not isinstance(data, dict):
        raise DataError(f"{ORDER} {path}: expected an object {{\"0\": [id, name], ...}}")
    try:
        items = sorted((int(k), v) for k, v in data.items())
    except ValueError as exc:
        raise DataError(
            f"{ORDER} {path}: keys must be indices \"0\", \"1\", ...: {exc}"
        ) from exc
    if [i for i, _ in items] != list(range(len(items))):
        raise DataError(f"{ORDER} {path}: indices must run 0..{len(items) - 1} without gaps")
    return [v if isinstance(v, list) and v else str(v) for _, v in items]


def scan_split(name: str, split_root: Path, classes: Sequence[str]) -> Split:
    """The split's image files in sorted order, with their labels, sizes and modification times
    (one stat per file, so a file replaced between a kill and the resume is noticed)."""
    index = {c: i for i, c in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    stats: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()  # folders by identity: links are followed, once each
    again: list[str] = []
    for folder in class_folders(split_root):
        if folder not in index:
            raise DataError(
                f"class folder {split_root / folder} is not in the class order; "
                f"add it to {ORDER} or remove the folder"
            )
        for dirpath, dirnames, filenames in os.walk(split_root / folder, followlinks=True):
            try:
                st = os.stat(dirpath)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:  # a link loop, or a link to a folder seen
                again.append(os.path.relpath(dirpath, split_root))
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                if fname.startswith(".") or not fname.lower().endswith(IMG_EXTENSIONS):
                    continue
                path = os.path.join(dirpath, fname)
                files.append(os.path.relpath(path, split_root))
                labels.append(index[folder])
                try:
                    st = os.stat(path)
                    stats.append((st.st_size, st.st_mtime_ns))
                except OSError:  # a broken link: quarantined when it is read
                    stats.append((-1, -1))
    if again:
        log.warning("split %s: %d linked folder(s) lead to folders already scanned (%s%s); "
                    "their images are taken once", name, len(again), ", ".join(again[:3]),
                    ", ..." if len(again) > 3 else "")
    if not files:
        raise DataError(f"split {name}: no image files under {split_root}")
    return Split(name, split_root, files, np.asarray(labels, dtype=np.int32),
                 np.asarray(stats, dtype=np.int64).reshape(-1, 2))


def sample_per_class(split: Split, k: int) -> Split:
    """The first `k` files of each class in a fixed per-class order (a hash of each file's
    name): a class-stratified sample, the same on every run and rank, and nested: the sample
    of k + 1 holds the sample of k. A class with fewer than `k` files gives them all."""
    rank = np.asarray([hashlib.sha256(os.fsencode(f)).digest()[:8] for f in split.files],
                      dtype="S8")
    keep = np.zeros(len(split.files), dtype=bool)
    for cls in np.unique(split.labels):
        rows = np.flatnonzero(split.labels == cls)
        keep[rows[np.argsort(rank[rows], kind="stable")[:k]]] = True
    idx = np.flatnonzero(keep)
    stats = split.stats[idx] if split.stats is not None else None
    return Split(split.name, split.root, [split.files[i] for i in idx], split.labels[idx], stats)


# File names are kept as the file system gives them (os.fsdecode: bytes that are not UTF-8
# become lone surrogates, which open() turns back into the same bytes). The store's `files`
# array holds UTF-8 text, so such a name is stored escaped: a NUL (which no file name holds)
# and then the name's bytes percent-encoded. `stored_name` / `file_name` convert both ways.
_ESCAPED = "\0"


def stored_name(name: str) -> str:
    """How `name` (a path relative to its split) is kept in the store's `files` array."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return _ESCAPED + urllib.parse.quote_from_bytes(os.fsencode(name), safe="/")


def file_name(stored: str) -> str:
    """The file name (os.fsdecode form, usable with open()) of a `files` entry."""
    if stored.startswith(_ESCAPED):
        return os.fsdecode(urllib.parse.unquote_to_bytes(stored[len(_ESCAPED):]))
    return stored


# How the store orders each split's rows. The sorted scan puts every class in a run of rows, so a
# storage chunk would hold one or two classes, and stage 2 out of core, which reads whole chunks
# and shuffles within a window of them, would make batches of a few classes. The store keeps the
# rows in a fixed permutation of the sorted scan instead: every chunk is a sample of the split.
# It is deterministic, so every rank, rerun and resume sees the same order.
ROW_ORDER = "permuted-v1"


def store_order(split: Split) -> Split:
    """The split's files in the order the store keeps them (see ROW_ORDER)."""
    perm = np.random.default_rng(0).permutation(len(split.files))
    stats = split.stats[perm] if split.stats is not None else None
    return Split(split.name, split.root, [split.files[i] for i in perm], split.labels[perm],
                 stats)


def natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


@dataclass
class ClassOrder:
    classes: list[str]
    source: str
    warnings: list[str] = field(default_factory=list)
    names: list[str] | None = None  # human-readable names, when the source gives them


def resolve_class_order(
    folder_classes: list[str], order_file: Path | None, checkpoint_classes: list[str] | None,
    dataset: str | None = None, split_folders: dict[str, list[str]] | None = None,
) -> ClassOrder:
    """Pick the correct order and audit it against the folders and the checkpoint's mapping.

    `dataset`: a preset (`pipeline.presets`), whose classes every split's folders
    (`split_folders`: split -> class folders) must match exactly."""
    names, short = None, "the class-order file"
    if dataset is not None:
        from .presets import check_folders, get_preset

        if order_file is not None:
            raise DataError(f"give {ref('extract.dataset')} or {ORDER}, not both")
        preset = get_preset(dataset)
        check_folders(preset, split_folders or {"data": folder_classes})
        classes, names = preset.classes, preset.names
        source = f"the {preset.name} preset ({preset.title})"
        short = f"the {preset.name} preset"
    elif order_file is not None:
        classes, names = read_class_table(order_file)
        source = f"the class-order file {order_file}"
    else:
        classes, source = list(folder_classes), "sorted folder names"
    notes: list[str] = []
    extra = [c for c in folder_classes if c not in set(classes)]
    if extra:
        raise DataError(
            f"class folder(s) {', '.join(extra[:5])} are not in {source}; "
            "fix the class-order file or the folders"
        )
    absent = [c for c in classes if c not in set(folder_classes)]
    if absent:
        notes.append(f"{len(absent)} class(es) in {source} have no folder (e.g. {absent[0]})")
    if source != "sorted folder names" and classes != folder_classes:
        notes.append(_diff_text(short, classes, "sorted folder names",
                                folder_classes))
    natural = sorted(folder_classes, key=natural_key)
    if natural != folder_classes:
        notes.append(
            "sorted folder names differ from their natural sort (e.g. '2' before '10'); "
            f"if the model was trained with natural order, pass it as {ORDER}"
        )
    if checkpoint_classes is not None and checkpoint_classes != classes:
        notes.append(_diff_text("the checkpoint's own class mapping", checkpoint_classes, source,
                                classes))
    # kept in the store's attributes too: plain text, in the scripts' flags
    return ClassOrder(classes, source, [render(n) for n in notes], names)


def _diff_text(a_name: str, a: list[str], b_name: str, b: list[str]) -> str:
    if set(a) != set(b) or len(a) != len(b):
        return f"{a_name} ({len(a)} classes) and {b_name} ({len(b)} classes) name different classes"
    moved = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    i = moved[0]
    return (
        f"{a_name} and {b_name} disagree at {len(moved)} of {len(a)} indices "
        f"(e.g. index {i}: {a[i]!r} vs {b[i]!r})"
    )


# ---------------------------------------------------------------------------------------------
# PIL / torchvision: the reference path


def pil_transform(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """torchvision's eval transform: Resize(short side) -> CenterCrop -> ToTensor -> Normalize."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    mode = InterpolationMode(pre.interpolation)
    img = F.resize(img, [pre.resize], interpolation=mode, antialias=True)
    img = F.center_crop(img, [pre.crop])
    tensor = F.pil_to_tensor(img).float().div_(255)
    return F.normalize(tensor, pre.mean, pre.std)
