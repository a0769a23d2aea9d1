"""Stage 1's input paths: planned batches of decoded, resized, cropped, normalised images.

`DaliReader` is the fast path, built the way DALI's documentation recommends for a Python data
source: a *parallel external source* in batch mode. DALI's own worker processes run
`imagefile.BatchSource`, which reads each file, sniffs it and reads its header to compute the
torchvision resize/crop geometry; DALI's threads (CPU) or nvJPEG and the hardware JPEG decoder
(`mixed`) decode, resize, crop and normalise; the pipeline runs asynchronously with a prefetch
queue, so decoding of the next batches goes on while the caller runs the model on this one. The
caller gets DALI's output buffer itself as a torch tensor (DLPack, no copy), on the caller's CUDA
stream without a host sync on the GPU.

We chose the external source over `fn.readers.file` because one bad file fails a whole DALI batch
and DALI has no option to skip it: the workers find empty, truncated and non-image files before
the decoder sees them (they become a placeholder row, quarantined with a reason), and convert
formats DALI does not decode (GIF) to raw RGB. A file that passes those checks and still fails
in the decoder (damaged compressed data) fails its batch; DALI's executor carries on with the
next batch, and `DaliReader` re-decodes the failed one on the side (`DaliDecoder`, bisecting to
the bad file, PIL for what DALI cannot decode), so only the bad file's row is lost.

`PilReader` is the reference and the fallback where DALI is not installed: torchvision's eval
transform on PIL images in a thread pool, batches prefetched in order (`eval_transform`: an image
whose whole resized size would be huge, such as a 20000x1 banner, has only its crop resized).

Batches follow a plan that never crosses a storage chunk, so a resumed run forms exactly the
batches an uninterrupted one does (same shapes through the model, bit-identical features).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import imagefile as F
from .data import pil_transform
from .dist import local_cores
from .errors import SetupError, first_line, ref
from .models import Preprocess

log = logging.getLogger("quickfix")

# DALI's ResNet-50 example for ImageNet: enough to hold the largest ImageNet image without
# reallocating in the middle of a run.
_MIXED_HINTS = dict(device_memory_padding=211025920, host_memory_padding=140544512,
                    preallocate_width_hint=5980, preallocate_height_hint=6430)


PIL = ref("extract.decoder", "pil")


@dataclass
class Batch:
    """Rows lo .. lo+n of one split: images for every row (placeholders for quarantined ones)."""

    split: int
    lo: int
    images: torch.Tensor  # [n, 3, crop, crop]; channels-last strides from the GPU path
    ok: np.ndarray  # bool [n]
    reasons: list[str]
    keep: object = None  # DALI's output buffers, alive until the images are consumed

    @property
    def n(self) -> int:
        return len(self.ok)


def plan_batches(chunks: Sequence[tuple[int, int, int]], chunk_rows: int, batch_size: int
                 ) -> np.ndarray:
    """[(split, first row, rows)] per batch for the given (split, chunk, split size) chunks.

    Each chunk is cut into batches from its start, so the plan of a chunk does not depend on
    which other chunks are in the run.
    """
    plan = []
    for split, chunk, size in chunks:
        lo, hi = chunk * chunk_rows, min((chunk + 1) * chunk_rows, size)
        plan += [(split, b, min(batch_size, hi - b)) for b in range(lo, hi, batch_size)]
    return np.asarray(plan, dtype=np.int64).reshape(-1, 3)


def default_threads() -> int:
    """DALI's decoder threads and torch's CPU threads: this process's cores, at most 16."""
    return min(local_cores(), 16)


def default_workers(num_threads: int) -> int:
    """DALI worker processes: reading, sniffing and header parsing cost ~0.1 ms a file in a
    worker, so one feeds a few CPU decoder threads, several feed the GPU decoder."""
    return max(1, min(8, num_threads // 4))


def dali_device(device: torch.device) -> str:
    """DALI's decoder placement: nvJPEG + hardware decoder on CUDA, libjpeg-turbo on the CPU."""
    return "mixed" if device.type == "cuda" else "cpu"


def open_reader(decoder: str, roots: Sequence[Path], files: Sequence[Sequence[str]],
                plan: np.ndarray, pre: Preprocess, *, device: torch.device, precision: str,
                batch_size: int, num_threads: int | None = None,
                read_workers: int | None = None) -> DaliReader | PilReader:
    """The input path of stage 1 and of stage 3's check on images: `decoder` ("dali" or "pil")
    feeding a model on `device` that computes in `precision` (DALI gives float16 to a CUDA model
    that computes in reduced precision)."""
    num_threads = num_threads or default_threads()
    if decoder != "dali":
        return PilReader(roots, files, plan, pre, num_threads=num_threads)
    cuda = device.type == "cuda"
    return DaliReader(roots, files, plan, pre, device=dali_device(device), batch_size=batch_size,
                      num_threads=num_threads,
                      workers=read_workers or default_workers(num_threads),
                      device_id=(device.index or 0) if cuda else None,
                      half=cuda and precision != "fp32")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _graph(encoded, roi, pre: Preprocess, *, device: str, layout: str, half: bool,
           hw_decoder_load: float):
    """decode -> resize torchvision's crop region to the crop size -> normalise."""
    from nvidia.dali import fn, types

    interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC,
              "nearest": types.INTERP_NN}[pre.interpolation]
    extra = dict(hw_decoder_load=hw_decoder_load, **_MIXED_HINTS) if device == "mixed" else {}
    # PIL does not apply EXIF orientation and upsamples chroma the "fancy" way; match it.
    images = fn.decoders.image(encoded, device=device, output_type=types.RGB,
                               adjust_orientation=False, jpeg_fancy_upsampling=True, **extra)
    images = fn.resize(images, size=[pre.crop, pre.crop], roi_start=roi[0:2], roi_end=roi[2:4],
                       roi_relative=False, interp_type=interp, antialias=True)
    return fn.crop_mirror_normalize(
        images, mean=[m * 255 for m in pre.mean], std=[s * 255 for s in pre.std],
        dtype=types.FLOAT16 if half else types.FLOAT, output_layout=layout)


class _DaliOutput:
    """Turns DALI image outputs into NCHW torch tensors (zero-copy) on one device."""

    def __init__(self, pre: Preprocess, device: str, device_id: int | None, half: bool):
        self.pre, self.mixed = pre, device == "mixed"
        # On the GPU DALI writes HWC, which is NCHW with channels-last strides after a permute:
        # the layout the model wants there, without a copy.
        self.layout = "HWC" if self.mixed else "CHW"
        self.half = half
        self.torch_device = torch.device("cuda", device_id) if self.mixed else torch.device("cpu")
        self.dtype = torch.float16 if half else torch.float32

    def to_torch(self, tensor_list) -> torch.Tensor:
        x = torch.from_dlpack(tensor_list.as_tensor())
        return x.permute(0, 3, 1, 2) if self.mixed else x

    def empty(self, n: int) -> torch.Tensor:
        c = self.pre.crop
        shape = (n, c, c, 3) if self.mixed else (n, 3, c, c)
        x = torch.zeros(shape, dtype=self.dtype, device=self.torch_device)
        return x.permute(0, 3, 1, 2) if self.mixed else x

    def from_pil(self, chw: torch.Tensor) -> torch.Tensor:
        return chw.to(device=self.torch_device, dtype=self.dtype)


class DaliDecoder:
    """Synchronous DALI decoding of encoded images held in memory, with the reader's graph.

    For the setup check before a run and for re-decoding a batch the reader could not: DALI fails
    the whole batch on one undecodable file, so `decode` bisects and reports the files that fail
    on their own.
    """

    def __init__(self, pre: Preprocess, *, device: str, max_batch: int, num_threads: int,
                 device_id: int | None = None, half: bool = False, hw_decoder_load: float = 0.65):
        self.pre, self.device, self.max_batch = pre, device, max_batch
        self.num_threads, self.hw_decoder_load = num_threads, hw_decoder_load
        self.device_id = device_id if device == "mixed" else None
        self.out = _DaliOutput(pre, device, self.device_id, half)
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads,
                      device_id=self.device_id, prefetch_queue_depth=1,
                      exec_async=False, exec_pipelined=False)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            roi = fn.external_source(name="roi", dtype=types.FLOAT, ndim=1)
            return _graph(encoded, roi, self.pre, device=self.device,
                          layout=self.out.layout, half=self.out.half,
                          hw_decoder_load=self.hw_decoder_load)

        p = pipe()
        p.build()
        return p

    def probe(self) -> None:
        """Decode a known-good JPEG and PNG: a broken DALI setup (a driver too old for the wheel,
        a missing codec library, an argument the decoder rejects) stops the run here, before
        any image of the user's is taken for a bad file."""
        import io

        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        blobs = []
        for fmt in ("JPEG", "PNG"):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format=fmt)
            blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        roi = F.crop_roi(64, 48, self.pre.resize, self.pre.crop)
        try:
            self._pipe = self._pipe or self._build()
            self._run(blobs, [roi] * 2)
        except Exception as exc:
            raise SetupError(
                f"DALI ({self.device} decoder) does not work on this machine: "
                f"{first_line(exc)}; fix the installation, or pass {PIL}"
            ) from exc

    def _run(self, arrays, rois) -> torch.Tensor:
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", arrays)
        self._pipe.feed_input("roi", rois)
        (out,) = self._pipe.run()
        # The outputs of a synchronous pipeline are reused by its next run: copy them out.
        return self.out.to_torch(out).clone()

    def decode(self, encoded: Sequence[np.ndarray], rois: Sequence[np.ndarray]
               ) -> tuple[list[torch.Tensor | None], list[str | None]]:
        """(image or None per input, DALI's complaint per input that failed on its own)."""
        images: list[torch.Tensor | None] = [None] * len(encoded)
        errors: list[str | None] = [None] * len(encoded)
        self._decode_range(list(encoded), list(rois), 0, len(encoded), images, errors)
        return images, errors

    def _decode_range(self, arrays, rois, lo, hi, images, errors) -> None:
        if lo >= hi:
            return
        try:
            out = self._run(arrays[lo:hi], rois[lo:hi])
        except Exception as exc:  # DALI raises RuntimeError/IndexError for a bad sample
            self._pipe = None  # a synchronous pipeline is unusable after an error
            if hi - lo == 1:
                errors[lo] = _dali_reason(exc)
                return
        else:
            images[lo:hi] = list(out.unbind(0))
            return
        mid = (lo + hi) // 2
        self._decode_range(arrays, rois, lo, mid, images, errors)
        self._decode_range(arrays, rois, mid, hi, images, errors)


class DaliReader:
    """Planned batches through a pipelined DALI graph fed by a parallel external source."""

    # A failure that no file explains (every file of the batch decodes on its own), this many
    # times in a row, is a broken setup, not bad data.
    MAX_UNEXPLAINED = 3

    def __init__(self, roots: Sequence[Path], files: Sequence[Sequence[str]], plan: np.ndarray,
                 pre: Preprocess, *, device: str, batch_size: int, num_threads: int,
                 workers: int, device_id: int | None = None, half: bool = False,
                 hw_decoder_load: float = 0.65, prefetch: int = 3):
        self.roots, self.files, self.plan, self.pre = [str(r) for r in roots], files, plan, pre
        self.device, self.batch_size, self.num_threads = device, batch_size, num_threads
        self.workers, self.prefetch, self.hw_decoder_load = workers, prefetch, hw_decoder_load
        self.device_id = device_id if device == "mixed" else None
        self.out = _DaliOutput(pre, device, self.device_id, half)
        self.decoder = DaliDecoder(pre, device=device, max_batch=batch_size,
                                   num_threads=num_threads, device_id=self.device_id, half=half,
                                   hw_decoder_load=hw_decoder_load)
        self._pil = ThreadPoolExecutor(max(1, num_threads))
        self._pipe = None
        self.recovered_batches = 0

    def start(self, first: int = 0) -> None:
        """Start the worker processes and build the pipeline for batches first.. of the plan.

        On CUDA call it before anything else creates a CUDA context, so the workers can be
        forked (after that they are spawned, which costs a few seconds)."""
        from nvidia.dali import fn, pipeline_def, types

        fork = not torch.cuda.is_initialized()
        source = F.BatchSource(self.roots, self.files, self.plan[first:], self.pre.resize,
                               self.pre.crop)

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=self.device_id, prefetch_queue_depth=self.prefetch,
                      py_num_workers=self.workers,
                      py_start_method="fork" if fork else "spawn", seed=0)
        def pipe():
            encoded, roi, row = fn.external_source(
                source, num_outputs=3, batch=True, batch_info=True, parallel=True,
                # batches read ahead: enough that each worker has the next one in hand
                prefetch_queue_depth=max(4, 2 * self.workers),
                dtype=[types.UINT8, types.FLOAT, types.INT64])
            images = _graph(encoded, roi, self.pre, device=self.device, layout=self.out.layout,
                            half=self.out.half, hw_decoder_load=self.hw_decoder_load)
            return images, row

        try:
            self._pipe = pipe()
            with F.children_die_with_parent():
                self._pipe.start_py_workers()
            if first == 0:
                self.decoder.probe()
            self._pipe.build()
        except SetupError:
            raise
        except Exception as exc:
            raise SetupError(f"cannot start the DALI pipeline ({self.device} decoder): "
                             f"{first_line(exc)}; or pass {PIL}") from exc

    def __iter__(self) -> Iterator[Batch]:
        if self._pipe is None:
            self.start()
        stream = torch.cuda.current_stream(self.device_id) if self.device == "mixed" else None
        unexplained = 0
        for k in range(len(self.plan)):
            split, lo, n = (int(v) for v in self.plan[k])
            try:
                # Bound to our stream: DALI makes it wait for the outputs, the host does not.
                outputs = self._pipe.run(stream) if stream is not None else self._pipe.run()
            except StopIteration:
                raise RuntimeError(f"DALI stopped at batch {k} of {len(self.plan)}") from None
            except Exception as exc:
                # DALI fails the whole batch; its executor goes on with the next one.
                batch, explained = self._recover(split, lo, n, exc)
                yield batch
                if explained:
                    unexplained = 0
                    continue
                unexplained += 1
                if unexplained >= self.MAX_UNEXPLAINED:
                    raise SetupError(
                        f"DALI failed on {unexplained} batches in a row whose files all decode "
                        f"on their own: {first_line(exc)}; or pass {PIL}") from exc
                # No bad file explains it: the pipeline itself may be unusable now (older DALI
                # releases invalidate it after any error). Start a new one at the next batch.
                self._close_pipe()
                self.start(first=k + 1)
                continue
            unexplained = 0
            images, rows = outputs
            got = np.asarray(rows.as_tensor()).reshape(-1)
            ok = got >= 0
            index = np.where(ok, got, -1 - got)
            if index.size != n or (index != np.arange(lo, lo + n)).any():
                raise RuntimeError(f"DALI returned rows {index[:3]}... for batch {k} "
                                   f"(expected {lo}..{lo + n - 1})")
            yield Batch(split, lo, self.out.to_torch(images), ok, self._reasons(split, lo, ok),
                        keep=outputs)

    def _reasons(self, split: int, lo: int, ok: np.ndarray) -> list[str]:
        """Why each unusable row is unusable, asked again here (they are rare)."""
        reasons = [""] * len(ok)
        root, files = Path(self.roots[split]), self.files[split]
        for i in np.flatnonzero(~ok):
            _, _, why, usable = F.prepare(root / files[lo + i], self.pre.resize, self.pre.crop)
            # a file fixed while the run read it: its row still holds the placeholder
            reasons[i] = why if not usable else "changed while it was being read; rerun"
        return reasons

    def _recover(self, split: int, lo: int, n: int, exc: Exception) -> tuple[Batch, bool]:
        """Decode one failed batch on the side; (the batch, whether a bad file explains it)."""
        self.recovered_batches += 1
        root, files = Path(self.roots[split]), self.files[split]
        prepared = [F.prepare(root / files[r], self.pre.resize, self.pre.crop)
                    for r in range(lo, lo + n)]
        reasons = [p[2] for p in prepared]
        ok = np.array([p[3] for p in prepared], dtype=bool)
        todo = np.flatnonzero(ok).tolist()
        decoded, errors = self.decoder.decode([prepared[i][0] for i in todo],
                                              [prepared[i][1] for i in todo])
        images = self.out.empty(n)
        retry = []
        for i, img, err in zip(todo, decoded, errors, strict=True):
            if img is not None:
                images[i] = img
            else:  # DALI cannot decode it; PIL may (and is the reference anyway)
                retry.append((i, err))
        results = self._pil.map(lambda item: _pil_row(prepared[item[0]][0].tobytes(), self.pre),
                                retry)
        for (i, err), (chw, pil_err) in zip(retry, results, strict=True):
            if chw is None:
                ok[i], reasons[i] = False, f"{err}; {pil_err}"
            else:
                images[i] = self.out.from_pil(chw)
                reasons[i] = f"decoded by PIL after: {err}"
        log.debug("DALI failed on a batch of %d rows (%s); re-decoded it on the side",
                  n, first_line(exc))
        return Batch(split, lo, images, ok, reasons), bool(retry)

    def close(self) -> None:
        self._pil.shutdown(wait=False)
        self._close_pipe()

    def _close_pipe(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pool = getattr(pipe, "_py_pool", None)
            del pipe
            if pool is not None:
                pool.close()


class PilReader:
    """Planned batches through torchvision's eval transform on PIL images, in a thread pool."""

    def __init__(self, roots: Sequence[Path], files: Sequence[Sequence[str]], plan: np.ndarray,
                 pre: Preprocess, *, num_threads: int, prefetch: int = 2):
        self.roots, self.files, self.plan, self.pre = list(roots), files, plan, pre
        self.prefetch = prefetch
        self.recovered_batches = 0  # DaliReader's count; PIL has nothing to recover
        self._pool = ThreadPoolExecutor(max(1, num_threads))

    def start(self) -> None:
        pass

    def _submit(self, k: int):
        split, lo, n = (int(v) for v in self.plan[k])
        root, files = self.roots[split], self.files[split]
        return split, lo, [self._pool.submit(_pil_file, root / files[r], self.pre)
                           for r in range(lo, lo + n)]

    def __iter__(self) -> Iterator[Batch]:
        pending: deque = deque()
        nxt = 0
        for _ in range(len(self.plan)):
            while nxt < len(self.plan) and len(pending) <= self.prefetch:
                pending.append(self._submit(nxt))
                nxt += 1
            split, lo, futures = pending.popleft()
            rows = [f.result() for f in futures]
            c = self.pre.crop
            images = torch.zeros(len(rows), 3, c, c)
            for i, (chw, _) in enumerate(rows):
                if chw is not None:
                    images[i] = chw
            ok = np.array([chw is not None for chw, _ in rows], dtype=bool)
            yield Batch(split, lo, images, ok, [r or "" for _, r in rows])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _pil_file(path: Path, pre: Preprocess) -> tuple[torch.Tensor | None, str | None]:
    data, problem = F.read_bytes(path)
    if problem is None:
        _, problem = F.sniff(data)
    if problem is not None:
        return None, problem
    return _pil_row(data, pre)


def _pil_row(data: bytes, pre: Preprocess) -> tuple[torch.Tensor | None, str | None]:
    try:
        return eval_transform(F.pil_decode(data), pre), None
    except Exception as exc:  # PIL raises many types for undecodable data
        return None, F.undecodable(exc)


# torchvision's Resize makes the whole resized image before CenterCrop keeps crop x crop of it.
# Its size follows the image's aspect ratio, not its pixels: a 20000x1 banner at resize 256 is
# resized to 5,120,000 x 256 (measured: 5.9 GB peak RSS and 18 s for that one image). Beyond
# this many resized pixels (48 MiB as RGB; at resize 256, an aspect ratio over 256:1) only the
# region the crop keeps is resized.
FULL_RESIZE_PIXELS = 1 << 24


def eval_transform(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """torchvision's eval transform (`data.pil_transform`), in memory bounded by the crop.

    An image whose resized size stays within FULL_RESIZE_PIXELS goes through torchvision itself,
    so the PIL path stays the reference for every ordinary image. A larger one has just its crop
    region (`imagefile.crop_box`) resized to crop x crop: the same positions, scale and filter,
    up to a rounding (as DALI's path), at the cost of the crop alone.
    """
    new_h, new_w, _, _ = F.eval_geometry(img.width, img.height, pre.resize, pre.crop)
    if new_h * new_w <= FULL_RESIZE_PIXELS:
        return pil_transform(img, pre)
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    box = F.crop_box(img.width, img.height, pre.resize, pre.crop)
    resample = TF.pil_modes_mapping[InterpolationMode(pre.interpolation)]
    img = img.resize((pre.crop, pre.crop), resample, box=box)
    return TF.normalize(TF.pil_to_tensor(img).float().div_(255), pre.mean, pre.std)


def _dali_reason(exc: Exception) -> str:
    """The decoder's own complaint from DALI's multi-line error (the line after 'encountered:')."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    after = [lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln.startswith("encountered")]
    text = after[-1] if after else (lines[-1] if lines else type(exc).__name__)
    return f"DALI could not decode it ({text[:160]})"
