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
import queue
import shutil
import threading
import time
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
    """Write one chunk's rows durably, then mark it done (the mark is the commit point).

    The rows are fsynced before the mark is written, so after a crash or power loss a chunk
    marked done always has its data on disk; a chunk without its mark is simply redone.
    """
    g = group[split]
    rows = g.attrs["chunk_rows"]
    lo = chunk * rows
    hi = lo + len(features)
    arrays = (g["features"], g["ok"], g["reasons"])
    arrays[0][lo:hi] = features
    arrays[1][lo:hi] = ok.astype(np.uint8)
    arrays[2][lo:hi] = np.asarray(reasons, dtype=str)
    _fsync_chunks(arrays, chunk)
    g["chunk_done"][chunk] = 1
    _fsync_chunks((g["chunk_done"],), chunk)


def _fsync_chunks(arrays, chunk: int) -> None:
    """fsync the storage file of `chunk` in each array, and the folder that names it."""
    for arr in arrays:
        root = getattr(arr.store, "root", None)
        if root is None:  # not a local store: durability is the store's own business
            continue
        key = arr.metadata.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1))
        path = Path(root) / arr.path / key
        for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | os.O_DIRECTORY)):
            try:
                fd = os.open(target, flags)
            except FileNotFoundError:  # an all-fill chunk is not written at all
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class ChunkWriter:
    """Assembles finished rows into chunks and writes them on a background thread.

    `put` hands over the features of rows lo..lo+n of one split (a tensor, possibly still being
    copied from the GPU: `ready` is then a CUDA event to wait for). When every row of a chunk
    has arrived, the chunk is written and marked done (`write_chunk`). Quarantined rows are
    written as zeros. The first error stops the writer; `put` and `close` raise it.
    """

    def __init__(self, group: zarr.Group, splits: Sequence[str], files: Sequence[Sequence[str]],
                 *, chunk_rows: int, feature_dim: int, dtype: np.dtype, queue_size: int = 4):
        self.group, self.splits, self.files = group, list(splits), files
        self.chunk_rows, self.feature_dim, self.dtype = chunk_rows, feature_dim, np.dtype(dtype)
        self.quarantined = self.rescued = 0
        self.busy_seconds = 0.0
        self._open: dict[tuple[int, int], list] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="quickfix-writer", daemon=True)
        self._thread.start()

    def put(self, split: int, lo: int, features, ok: np.ndarray, reasons: Sequence[str], *,
            ready=None, release=None) -> None:
        self.raise_if_failed()
        self._queue.put((split, lo, features, ok, list(reasons), ready, release))

    def close(self) -> None:
        """Write what is queued, stop the thread, and raise its error if it had one."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.raise_if_failed()
        if self._open:
            raise RuntimeError(f"{len(self._open)} chunk(s) were left incomplete")

    def abort(self) -> None:
        """Stop after the write in progress; queued rows are dropped (their chunks stay undone)."""
        if self._error is None:
            self._error = _Aborted()
        if self._thread.is_alive():
            self._queue.put(None)  # the loop drains the queue once an error is set
            self._thread.join()

    def raise_if_failed(self) -> None:
        if self._error is not None and not isinstance(self._error, _Aborted):
            err = self._error
            if isinstance(err, OSError):
                where = getattr(self.group.store, "root", self.group.store)
                raise StoreError(f"cannot write the feature store {where}: "
                                 f"{err.strerror or err}") from err
            raise err

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            release = item[-1]
            if self._error is not None:  # failed or aborted: drain, so `put` never blocks
                if release is not None:
                    release()
                continue
            start = time.perf_counter()
            try:
                self._take(*item)
            except BaseException as exc:  # handed to the main thread by put/close
                self._error = exc
            self.busy_seconds += time.perf_counter() - start

    def _take(self, split, lo, features, ok, reasons, ready, release) -> None:
        try:
            if ready is not None:
                ready.synchronize()  # the device-to-host copy of these rows has landed
            rows = np.asarray(features)[:len(ok)].astype(self.dtype, copy=True)
        finally:
            if release is not None:
                release()
        rows[~ok] = 0
        n_split = len(self.files[split])
        c = lo // self.chunk_rows
        c_lo = c * self.chunk_rows
        c_n = min(self.chunk_rows, n_split - c_lo)
        if lo + len(ok) > c_lo + c_n:
            raise RuntimeError(f"rows {lo}..{lo + len(ok)} cross the end of chunk {c}")
        acc = self._open.get((split, c))
        if acc is None:
            acc = self._open[(split, c)] = [np.zeros((c_n, self.feature_dim), self.dtype),
                                            np.zeros(c_n, bool), [""] * c_n, 0]
        feats, good, why, _ = acc
        a = lo - c_lo
        feats[a:a + len(ok)] = rows
        good[a:a + len(ok)] = ok
        why[a:a + len(ok)] = reasons
        acc[3] += len(ok)
        if acc[3] < c_n:
            return
        del self._open[(split, c)]
        write_chunk(self.group, self.splits[split], c, feats, good, why)
        for i in np.flatnonzero(~good):
            log.warning("quarantined %s: %s", self.files[split][c_lo + i], why[i])
        self.quarantined += int((~good).sum())
        self.rescued += sum(1 for i, r in enumerate(why) if r and good[i])


class _Aborted(Exception):
    pass


def verify_complete(group: zarr.Group, split: str) -> None:
    done = split_progress(group, split)
    if not done.all():
        first = int(np.flatnonzero(~done)[0])
        raise StoreError(
            f"split {split} of the feature store is incomplete: {int((~done).sum())} of "
            f"{done.size} chunks unwritten (first: {first}); rerun extract_features.py to finish"
        )
