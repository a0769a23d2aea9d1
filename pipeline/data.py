"""Image trees, class order, and the two decoders (DALI, and PIL as fallback and reference).

Every sample is addressed by its index in an explicit, sorted file list; decoders return rows
in the order they were given, so nothing depends on how a reader pads its last batch.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DataError
from .models import Preprocess

log = logging.getLogger("quickfix")

KNOWN_SPLITS = ("train", "val", "validation", "test")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")

# ---------------------------------------------------------------------------------------------
# File lists and class order


@dataclass
class Split:
    name: str
    root: Path
    files: list[str]  # relative to root, "class/file.jpg"
    labels: np.ndarray  # int32, index into the class list


def find_splits(data_root: Path, requested: Sequence[str] | None) -> list[str]:
    if not data_root.is_dir():
        raise DataError(f"--data-root {data_root} is not a directory")
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
            "ImageFolder layout root/train/<class>/*.JPEG, or name the splits with --splits"
        )
    return present


def class_folders(split_root: Path) -> list[str]:
    return sorted(p.name for p in split_root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_class_order(path: Path) -> list[str]:
    """A class-order file: one class id per line, or imagenet_class_index.json form."""
    if not path.is_file():
        raise DataError(f"--class-order {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith(("{", "[")):
        classes = _parse_json_order(path, text)
    else:
        classes = [ln.strip() for ln in text.splitlines()]
        classes = [c for c in classes if c and not c.startswith("#")]
    if not classes:
        raise DataError(f"--class-order {path} lists no classes")
    dupes = sorted(c for c, n in Counter(classes).items() if n > 1)
    if dupes:
        raise DataError(f"--class-order {path} lists {', '.join(dupes[:5])} more than once")
    return classes


def _parse_json_order(path: Path, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"--class-order {path} is not valid JSON: {exc}") from exc
    if isinstance(data, list):
        return [str(c[0] if isinstance(c, list) else c) for c in data]
    if not isinstance(data, dict):
        raise DataError(f"--class-order {path}: expected an object {{\"0\": [id, name], ...}}")
    try:
        items = sorted((int(k), v) for k, v in data.items())
    except ValueError as exc:
        raise DataError(
            f"--class-order {path}: keys must be indices \"0\", \"1\", ...: {exc}"
        ) from exc
    if [i for i, _ in items] != list(range(len(items))):
        raise DataError(f"--class-order {path}: indices must run 0..{len(items) - 1} without gaps")
    return [str(v[0] if isinstance(v, list) else v) for _, v in items]


def scan_split(name: str, split_root: Path, classes: Sequence[str]) -> Split:
    index = {c: i for i, c in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for folder in class_folders(split_root):
        if folder not in index:
            raise DataError(
                f"class folder {split_root / folder} is not in the class order; "
                "add it to --class-order or remove the folder"
            )
        for dirpath, dirnames, filenames in os.walk(split_root / folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                if fname.startswith(".") or not fname.lower().endswith(IMG_EXTENSIONS):
                    continue
                files.append(os.path.relpath(os.path.join(dirpath, fname), split_root))
                labels.append(index[folder])
    if not files:
        raise DataError(f"split {name}: no image files under {split_root}")
    return Split(name, split_root, files, np.asarray(labels, dtype=np.int32))


def natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


@dataclass
class ClassOrder:
    classes: list[str]
    source: str
    warnings: list[str] = field(default_factory=list)


def resolve_class_order(
    folder_classes: list[str], order_file: Path | None, checkpoint_classes: list[str] | None
) -> ClassOrder:
    """Pick the correct order and audit it against the folders and the checkpoint's mapping."""
    if order_file is not None:
        classes, source = read_class_order(order_file), f"the class-order file {order_file}"
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
    if order_file is not None and classes != folder_classes:
        notes.append(_diff_text("the class-order file", classes, "sorted folder names",
                                folder_classes))
    natural = sorted(folder_classes, key=natural_key)
    if natural != folder_classes:
        notes.append(
            "sorted folder names differ from their natural sort (e.g. '2' before '10'); "
            "if the model was trained with natural order, pass it as --class-order"
        )
    if checkpoint_classes is not None and checkpoint_classes != classes:
        notes.append(_diff_text("the checkpoint's own class mapping", checkpoint_classes, source,
                                classes))
    return ClassOrder(classes, source, notes)


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
# Checking encoded bytes before any decoder sees them

_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def sniff(data: bytes) -> tuple[str | None, str | None]:
    """(format, problem): the real format from the bytes, or why the file is not an image."""
    if not data:
        return None, "empty file (0 bytes)"
    fmt = next((f for sig, f in _SIGNATURES if data.startswith(sig)), None)
    if fmt is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt = "webp"
    if fmt is None and data[:2] in (b"P5", b"P6"):
        fmt = "pnm"
    if fmt is None:
        head = data[:256].lstrip().lower()
        if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"<")):
            return None, "not an image: HTML/XML text saved with an image extension"
        return None, f"not an image: unrecognised header {data[:8].hex(' ')}"
    if fmt == "jpeg" and b"\xff\xd9" not in data[-1024:]:
        # Entropy-coded data stuffs 0xFF as FF 00, so FF D9 near the end is the real EOI marker.
        return fmt, "truncated JPEG: no end-of-image marker"
    if fmt == "png" and b"IEND" not in data[-64:]:
        return fmt, "truncated PNG: no IEND chunk"
    return fmt, None


def read_bytes(path: Path) -> tuple[bytes, str | None]:
    try:
        return path.read_bytes(), None
    except OSError as exc:
        return b"", f"cannot read: {exc.strerror or exc}"


# ---------------------------------------------------------------------------------------------
# PIL / torchvision: the reference path


def pil_decode(data: bytes) -> Image.Image:
    """Decode to RGB (grayscale, CMYK, palette and alpha images converted) or raise."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def pil_transform(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """torchvision's eval transform: Resize(short side) -> CenterCrop -> ToTensor -> Normalize."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    mode = InterpolationMode(pre.interpolation)
    img = F.resize(img, [pre.resize], interpolation=mode, antialias=True)
    img = F.center_crop(img, [pre.crop])
    tensor = F.pil_to_tensor(img).float().div_(255)
    return F.normalize(tensor, pre.mean, pre.std)


# ---------------------------------------------------------------------------------------------
# DALI

DALI_FORMATS = frozenset({"jpeg", "png", "bmp", "tiff", "webp", "pnm"})


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliDecoder:
    """Decode + resize + center crop + normalize a list of encoded images with DALI.

    `device="cpu"` runs on the CPU (no GPU needed); `device="mixed"` uses nvJPEG and the
    hardware JPEG decoder and returns CUDA tensors. Input comes from an external source, one
    list of byte arrays per call, so rows come back in exactly the order given. DALI fails the
    whole batch on one undecodable file and the pipeline is unusable afterwards: `decode` then
    rebuilds it and bisects, returning None for the files that fail on their own.
    """

    def __init__(self, pre: Preprocess, *, device: str, max_batch: int, num_threads: int,
                 device_id: int | None = None, hw_decoder_load: float = 0.65):
        self.pre, self.device, self.max_batch = pre, device, max_batch
        self.num_threads, self.hw_decoder_load = num_threads, hw_decoder_load
        self.device_id = device_id if device == "mixed" else None
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        pre = self.pre
        interp = {
            "bilinear": types.INTERP_LINEAR,
            "bicubic": types.INTERP_CUBIC,
            "nearest": types.INTERP_NN,
        }[pre.interpolation]

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads,
                      device_id=self.device_id, prefetch_queue_depth=1,
                      exec_async=False, exec_pipelined=False)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
            extra = {"hw_decoder_load": self.hw_decoder_load} if self.device == "mixed" else {}
            # PIL does not apply EXIF orientation and upsamples chroma the "fancy" way; match it.
            images = fn.decoders.image(encoded, device=self.device, output_type=types.RGB,
                                       adjust_orientation=False, jpeg_fancy_upsampling=True,
                                       **extra)
            images = fn.resize(images, size=size, interp_type=interp, antialias=True)
            crop = types.Constant([pre.crop, pre.crop], dtype=types.FLOAT)
            images = fn.slice(images, anchor, crop, axes=[0, 1], normalized_anchor=False,
                              normalized_shape=False)
            return fn.crop_mirror_normalize(
                images, mean=[m * 255 for m in pre.mean], std=[s * 255 for s in pre.std],
                dtype=types.FLOAT, output_layout="CHW",
            )

        p = pipe()
        p.build()
        return p

    def _run(self, arrays: list[np.ndarray], sizes: list[tuple[int, int]]) -> torch.Tensor:
        if self._pipe is None:
            self._pipe = self._build()
        geometry = [eval_geometry(w, h, self.pre) for w, h in sizes]
        self._pipe.feed_input("encoded", arrays)
        self._pipe.feed_input("size", [np.array(g[:2], dtype=np.float32) for g in geometry])
        self._pipe.feed_input("anchor", [np.array(g[2:], dtype=np.float32) for g in geometry])
        (out,) = self._pipe.run()
        if self.device == "mixed":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            tensor = out.as_tensor()
            result = torch.empty(tensor.shape(), dtype=torch.float32,
                                 device=f"cuda:{self.device_id}")
            feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(self.device_id))
            return result
        return torch.from_numpy(out.as_array())

    def decode(self, encoded: Sequence[bytes], sizes: Sequence[tuple[int, int]]
               ) -> tuple[torch.Tensor | None, list[str | None]]:
        """(images [n_ok, 3, crop, crop] for the decodable inputs in order, error per input).

        `sizes` are the images' (width, height) as PIL reads them from the header; resize and
        crop geometry is computed from them exactly as torchvision does.
        """
        arrays = [np.frombuffer(b, dtype=np.uint8) for b in encoded]
        errors: list[str | None] = [None] * len(arrays)
        parts: list[torch.Tensor] = []
        self._decode_range(arrays, list(sizes), 0, len(arrays), parts, errors)
        return (torch.cat(parts) if parts else None), errors

    def _decode_range(self, arrays, sizes, lo, hi, parts, errors) -> None:
        if lo >= hi:
            return
        try:
            parts.append(self._run(arrays[lo:hi], sizes[lo:hi]))
            return
        except Exception as exc:  # DALI raises RuntimeError/IndexError for a bad sample
            self._pipe = None  # "Current pipeline object is no longer valid"
            if hi - lo == 1:
                errors[lo] = _dali_reason(exc)
                return
        mid = (lo + hi) // 2
        self._decode_range(arrays, sizes, lo, mid, parts, errors)
        self._decode_range(arrays, sizes, mid, hi, parts, errors)


def eval_geometry(width: int, height: int, pre: Preprocess) -> tuple[int, int, int, int]:
    """(resized h, resized w, crop top, crop left), exactly as torchvision's Resize + CenterCrop.

    torchvision truncates the long side (`int(R * long / short)`) and rounds the crop offset
    half-to-even (`int(round(d / 2.0))`); DALI's own resize_shorter/crop_pos round differently,
    which moves the crop by a pixel and costs similarity on small crops.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = pre.resize, int(pre.resize * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    top = int(round((new_h - pre.crop) / 2.0))
    left = int(round((new_w - pre.crop) / 2.0))
    return new_h, new_w, top, left


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header, as PIL sees it (no EXIF rotation); None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:
        return None


def _dali_reason(exc: Exception) -> str:
    """The decoder's own complaint from DALI's multi-line error (the line after 'encountered:')."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    after = [lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln.startswith("encountered")]
    text = after[-1] if after else (lines[-1] if lines else type(exc).__name__)
    return f"DALI could not decode it ({text[:160]})"
