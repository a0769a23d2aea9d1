"""Stage 2 out of core: the features are read from the store a chunk at a time, never whole.

Each epoch sees every train row once, in an order shuffled on two levels, as WebDataset's and
tf.data's shuffle buffers do: the storage chunks are taken in a fresh random order, and the rows of
a window of `window` consecutive chunks (in that order) are shuffled together before they are cut
into batches; the rows left over at a window's end are carried into the next one, so every batch
but the epoch's last is full. Host memory holds the window (twice while it is assembled), the
chunks read ahead, and the labels (4 bytes a row). The order comes from `numpy.random.Generator`
seeded with --seed: the same seed gives the same batches, hence the same head.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .errors import StoreDamaged, ref
from .head import Features
from .store import EXTRACT, FeatureStore

log = logging.getLogger("quickfix")

READ_AHEAD = 2  # chunks read in the background while the previous ones are used


class StoreRows:
    """The rows of one split of the store that `mask` selects, read chunk by chunk.

    `blocks()` yields them as (x, y) host tensors, one chunk at a time in store order (what
    evaluation and the feature statistics need); `load()` reads them into memory. With `side`
    (another mask), the chunks read also carry those rows, flagged (the holdout, scored in the
    training pass); `len` counts the rows of `mask` only."""

    def __init__(self, store: FeatureStore, split: str, mask: np.ndarray,
                 side: np.ndarray | None = None, labels: np.ndarray | None = None):
        self.store, self.split = store, split
        self.chunk_rows = store.chunk_rows(split)
        # the split's, all rows
        self.labels = store.read(split, "labels") if labels is None else labels
        # each chunk's file is checked to be the one written at its position, on its first read
        self.digests = store.read(split, "digests")
        self.checked: set[int] = set()
        self.side = side
        self.rows = int(mask.sum())
        if side is not None:
            mask = mask | side
        self.mask = mask
        n_all = mask.shape[0]
        starts = np.arange(0, n_all, self.chunk_rows)
        counts = np.add.reduceat(mask.astype(np.int64), starts) if n_all else np.zeros(0, int)
        self.chunks = [int(c) for c in np.flatnonzero(counts)]
        self.dim = store.feature_dim
        self.dtype = torch.from_numpy(np.zeros(0, store.dtype(split))).dtype
        self.y = torch.from_numpy(self.labels[mask if side is None else mask & ~side]
                                  .astype(np.int64))

    def __len__(self) -> int:
        return self.rows

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.dim * self.dtype.itemsize

    def read(self, chunk: int) -> tuple:
        """The selected rows of one storage chunk: (features, labels), and with `side` the
        side rows' flags."""
        lo = chunk * self.chunk_rows
        x = self.store.read(self.split, "features", lo, lo + self.chunk_rows)
        if chunk not in self.checked:
            self.store.check_digests(self.split, ("features",), self.digests, [chunk])
            self.checked.add(chunk)
        keep = self.mask[lo:lo + len(x)]
        if not np.isfinite(x[keep]).all():
            raise StoreDamaged(f"the feature store {self.store.path} holds non-finite features in "
                             f"{self.split} chunk {chunk} (rows marked usable): rerun {EXTRACT} "
                             f"with the same arguments and {ref('extract.verify')} to find and "
                             "recompute them")
        part = (x[keep], self.labels[lo:lo + len(x)][keep].astype(np.int64))
        if self.side is None:
            return part
        return (*part, self.side[lo:lo + len(x)][keep])

    def chunks_in(self, order: Sequence[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(x, y) of each chunk of `order`, read READ_AHEAD chunks ahead on a thread."""
        with ThreadPoolExecutor(1, thread_name_prefix="quickfix-read") as pool:
            todo = iter(order)
            pending = deque(pool.submit(self.read, c) for c in itertools.islice(todo, READ_AHEAD))
            while pending:
                part = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(self.read, nxt))
                yield part
                del part

    def blocks(self, size: int = 4096) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) of at most `size` rows, chunk by chunk in store order."""
        assert self.side is None, "blocks() of the main rows only"
        for x, y in self.chunks_in(self.chunks):
            for lo in range(0, len(x), size):
                yield torch.from_numpy(x[lo:lo + size]), torch.from_numpy(y[lo:lo + size])

    def load(self) -> tuple[Features, Features | None]:
        """The selected rows in memory (and the side rows, if any), filled chunk by chunk in
        one pass over the store (no second copy of the split, no second read)."""
        side_rows = int(self.side[self.mask].sum()) if self.side is not None else 0
        x = torch.empty(self.rows, self.dim, dtype=self.dtype)
        sx = torch.empty(side_rows, self.dim, dtype=self.dtype)
        sy = torch.empty(side_rows, dtype=torch.long)
        at = side_at = 0
        for part in self.chunks_in(self.chunks):
            px, py = part[0], part[1]
            if self.side is not None:
                flag = part[2]
                n = int(flag.sum())
                sx[side_at:side_at + n] = torch.from_numpy(px[flag])
                sy[side_at:side_at + n] = torch.from_numpy(py[flag])
                side_at += n
                px = px[~flag]
            x[at:at + len(px)] = torch.from_numpy(px)
            at += len(px)
        return Features(x, self.y), (Features(sx, sy) if self.side is not None else None)


class WindowBatches:
    """The out-of-core batches of an epoch: (x [B, D], y [B], mask [B]) on the device, the last
    one padded (mask 0), in the two-level shuffled order described above (a
    `head.BatchSource` that draws its own order)."""

    own_order, sharded = True, False

    def __init__(self, rows: StoreRows, batch_size: int, device: torch.device, *,
                 buffer_bytes: int, seed: int, side_name: str | None = None):
        self.source, self.batch_size, self.device = rows, batch_size, device
        self.rows = len(rows)
        self.steps = -(-len(rows) // batch_size)
        # the window is held twice while it is assembled, and READ_AHEAD chunks are in flight
        self.window = max(1, (buffer_bytes // max(rows.chunk_bytes, 1) - READ_AHEAD) // 2)
        if buffer_bytes < (2 * self.window + READ_AHEAD) * rows.chunk_bytes:
            log.warning("%s %.0f MB holds fewer than %d chunks of %.1f MB: out of core takes %.0f "
                        "MB; a smaller %s in stage 1 fits the buffer", ref("train.stream_buffer"),
                        buffer_bytes / 2**20, 2 + READ_AHEAD, rows.chunk_bytes / 2**20,
                        (2 * self.window + READ_AHEAD) * rows.chunk_bytes / 2**20,
                        ref("extract.chunk_rows"))
        self.rng = np.random.default_rng(seed)
        self.full = torch.ones(batch_size, device=device)
        self.side_name = side_name if rows.side is not None else None

    def epoch(self, perm=None, side=None):
        """The epoch's batches (`perm`, a device permutation, is not used: the order is drawn
        here, on the host, chunk by chunk). The side rows of each chunk (the holdout) go to
        `side(x, y)` as the chunk arrives, and never into a batch."""
        order = self.rng.permutation(np.asarray(self.source.chunks, dtype=np.int64)).tolist()
        carry: list[tuple[np.ndarray, np.ndarray]] = []
        window: list[tuple[np.ndarray, np.ndarray]] = []
        for part in self.source.chunks_in(order):
            if self.source.side is not None:
                x, y, flag = part
                if side is not None and flag.any():
                    side(torch.from_numpy(x[flag]), torch.from_numpy(y[flag]))
                part = (x[~flag], y[~flag]) if flag.any() else (x, y)
                del x, y
            window.append(part)
            del part
            if len(window) == self.window:
                yield from self._cut(carry, window, last=False)
        yield from self._cut(carry, window, last=True)

    def _cut(self, carry: list, window: list, *, last: bool):
        """Shuffle the carried rows and the window's together, yield the full batches (and on
        the last window the rest), and carry the rest over; both lists are emptied first, so
        the chunks are held once the window is assembled."""
        parts = carry + window
        carry.clear()
        window.clear()
        if not parts:
            return
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        del parts
        order = self.rng.permutation(len(x))
        b = self.batch_size
        full = len(x) // b * b
        for lo in range(0, full, b):
            yield self._batch(x, y, order[lo:lo + b])
        rest = order[full:]
        if not len(rest):
            return
        if last:
            yield self._batch(x, y, rest)
        else:
            carry.append((x[rest], y[rest]))

    def _batch(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray):
        n, b = len(rows), self.batch_size
        if n == b:  # one gather, no padding
            return (torch.from_numpy(x[rows]).to(self.device),
                    torch.from_numpy(y[rows]).to(self.device), self.full)
        bx = torch.zeros(b, x.shape[1], dtype=self.source.dtype)
        bx[:n] = torch.from_numpy(x[rows])
        by = torch.zeros(b, dtype=torch.long)
        by[:n] = torch.from_numpy(y[rows])
        mask = torch.zeros(b)
        mask[:n] = 1
        return bx.to(self.device), by.to(self.device), mask.to(self.device)


def available_memory() -> int:
    """Bytes this process may still use: MemAvailable, or the cgroup's limit if lower."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        # the page cache the kernel can drop (the store just written, say) is not in use
        for line in Path("/sys/fs/cgroup/memory.stat").read_text().splitlines():
            if line.startswith("inactive_file "):
                used -= int(line.split()[1])
        if limit != "max":
            avail = min(avail, int(limit) - max(used, 0))
    except (OSError, ValueError):
        pass
    # torchrun's processes on this machine load their shares at the same time
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if os.environ.get("MASTER_ADDR") else 1
    return max(avail, 0) // max(local, 1)
