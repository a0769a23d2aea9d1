"""The feature store: a Zarr v3 group, one subgroup per split.

Layout (documented for users in README.md):

    STORE/                       group; attrs: format, classes, fingerprint, record, splits
      <split>/                   group; attrs: num_samples, chunk_rows, num_chunks, feature_dim
        features   [N, D]        float16 (float32 on request), one chunk = chunk_rows rows
        labels     [N]           int32, index into `classes` (the correct order)
        files      [N]           str, path relative to <data-root>/<split> (a name that is not
                                 UTF-8: NUL + its bytes percent-encoded, see data.stored_name)
        stat       [N, 2]        int64, the file's size and mtime_ns when the store was made
        ok         [N]           uint8, 1 = features valid, 0 = quarantined (row left at 0)
        reasons    [N]           str, why a row was quarantined (or how it was rescued), else ""
        digests    [num_chunks, 6] uint32, crc32 of the chunk's file in each of DIGESTED
        chunk_done [num_chunks]  uint8, 1 once every array's rows of that chunk are written

Every chunk of every array carries a crc32c codec, so a flipped bit fails loudly on read.
Completion is recorded explicitly in `chunk_done` (a chunk never written reads back as the fill
value, indistinguishable from zeros). `chunk_done` has one element per storage chunk, so several
writers (torchrun ranks) that own disjoint chunk ranges never touch the same file.

Every chunk is written even when it equals the fill value (zarr skips those by default), so a
store proves itself by listing: each chunk that `chunk_done` marks has a file in every array
(`check_store`, milliseconds at ImageNet scale); `verify_store` reads and checks every chunk.
A checksum proves a chunk file intact, not that it is the file of its position (a chunk copied
over another passes it): `digests` records the crc32 of each array's chunk file at the commit
point, so a file at the wrong place is found by `verify_store`, and by stage 2 as it reads.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .data import stored_name
from .errors import DataError, StoreDamaged, StoreError, first_line, ref
from .files import explain
from .models import Preprocess

log = logging.getLogger("quickfix")

FORMAT = "quickfix-labels/features"
FORMAT_VERSION = 2  # 2: every chunk written (fill-valued ones too), `stat`, `digests`
ARRAYS = ("features", "labels", "files", "stat", "ok", "reasons", "digests", "chunk_done")
DIGESTED = ("features", "labels", "files", "stat", "ok", "reasons")  # digests' columns
# written when the store is made, from the file scan; the others as the backbone runs
SCAN_ARRAYS = ("labels", "files", "stat")
_ALL_CHUNKS = {"write_empty_chunks": True}

EXTRACT = ref("cmd.extract")
# what to do about a store found damaged as it is read
REPAIR = f"rerun {EXTRACT} with the same arguments and {ref('extract.verify')} to repair it"


def fingerprint_digest(components: dict) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


def file_list_digest(files: Sequence[str], labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    for f, label in zip(files, labels.tolist(), strict=True):
        digest.update(os.fsencode(f) + f"\t{label}\n".encode())
    return digest.hexdigest()


@dataclass
class SplitSpec:
    name: str
    files: list[str]  # os.fsdecode form (see data.stored_name)
    labels: np.ndarray
    stats: np.ndarray | None = None  # int64 [n, 2] size, mtime_ns; None: unknown (-1)

    def scan_rows(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """What the scan gives for rows lo..hi, per array."""
        stats = self.stats if self.stats is not None else np.full((len(self.files), 2), -1)
        return {"labels": self.labels[lo:hi].astype(np.int32),
                "files": np.asarray([stored_name(f) for f in self.files[lo:hi]], dtype=str),
                "stat": stats[lo:hi].astype(np.int64)}


def is_store(path: Path) -> bool:
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_bytes()).get("attributes", {})
    except (OSError, ValueError, AttributeError):  # unreadable, not UTF-8, not JSON, not a dict
        return False
    return isinstance(attrs, dict) and attrs.get("format") == FORMAT


def is_damaged_store(path: Path) -> bool:
    """A folder with a split of ours in it whose root metadata is missing or unreadable: what it
    was made from is lost, so it can only be made anew."""
    if not path.is_dir() or is_store(path):
        return False
    try:
        return any((d / "chunk_done").is_dir() and (d / "features").is_dir()
                   for d in path.iterdir() if d.is_dir())
    except OSError:
        return False


def open_store(path: Path, mode: str = "r") -> zarr.Group:
    if not path.exists():
        raise StoreError(f"feature store {path} does not exist; run {EXTRACT} first")
    if is_damaged_store(path):
        raise StoreError(f"the feature store {path} is damaged: its root metadata (zarr.json) is "
                         "missing or unreadable, so what it was made from is unknown; rerun "
                         f"{EXTRACT} with {ref('extract.overwrite')} to make it anew")
    if not is_store(path):
        raise StoreError(f"{path} is not a Quick Fix Labels feature store (no {FORMAT} group)")
    group = zarr.open_group(str(path), mode=mode)
    version = group.attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"feature store {path} has layout version {version}; this tool reads "
            f"{FORMAT_VERSION}: rerun {EXTRACT} with {ref('extract.overwrite')}"
        )
    return group


class FeatureStore:
    """An open feature store, and the one reader of its attributes: what it was made from (the
    fingerprint's components: backbone, preprocessing, decoder, precision), its classes and
    splits, each split's geometry, and the proofs and reads of its rows.

    The stages hold a FeatureStore; the module's functions below take its zarr group."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path, self.group = Path(path), group

    @classmethod
    def open(cls, path: Path, mode: str = "r") -> FeatureStore:
        return cls(path, open_store(path, mode))

    # --- what it holds and was made from ---------------------------------------------------

    @property
    def classes(self) -> list[str]:
        return list(self.group.attrs["classes"])

    @property
    def class_names(self) -> list[str] | None:
        names = self.group.attrs.get("class_names")
        return list(names) if names is not None else None

    def set_class_names(self, names: list[str] | None) -> bool:
        """Record the classes' human names (not part of the inputs: they change no feature);
        True when they changed."""
        if self.group.attrs.get("class_names") == names:
            return False
        self.group.attrs["class_names"] = names
        return True

    @property
    def splits(self) -> list[str]:
        return list(self.group.attrs["splits"])

    @property
    def components(self) -> dict:
        """What the store was made from (its fingerprint before hashing)."""
        return self.group.attrs["fingerprint"]["components"]

    @property
    def digest(self) -> str:
        return self.group.attrs["fingerprint"]["digest"]

    @property
    def created_utc(self) -> str | None:
        return (self.group.attrs.get("record") or {}).get("created_utc")

    @property
    def model(self) -> dict:
        """The record of the checkpoint it was made from (path, backbone digest, head, classes,
        layout, weights, ema); {} for a store made without one."""
        return dict(self.group.attrs.get("checkpoint") or {})

    @property
    def ema(self) -> bool:
        """Made from the checkpoint's EMA weights: stages 2 and 3 use the same copy."""
        return bool(self.model.get("ema", False))

    @property
    def per_class(self) -> dict[str, int] | None:
        """A sample store's images per class (split -> K, "*": every split); None: every
        image of the splits."""
        sample = self.group.attrs.get("sample")
        return dict(sample["per_class"]) if isinstance(sample, dict) else None

    @property
    def feature_dim(self) -> int:
        return int(self.components["feature_dim"])

    @property
    def preprocessing(self) -> Preprocess | None:
        p = self.components.get("preprocessing")
        return Preprocess.from_dict(p) if p is not None else None

    @property
    def decoder(self) -> str | None:
        """"pil", "dali-cpu" or "dali-mixed"."""
        return self.components.get("decoder")

    @property
    def precision(self) -> str | None:
        return (self.components.get("compute") or {}).get("precision")

    # --- each split ------------------------------------------------------------------------

    def chunk_rows(self, split: str) -> int:
        return int(self.group[split].attrs["chunk_rows"])

    def dtype(self, split: str) -> np.dtype:
        return self.group[split]["features"].dtype

    def done(self, split: str) -> np.ndarray:
        return split_progress(self.group, split)

    def read(self, split: str, name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        return read_rows(self.group, split, name, lo, hi)

    def read_noting(self, split: str, name: str, damage: Damage) -> np.ndarray:
        return read_noting(self.group, split, name, damage)

    # --- proofs ----------------------------------------------------------------------------

    def check(self) -> Damage:
        return check_store(self.group)

    def verify(self, progress=None) -> Damage:
        return verify_store(self.group, progress)

    def complete(self, split: str) -> None:
        verify_complete(self.group, split)

    def check_digests(self, split: str, names: Sequence[str], digests: np.ndarray | None = None,
                      chunks=None) -> np.ndarray:
        return check_digests(self.group, split, names, digests, chunks)

    def repair(self, damage: Damage, specs: Sequence[SplitSpec], **geometry) -> None:
        repair(self.group, damage, specs, **geometry)

    def writer(self) -> str | None:
        """Who is writing the store now (see WriterLock), or None."""
        return writer_of(self.path)


def create_store(path: Path, *, classes: list[str], splits: Sequence[SplitSpec], feature_dim: int,
                 dtype: str, chunk_rows: int, fingerprint: dict, record: dict,
                 extra_attrs: dict | None = None) -> zarr.Group:
    """Create the whole layout (labels and file lists included) atomically.

    It is built in a sibling temp folder and renamed into place, so a crash here leaves either
    no store or a complete empty one, never a half-made one that looks valid.
    """
    # what a run killed here left (this run holds the store's lock, so none of it is live)
    stale = (f".{path.name}.creating-", f".{path.name}.old-")
    for entry in path.parent.iterdir() if path.parent.is_dir() else ():
        if entry.name.startswith(stale):
            shutil.rmtree(entry, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        root = zarr.open_group(str(tmp), mode="w")
        for spec in splits:
            _create_split(root, spec, feature_dim=feature_dim, dtype=dtype,
                          chunk_rows=chunk_rows, digest=fingerprint_digest(fingerprint))
        _write_root(root, classes=classes, splits=[s.name for s in splits],
                    fingerprint=fingerprint, record=record, extra_attrs=extra_attrs)
        _fsync_tree(tmp)
    except BaseException:
        _settle_writes()
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves nothing half-made
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return zarr.open_group(str(path), mode="r+")


def _settle_writes(timeout: float = 60.0) -> None:
    """Wait for zarr's writes still in flight. zarr writes a group's or an array's keys
    concurrently on its own event loop; when one fails (a full disk), the error comes back at
    once while the others go on, and one of them could create a file after the cleanup (seen:
    a parent group's zarr.json, rewritten as a child group was made)."""
    import asyncio

    from zarr.core.sync import sync

    async def drain() -> None:
        me = asyncio.current_task()
        await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not me),
                             return_exceptions=True)

    try:
        sync(drain(), timeout=timeout)
    except Exception:  # noqa: BLE001 - the cleanup goes on regardless
        pass


def _write_root(root: zarr.Group, *, classes: Sequence[str], splits: Sequence[str],
                fingerprint: dict, record: dict, extra_attrs: dict | None) -> None:
    root.attrs.update({
        "classes": list(classes),
        "splits": list(splits),
        "fingerprint": {"digest": fingerprint_digest(fingerprint), "components": fingerprint},
        "record": record,
        **(extra_attrs or {}),
    })
    # The format marker goes last: only a fully created store is recognised as one.
    root.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION})


def restore_root(path: Path, *, classes: Sequence[str], splits: Sequence[SplitSpec],
                 fingerprint: dict, record: dict, extra_attrs: dict | None = None, **_) -> bool:
    """Rewrite a store's lost root metadata from the inputs of this run, when every split of the
    store records (in its own attributes) the digest of exactly these inputs; False otherwise
    (then only --overwrite can make the store anew). Takes `create_store`'s arguments."""
    digest = fingerprint_digest(fingerprint)
    names = [s.name for s in splits]
    present = [d.name for d in path.iterdir() if d.is_dir() and (d / "chunk_done").is_dir()]
    if not present or set(present) - set(names):
        return False
    for name in present:
        try:
            attrs = json.loads((path / name / "zarr.json").read_bytes()).get("attributes", {})
        except (OSError, ValueError, AttributeError):
            continue  # a damaged split: rebuilt by the repair that follows
        if not isinstance(attrs, dict) or attrs.get("fingerprint") != digest:
            return False
    (path / "zarr.json").unlink(missing_ok=True)
    _write_root(zarr.open_group(str(path), mode="a"), classes=classes, splits=names,
                fingerprint=fingerprint, record=record, extra_attrs=extra_attrs)
    _fsync_tree(path, names=("zarr.json",))
    return True


def _create_split(root: zarr.Group, spec: SplitSpec, *, feature_dim: int, dtype: str,
                  chunk_rows: int, digest: str) -> None:
    """One split's arrays, with the scan's arrays (labels, files, stat) written. The split
    records the digest of the store's inputs, so a store whose root metadata is lost can be
    told to be the same inputs' (`restore_root`)."""
    n = len(spec.files)
    num_chunks = -(-n // chunk_rows)
    g = root.create_group(spec.name, overwrite=True)
    g.attrs.update({"num_samples": n, "chunk_rows": chunk_rows, "num_chunks": num_chunks,
                    "feature_dim": feature_dim, "fingerprint": digest})
    packed = [ZstdCodec(level=3), Crc32cCodec()]
    g.create_array("features", shape=(n, feature_dim), chunks=(chunk_rows, feature_dim),
                   dtype=dtype, fill_value=0, compressors=[Crc32cCodec()])
    for name, arr_dtype, fill in (("labels", "int32", -1), ("ok", "uint8", 0)):
        g.create_array(name, shape=(n,), chunks=(chunk_rows,), dtype=arr_dtype,
                       fill_value=fill, compressors=packed)
    g.create_array("stat", shape=(n, 2), chunks=(chunk_rows, 2), dtype="int64", fill_value=-1,
                   compressors=packed)
    for name in ("files", "reasons"):
        g.create_array(name, shape=(n,), chunks=(chunk_rows,), dtype=str, compressors=packed)
    g.create_array("digests", shape=(num_chunks, len(DIGESTED)), chunks=(1, len(DIGESTED)),
                   dtype="uint32", fill_value=0, compressors=[Crc32cCodec()])
    g.create_array("chunk_done", shape=(num_chunks,), chunks=(1,), dtype="uint8",
                   fill_value=0, compressors=[Crc32cCodec()])
    for name, values in spec.scan_rows(0, n).items():
        g[name].with_config(_ALL_CHUNKS)[:] = values


def _fsync_tree(root: Path, names: Sequence[str] | None = None) -> None:
    """fsync every file under `root` (only `root`'s own `names`, when given)."""
    walk = [(str(root), [], list(names))] if names is not None else os.walk(root)
    for dirpath, _, filenames in walk:
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
    if path.is_dir() and (is_store(path) or is_damaged_store(path) or not any(path.iterdir())):
        return
    raise StoreError(
        f"{ref('extract.out')} {path} exists and is not a feature store; refusing to replace "
        f"it: choose another {ref('extract.out')}"
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
    """The chunk_done marks of one split, as a bool array (a mark that cannot be read: not
    done, so the chunk is redone)."""
    return _read_done(group, split, Damage())


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
    arrays = tuple(g[k].with_config(_ALL_CHUNKS) for k in ("features", "ok", "reasons"))
    arrays[0][lo:hi] = features
    arrays[1][lo:hi] = ok.astype(np.uint8)
    arrays[2][lo:hi] = np.asarray(reasons, dtype=str)
    _fsync_chunks(arrays, chunk)
    digests = g["digests"]
    digests[chunk] = [chunk_digest(group, split, name, chunk) for name in DIGESTED]
    _fsync_chunks((digests,), chunk)
    done = g["chunk_done"]
    done[chunk] = 1
    _fsync_chunks((done,), chunk)


def chunk_path(group: zarr.Group, split: str, name: str, chunk: int) -> Path:
    """The file that holds `chunk` of array `name` (a local store)."""
    arr = group[split][name]
    key = arr.metadata.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1))
    return Path(group.store.root) / split / name / key


def chunk_digest(group: zarr.Group, split: str, name: str, chunk: int) -> int:
    """crc32 of a chunk's file as stored (0 when it has none)."""
    try:
        return zlib.crc32(chunk_path(group, split, name, chunk).read_bytes())
    except FileNotFoundError:
        return 0


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

    def __init__(self, store: FeatureStore, splits: Sequence[str],
                 files: Sequence[Sequence[str]], *, chunk_rows: int, feature_dim: int,
                 dtype: np.dtype, queue_size: int = 4, nonfinite_hint: str = ""):
        self.group, self.splits, self.files = store.group, list(splits), files
        self.nonfinite_hint = nonfinite_hint
        self.chunk_rows, self.feature_dim, self.dtype = chunk_rows, feature_dim, np.dtype(dtype)
        self.quarantined = self.rescued = 0
        self.busy_seconds = 0.0
        self._open: dict[tuple[int, int], list] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="quickfix-writer", daemon=True)
        self._thread.start()

    def put(self, split: int, lo: int, features, ok: np.ndarray, reasons: Sequence[str], *,
            peak=None, ready=None, release=None) -> None:
        """`peak`: each row's largest magnitude as computed (before any cast), checked against
        NaN, inf and the store dtype's range; None: taken from `features`."""
        self.raise_if_failed()
        self._queue.put((split, lo, features, ok, list(reasons), peak, ready, release))

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
                raise StoreError(f"cannot write the feature store {where}: {explain(err)}; "
                                 "the chunks written so far are kept: rerun the same command "
                                 "to resume") from err
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

    def _take(self, split, lo, features, ok, reasons, peak, ready, release) -> None:
        try:
            if ready is not None:
                ready.synchronize()  # the device-to-host copy of these rows has landed
            values = np.asarray(features)[:len(ok)]
            peak = np.abs(values.astype(np.float32)).max(axis=1, initial=0) if peak is None \
                else np.asarray(peak)[:len(ok)].copy()
            with np.errstate(over="ignore"):  # an overflow is refused just below
                rows = values.astype(self.dtype, copy=True)
        finally:
            if release is not None:
                release()
        self._check_finite(split, lo, ok, peak)
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


    def _check_finite(self, split: int, lo: int, ok: np.ndarray, peak: np.ndarray) -> None:
        """Nothing non-finite is ever stored: NaN/inf from the backbone, or a value beyond the
        store dtype's range (which the cast would turn into inf), stops the run."""
        files = self.files[split]
        bad = np.flatnonzero(ok & ~np.isfinite(peak))
        if bad.size:
            names = ", ".join(str(files[lo + i]) for i in bad[:3])
            raise DataError(f"the backbone gave non-finite features (NaN or inf) for {bad.size} "
                            f"of the {len(ok)} images of a batch ({names}"
                            f"{', ...' if bad.size > 3 else ''}); {self.nonfinite_hint}")
        limit = float(np.finfo(self.dtype).max)
        over = np.flatnonzero(ok & (peak > limit))
        if over.size:
            names = ", ".join(str(files[lo + i]) for i in over[:3])
            raise DataError(f"features reach {float(peak[over].max()):.3g}, beyond {self.dtype}'s "
                            f"range ({limit:.6g}), for {over.size} images ({names}"
                            f"{', ...' if over.size > 3 else ''}): rerun with "
                            f"{ref('extract.float32')} {ref('extract.overwrite')} to store "
                            "float32 features")


class _Aborted(Exception):
    pass


def verify_complete(group: zarr.Group, split: str) -> None:
    done = split_progress(group, split)
    if not done.all():
        first = int(np.flatnonzero(~done)[0])
        raise StoreError(
            f"split {split} of the feature store is incomplete: {int((~done).sum())} of "
            f"{done.size} chunks unwritten (first: {first}); rerun {EXTRACT} to finish"
        )


# ---------------------------------------------------------------------------------------------
# A store that proves itself: listing (every run), reading (--verify), repair (stage 1)


@dataclass
class Damage:
    """What is wrong with a store: per split, damaged chunks and why; splits to rebuild whole."""

    chunks: dict[str, dict[int, str]] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)  # split -> why it must be rebuilt

    def __bool__(self) -> bool:
        return bool(self.splits) or any(self.chunks.values())

    def add(self, split: str, chunk: int, why: str) -> None:
        self.chunks.setdefault(split, {}).setdefault(chunk, why)

    def describe(self, limit: int = 3) -> str:
        parts = [f"{split}: {why}" for split, why in self.splits.items()]
        for split, bad in self.chunks.items():
            parts += [f"{split} chunk {c}: {why}" for c, why in sorted(bad.items())]
        more = f" (and {len(parts) - limit} more)" if len(parts) > limit else ""
        return "; ".join(parts[:limit]) + more


def _chunk_files(group: zarr.Group, split: str, name: str) -> set[int]:
    """The chunks of one array that have a file (by listing the folder, not by reading)."""
    base = Path(group.store.root) / split / name / "c"
    try:
        entries = list(os.scandir(base))
    except FileNotFoundError:
        return set()
    two_d = group[split][name].ndim == 2
    found = set()
    for e in entries:
        if not e.name.isdigit():
            continue
        if two_d:  # c/<row chunk>/0
            if os.path.isfile(os.path.join(e.path, "0")):
                found.add(int(e.name))
        elif e.is_file():
            found.add(int(e.name))
    return found


def _read_done(group: zarr.Group, split: str, damage: Damage) -> np.ndarray:
    """chunk_done as bools; a mark that cannot be read counts as not done (and is noted)."""
    return read_noting(group, split, "chunk_done", damage).astype(bool)


def check_store(group: zarr.Group) -> Damage:
    """Damage visible by listing: split or array metadata missing or unreadable, a chunk marked
    done without a file in every array, a chunk of the scan's arrays missing. Costs one folder
    listing per array."""
    damage = Damage()
    for split in group.attrs["splits"]:
        try:
            with warnings.catch_warnings():  # zarr warns about a folder without metadata
                warnings.simplefilter("ignore")
                g = group[split]
                n, rows = int(g.attrs["num_samples"]), int(g.attrs["chunk_rows"])
                missing = [a for a in ARRAYS if a not in g.array_keys()]
        except Exception:
            damage.splits[split] = "its metadata is missing or unreadable"
            continue
        per_chunk = ("digests", "chunk_done")
        if missing:
            damage.splits[split] = f"array(s) {', '.join(missing)} missing or unreadable"
            continue
        if any(g[a].shape[0] != (-(-n // rows) if a in per_chunk else n) for a in ARRAYS):
            damage.splits[split] = "arrays of the wrong shape"
            continue
        num_chunks = -(-n // rows)
        done = _read_done(group, split, damage)
        for name in ARRAYS[:-1]:
            present = _chunk_files(group, split, name)
            wanted = range(num_chunks) if name in SCAN_ARRAYS else np.flatnonzero(done)
            for c in wanted:
                if int(c) not in present:
                    damage.add(split, int(c), f"{name} chunk file missing")
    return damage


def verify_store(group: zarr.Group, progress=None) -> Damage:
    """Damage found by reading every chunk of every array: `check_store`'s, plus chunks that fail
    their checksum or cannot be decoded, files that are not the one written at their position
    (`digests`), and non-finite features in rows marked ok."""
    damage = check_store(group)
    for split in group.attrs["splits"]:
        if split in damage.splits:
            continue
        g = group[split]
        rows = int(g.attrs["chunk_rows"])
        done = _read_done(group, split, damage)
        digests = read_noting(group, split, "digests", damage)
        for c in range(done.size):
            lo = c * rows
            for name in ARRAYS[:-2]:
                if name not in SCAN_ARRAYS and not done[c]:
                    continue
                try:
                    values = g[name][lo:lo + rows]
                except Exception as exc:
                    damage.add(split, c, f"{name} chunk unreadable ({_short(exc)})")
                    continue
                if done[c] and chunk_digest(group, split, name, c) != digests[c][
                        DIGESTED.index(name)]:
                    damage.add(split, c, misplaced(name))
                if name == "features" and done[c]:
                    try:
                        ok = g["ok"][lo:lo + rows].astype(bool)
                    except Exception:  # found when the loop reaches `ok`
                        continue
                    if not np.isfinite(values[ok]).all():
                        damage.add(split, c, "features chunk holds non-finite values")
            if progress is not None:
                progress.update(min(rows, int(g.attrs["num_samples"]) - lo))
    return damage


def misplaced(name: str) -> str:
    return f"{name} chunk file is not the one written there (its crc32 differs from `digests`)"


def check_digests(group: zarr.Group, split: str, names: Sequence[str],
                  digests: np.ndarray | None = None, chunks=None) -> np.ndarray:
    """Raise a StoreError (naming split, array and chunk) when a chunk file of `names` is not
    the one written at its position; returns the split's digests for later checks."""
    if digests is None:
        digests = read_rows(group, split, "digests")
    for c in range(digests.shape[0]) if chunks is None else chunks:
        for name in names:
            if chunk_digest(group, split, name, c) != digests[c][DIGESTED.index(name)]:
                where = getattr(group.store, "root", group.store)
                raise StoreDamaged(f"the feature store {where} is damaged: {split}/{name} chunk "
                                   f"{c} is not the file written there (its crc32 differs from "
                                   f"the one recorded in `digests`); {REPAIR}")
    return digests


def _short(exc: BaseException) -> str:
    text = first_line(exc)
    return "it fails its checksum" if "checksum" in text else text[:80]


def read_noting(group: zarr.Group, split: str, name: str, damage: Damage) -> np.ndarray:
    """A whole array of one split; chunks that cannot be read are noted in `damage` and read as
    the fill value."""
    arr = group[split][name]
    try:
        return arr[:]
    except Exception:
        rows = arr.chunks[0]
        out = np.full(arr.shape, arr.fill_value, dtype=arr.dtype)
        for c in range(-(-arr.shape[0] // rows)):
            try:
                out[c * rows:(c + 1) * rows] = arr[c * rows:(c + 1) * rows]
            except Exception as exc:
                damage.add(split, c, f"{name} chunk unreadable ({_short(exc)})")
        return out


def repair(group: zarr.Group, damage: Damage, specs: Sequence[SplitSpec], *, feature_dim: int,
           dtype: str, chunk_rows: int) -> None:
    """Make every damaged chunk to-do again: the scan's arrays are rewritten from `specs` and the
    chunk's done mark cleared, so the run recomputes its features; a split whose metadata is gone
    is made anew. The result, once the run ends, is the store an untouched run makes."""
    by_name = {s.name: s for s in specs}
    for split in damage.splits:
        shutil.rmtree(Path(group.store.root) / split, ignore_errors=True)
        _create_split(group, by_name[split], feature_dim=feature_dim, dtype=dtype,
                      chunk_rows=chunk_rows, digest=group.attrs["fingerprint"]["digest"])
    for split, bad in damage.chunks.items():
        if split in damage.splits or not bad:
            continue
        g, spec = group[split], by_name[split]
        n = len(spec.files)
        done = g["chunk_done"]
        for c in sorted(bad):
            done[c] = 0  # first: a crash in the middle of the repair leaves the chunk to do
            _fsync_chunks((done,), c)
            lo, hi = c * chunk_rows, min((c + 1) * chunk_rows, n)
            for name, values in spec.scan_rows(lo, hi).items():
                arr = g[name].with_config(_ALL_CHUNKS)
                arr[lo:hi] = values
            _fsync_chunks(tuple(g[k] for k in SCAN_ARRAYS), c)


def read_rows(group: zarr.Group, split: str, name: str, lo: int = 0,
              hi: int | None = None) -> np.ndarray:
    """Rows lo..hi of `group[split][name]`; a chunk that fails its checksum or cannot be decoded
    is a StoreError naming the split, array and chunk."""
    arr = group[split][name]
    hi = arr.shape[0] if hi is None else hi
    try:
        return arr[lo:hi]
    except Exception as exc:
        rows, bad, err = arr.chunks[0], lo // arr.chunks[0], exc
        for c in range(lo // rows, -(-hi // rows)):
            try:
                arr[c * rows:(c + 1) * rows]
            except Exception as chunk_exc:
                bad, err = c, chunk_exc
                break
        where = getattr(group.store, "root", group.store)
        raise StoreDamaged(
            f"the feature store {where} is damaged: {split}/{name} chunk {bad} cannot be read "
            f"({_short(err)}); {REPAIR}") from exc


# ---------------------------------------------------------------------------------------------
# One writer at a time


class WriterLock:
    """An exclusive lock on a store, held by the one run that writes it.

    It is `flock` on a file beside the store (`.NAME.lock`: the store itself is replaced by
    --overwrite), so the kernel releases it when the process dies, however it dies: a killed run
    never blocks its resume. The file holds the holder's host, pid and start time for the
    refusal message, and is removed on a clean exit (with the inode check that makes removing a
    lock file safe against a run that opened it meanwhile). On NFS, Linux maps flock to the
    server's byte-range locks (NFSv4, or v3 with lockd), so runs on different machines exclude
    each other; a file system without locks (some FUSE mounts; Lustre without -o flock) makes it
    a warning and the run goes on unguarded.
    """

    def __init__(self, store: Path):
        self.path = store.with_name(f".{store.name}.lock")
        self.store = store
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreError(f"{self.store} is being written by another run "
                                 f"({holder(self.path)}); wait for it to end, or stop it") from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                log.warning("the file system of %s has no locks (%s): nothing stops another "
                            "run from writing this store at the same time", self.store,
                            exc.strerror)
                os.close(fd)
                return self
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # the holder removed it as we took it: take the new one
                same = False
            if same:
                break
            os.close(fd)
        info = json.dumps({"host": os.uname().nodename, "pid": os.getpid(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode() + b"\n", 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # under the lock: whoever opened it meanwhile sees another inode
        except OSError:
            pass
        os.close(self._fd)  # closing releases the lock
        self._fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def writer_of(store: Path) -> str | None:
    """Who holds `store`'s writer lock now ("host ..., pid ..., started ..."), or None."""
    path = store.with_name(f".{store.name}.lock")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return holder(path)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
