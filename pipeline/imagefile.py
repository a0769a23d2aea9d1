"""What an image file holds, and the per-file work of stage 1's input path.

This module imports only the standard library, NumPy and PIL: DALI's Python worker processes
import it to read, sniff and measure every file (`BatchSource`), so it must stay light and
must not touch torch or CUDA.

`prepare` turns one file into what the DALI graph needs: the encoded bytes (a JPEG or PNG up to
its end, without what a phone or camera appended), the region of the image that torchvision's
resize + center crop keeps (computed exactly as torchvision does), and a reason when the file
cannot be used. A file that is not an image gets a one-pixel placeholder so the batch keeps its
shape; its row is quarantined. A real image in a format DALI does not decode (GIF, or a header
PIL reads but DALI might not) is decoded by PIL and handed on as raw RGB (PNM), so DALI still
resizes it.
"""

from __future__ import annotations

import ctypes
import io
import os
import re
import signal
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)

# Formats DALI's decoder reads; anything else PIL can open is converted to PNM first.
DALI_FORMATS = frozenset({"jpeg", "png", "bmp", "tiff", "webp", "pnm"})


def sniff(data: bytes) -> tuple[str | None, str | None]:
    """(format, problem): the real format from the bytes, or why the file is not an image."""
    fmt, problem, _ = sniff_extent(data)
    return fmt, problem


def sniff_extent(data: bytes) -> tuple[str | None, str | None, int]:
    """(format, problem, end): `sniff`, and where the image's encoded data ends.

    Decoders stop at a JPEG's end-of-image marker and a PNG's IEND chunk and ignore what
    follows: the video a phone appends to a motion photo, a camera's maker data. So a file is
    truncated only when its data ends before that point, which takes walking its structure (a
    marker near the end of the file proves nothing either way). `end` is len(data) for the
    other formats and for a file with a problem.
    """
    if not data:
        return None, "empty file (0 bytes)", 0
    fmt = next((f for sig, f in _SIGNATURES if data.startswith(sig)), None)
    if fmt is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt = "webp"
    if fmt is None and data[:2] in (b"P5", b"P6"):
        fmt = "pnm"
    if fmt is None:
        head = data[:256].lstrip().lower()
        if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"<")):
            return None, "not an image: HTML/XML text saved with an image extension", len(data)
        return None, f"not an image: unrecognised header {data[:8].hex(' ')}", len(data)
    if fmt == "jpeg":
        end = jpeg_end(data)
        if end is None:
            return fmt, "truncated JPEG: the data ends before the end-of-image marker", len(data)
        return fmt, None, end
    if fmt == "png":
        end = png_end(data)
        if end is None:
            return fmt, "truncated PNG: the data ends before the IEND chunk", len(data)
        return fmt, None, end
    return fmt, None, len(data)


# In entropy-coded data a 0xFF byte is followed by 00 (a stuffed FF) or D0-D7 (a restart marker);
# anything else after it (fill bytes FF aside) is the next marker. Regex searches find markers in
# C: a per-byte Python loop over a scan of several MB is too slow for a check made on every file.
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_MARKER = re.compile(rb"\xff(?!\xff)")  # the last FF of a run: fill bytes may precede a marker
_STANDALONE = frozenset({0x00, 0x01, *range(0xD0, 0xD9)})  # no length field (00: a stray FF 00)


def jpeg_end(data: bytes) -> int | None:
    """The offset just past the end-of-image marker, or None if the data ends before it.

    Walks the marker segments from SOI by their lengths, so an EXIF thumbnail (a whole JPEG,
    FF D9 included, inside APP1) is skipped as one segment; after each SOS (a progressive JPEG
    has several) it jumps over the entropy-coded data to the next marker. Bytes that are not a
    marker where one belongs are skipped up to the next FF, as libjpeg does.
    """
    n, pos = len(data), 2
    while True:
        found = _MARKER.search(data, pos)
        if found is None or found.start() >= n - 1:
            return None
        pos = found.start()
        marker = data[pos + 1]
        if marker == 0xD9:
            return pos + 2
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if pos > n:
            return None
        if marker == 0xDA:  # SOS: entropy-coded data up to the next marker
            found = _MARKER_IN_SCAN.search(data, pos)
            if found is None:
                return None
            pos = found.start()


def png_end(data: bytes) -> int | None:
    """The offset just past the IEND chunk, or None if the data ends before it (chunk by chunk:
    4-byte length, type, data, CRC)."""
    n, pos = len(data), 8
    while pos + 8 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IEND":
            return min(pos + 12 + length, n)
        pos += 12 + length
    return None


MAX_FILE_BYTES = 1 << 30  # no photo is this large; a file that is would exhaust memory


def read_bytes(path: Path | str) -> tuple[bytes, str | None]:
    """(contents, None), or (b"", why not): a FIFO, device or directory named like an image is
    refused without blocking on it, and so is a file too large to be a photo."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return b"", f"cannot read: {exc.strerror or exc}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return b"", "cannot read: not a regular file"
        if st.st_size > MAX_FILE_BYTES:
            return b"", f"cannot read: {st.st_size / 2**30:.1f} GiB is too large for an image"
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(), None
    except OSError as exc:
        return b"", f"cannot read: {exc.strerror or exc}"
    finally:
        os.close(fd)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header, as PIL sees it (no EXIF rotation); None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Exception:
        return None


def undecodable(exc: Exception) -> str:
    """The reason for a file PIL cannot decode."""
    return f"undecodable: {type(exc).__name__}: {str(exc)[:160]}"


def pil_decode(data: bytes) -> Image.Image:
    """Decode to RGB (grayscale, CMYK, palette and alpha images converted) or raise."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def eval_geometry(width: int, height: int, resize: int, crop: int) -> tuple[int, int, int, int]:
    """(resized h, resized w, crop top, crop left), exactly as torchvision's Resize + CenterCrop.

    torchvision truncates the long side (`int(R * long / short)`) and rounds the crop offset
    half-to-even (`int(round(d / 2.0))`); DALI's own resize_shorter/crop_pos round differently,
    which moves the crop by a pixel and costs similarity on small crops.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    return new_h, new_w, top, left


def crop_box(width: int, height: int, resize: int, crop: int
             ) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in input pixels: the part of the image that torchvision's Resize +
    CenterCrop turns into the crop.

    Resizing just this region straight to crop x crop samples the same positions with the same
    scale and filter as resizing the whole image and cutting the crop out (measured: 0.02% of
    pixels differ by 1 in 8 bits with DALI; with PIL up to 14% of values differ by 1, as often
    up as down), and skips the pixels the crop throws away: memory and time do not grow with
    the resized image, which for a 20000x1 banner at resize 256 is 5,120,000 x 256 pixels.
    """
    new_h, new_w, top, left = eval_geometry(width, height, resize, crop)
    sy, sx = height / new_h, width / new_w
    return left * sx, top * sy, (left + crop) * sx, (top + crop) * sy


def crop_roi(width: int, height: int, resize: int, crop: int) -> np.ndarray:
    """`crop_box` as DALI's resize takes it: [y0, x0, y1, x1], float32."""
    x0, y0, x1, y1 = crop_box(width, height, resize, crop)
    return np.array([y0, x0, y1, x1], dtype=np.float32)


def to_pnm(img: Image.Image) -> bytes:
    """Raw RGB as a binary PNM (P6): DALI decodes it to exactly these pixels."""
    return f"P6\n{img.width} {img.height}\n255\n".encode() + img.tobytes()


_PLACEHOLDER = np.frombuffer(b"P6\n1 1\n255\n\x80\x80\x80", dtype=np.uint8)
_PLACEHOLDER_ROI = np.array([0, 0, 1, 1], dtype=np.float32)


def prepare(path: Path | str, resize: int, crop: int
            ) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """(encoded bytes, crop region [y0, x0, y1, x1] (`crop_roi`), reason, usable).

    Never raises for a bad file: an unusable one comes back as a placeholder with its reason.
    A JPEG or PNG is handed on without what follows its end (`sniff_extent`): decoders ignore
    it, and a motion photo's video would otherwise travel to the decoder with every image.
    """
    data, problem = read_bytes(path)
    fmt, end = None, 0
    if problem is None:
        fmt, problem, end = sniff_extent(data)
    if problem is None:
        size = image_size(data) if fmt in DALI_FORMATS else None
        if size is None:  # not a format DALI reads, or a header only PIL's decoder gets through
            try:
                img = pil_decode(data)
            except Exception as exc:  # PIL raises many types for undecodable data
                problem = undecodable(exc)
            else:
                data, size = to_pnm(img), img.size
                end = len(data)
        if problem is None:
            return (np.frombuffer(data, dtype=np.uint8, count=end),
                    crop_roi(size[0], size[1], resize, crop), "", True)
    return _PLACEHOLDER, _PLACEHOLDER_ROI, problem, False


class BatchSource:
    """DALI parallel external source (batch mode): iteration k -> the files of planned batch k.

    `plan` rows are (split, first row, number of rows); `files[split]` are paths relative to
    `roots[split]`. Outputs per sample: the encoded bytes, the crop region, and the row's index
    in its split, negative (-1 - row) when the file is unusable and the bytes are a placeholder
    (the reason is not passed on: every output costs per sample, and bad files are rare, so the
    main process asks `prepare` again for those). It runs in DALI's worker processes, so it
    holds only plain data and is stateless.
    """

    def __init__(self, roots: Sequence[str], files: Sequence[Sequence[str]], plan: np.ndarray,
                 resize: int, crop: int):
        self.roots, self.files, self.plan = list(roots), [list(f) for f in files], plan
        self.resize, self.crop = resize, crop

    def __setstate__(self, state):  # unpickled in a spawned worker
        self.__dict__.update(state)
        die_with_parent()

    def __call__(self, info):
        k = info.iteration if hasattr(info, "iteration") else int(info)
        if k >= len(self.plan):
            raise StopIteration
        split, lo, n = (int(v) for v in self.plan[k])
        root, files = self.roots[split], self.files[split]
        encoded, rois, rows = [], [], []
        for row in range(lo, lo + n):
            data, roi, _, usable = prepare(os.path.join(root, files[row]), self.resize, self.crop)
            encoded.append(data)
            rois.append(roi)
            rows.append(np.array([row if usable else -1 - row], dtype=np.int64))
        return encoded, rois, rows


# ---------------------------------------------------------------------------------------------
# DALI's worker processes wait on a queue forever: if the main process is killed (SIGKILL, OOM)
# they would outlive it. Ask Linux to kill each worker when the process that started it dies.

_PR_SET_PDEATHSIG = 1
_watch_parent = False


def die_with_parent() -> None:
    """In a child: SIGKILL me when my parent dies (Linux), and leave Ctrl-C to the parent, which
    shuts the workers down (else each worker prints its own KeyboardInterrupt traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _after_fork_in_child() -> None:
    if _watch_parent:
        die_with_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


class children_die_with_parent:
    """Context: processes forked inside it (DALI's workers) die when this process dies."""

    def __enter__(self):
        global _watch_parent
        _watch_parent = True
        return self

    def __exit__(self, *exc):
        global _watch_parent
        _watch_parent = False
        return False
