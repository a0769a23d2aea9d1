"""The feature store: a Zarr v3 group, one subgroup per split.

Layout (documented for users in README.md):

    STORE/                       group; attrs: format, classes, fingerprint, record, splits
      <split>/                   group; attrs: num_samples, chunk_rows, num_chunks, feature_dim
        features   [N, D]        float16 (float32 on request), one chunk = chunk_rows rows
        labels     [N]           int32, index into `classes` (the correct order)
        files      [N]           str, path relative to <data-root>/<split>
        ok         [N]           uint8, 1 = features valid, 0 = quarantined (row left at 0)
        reasons    [N]           str, why a row was quarantined (or how it was rescued), else ""
        chunk_done [num_chunks]  uint8, 1 once every array's rows of that chunk are written

Every chunk of every array carries a crc32c codec, so a flipped bit fails loudly on read.
Completion is recorded explicitly in `chunk_done` (a chunk never written reads back as the fill
value, indistinguishable from zeros). `chunk_done` has one element per storage chunk, so several
writers (torchrun ranks) that own disjoint chunk ranges never touch the same file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .errors import StoreError

log = logging.getLogger("quickfix")

FORMAT = "quickfix-labels/features"
FORMAT_VERSION = 1


def fingerprint_digest(components: dict) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


def file_list_digest(files: Sequence[str], labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    for f, label in zip(files, labels.tolist(), strict=True):
        digest.update(f"{f}\t{label}\n".encode())
    return digest.hexdigest()


@dataclass
class SplitSpec:
    name: str
    files: list[str]
    labels: np.ndarray


def is_store(path: Path) -> bool:
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, json.JSONDecodeError):
        return False
    return attrs.get("format") == FORMAT


def open_store(path: Path, mode: str = "r") -> zarr.Group:
    if not path.exists():
        raise StoreError(f"feature store {path} does not exist; run extract_features.py first")
    if not is_store(path):
        raise StoreError(f"{path} is not a Quick Fix Labels feature store (no {FORMAT} group)")
    group = zarr.open_group(str(path), mode=mode)
    version = group.attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"feature store {path} has layout version {version}; this tool reads "
            f"{FORMAT_VERSION}: rerun extract_features.py with --overwrite"
        )
    return group


def create_store(path: Path, *, classes: list[str], splits: Sequence[SplitSpec], feature_dim: int,
                 dtype: str, chunk_rows: int, fingerprint: dict, record: dict,
                 extra_attrs: dict | None = None) -> zarr.Group:
    """Create the whole layout (labels and file lists included) atomically.

    It is built in a sibling temp folder and renamed into place, so a crash here leaves either
    no store or a complete empty one, never a half-made one that looks valid.
    """
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    root = zarr.open_group(str(tmp), mode="w")
    for spec in splits:
        n = len(spec.files)
        num_chunks = -(-n // chunk_rows)
        g = root.create_group(spec.name)
        g.attrs.update({"num_samples": n, "chunk_rows": chunk_rows, "num_chunks": num_chunks,
                        "feature_dim": feature_dim})
        g.create_array("features", shape=(n, feature_dim), chunks=(chunk_rows, feature_dim),
                       dtype=dtype, fill_value=0, compressors=[Crc32cCodec()])
        for name, arr_dtype, fill in (("labels", "int32", -1), ("ok", "uint8", 0)):
            g.create_array(name, shape=(n,), chunks=(chunk_rows,), dtype=arr_dtype,
                           fill_value=fill, compressors=[ZstdCodec(level=3), Crc32cCodec()])
        for name in ("files", "reasons"):
            g.create_array(name, shape=(n,), chunks=(chunk_rows,), dtype=str,
                           compressors=[ZstdCodec(level=3), Crc32cCodec()])
        g.create_array("chunk_done", shape=(num_chunks,), chunks=(1,), dtype="uint8",
                       fill_value=0, compressors=[Crc32cCodec()])
        g["labels"][:] = spec.labels.astype(np.int32)
        g["files"][:] = np.asarray(spec.files, dtype=str)
    root.attrs.update({
        "classes": list(classes),
        "splits": [s.name for s in splits],
        "fingerprint": {"digest": fingerprint_digest(fingerprint), "components": fingerprint},
        "record": record,
        **(extra_attrs or {}),
    })
    # The format marker goes last: only a fully created store is recognised as one.
    root.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION})
    _fsync_tree(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return zarr.open_group(str(path), mode="r+")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def check_replaceable(path: Path) -> None:
    """--overwrite may only replace one of our stores or an empty folder, never user data."""
    if not path.exists():
        return
    if path.is_dir() and (is_store(path) or not any(path.iterdir())):
        return
    raise StoreError(
        f"--out {path} exists and is not a feature store; refusing to replace it: "
        "choose another --out"
    )


def fingerprint_differences(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Which components differ, as dotted names (for the refusal message)."""
    diffs = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}")
    return diffs


def split_progress(group: zarr.Group, split: str) -> np.ndarray:
    """The chunk_done marks of one split, as a bool array."""
    return group[split]["chunk_done"][:].astype(bool)


def owned_chunks(num_chunks: int, rank: int, world_size: int) -> range:
    """A contiguous, disjoint range of chunks for each writer."""
    per = -(-num_chunks // world_size)
    return range(min(rank * per, num_chunks), min((rank + 1) * per, num_chunks))


def write_chunk(group: zarr.Group, split: str, chunk: int, features: np.ndarray,
                ok: np.ndarray, reasons: Sequence[str]) -> None:
    """Write one chunk's rows, then mark it done (the mark is the commit point)."""
    g = group[split]
    rows = g.attrs["chunk_rows"]
    lo = chunk * rows
    hi = lo + len(features)
    g["features"][lo:hi] = features
    g["ok"][lo:hi] = ok.astype(np.uint8)
    g["reasons"][lo:hi] = np.asarray(reasons, dtype=str)
    g["chunk_done"][chunk] = 1


def verify_complete(group: zarr.Group, split: str) -> None:
    done = split_progress(group, split)
    if not done.all():
        first = int(np.flatnonzero(~done)[0])
        raise StoreError(
            f"split {split} of the feature store is incomplete: {int((~done).sum())} of "
            f"{done.size} chunks unwritten (first: {first}); rerun extract_features.py to finish"
        )
