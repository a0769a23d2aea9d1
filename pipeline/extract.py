"""Stage 1: run the frozen backbone once over every image and cache the pooled features.

    python extract_features.py --checkpoint checkpoint_best.pth --data-root /data/imagenet \
        --out features.zarr

The run validates every input before any heavy work, resumes at the first unfinished chunk,
is a no-op on a finished store, and refuses a store made from other inputs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import data as D
from . import models as M
from . import store as S
from .checkpoint import Checkpoint, hash_tensors, load_checkpoint
from .cli import package_versions, run_record
from .errors import ArchitectureError, DataError, StoreError

log = logging.getLogger("quickfix")


@dataclass
class ExtractSummary:
    out: Path
    images: int = 0
    quarantined: int = 0
    rescued: int = 0
    seconds: float = 0.0
    no_op: bool = False
    splits: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        if self.no_op:
            return f"extract: {self.out} is already complete for these inputs; nothing to do"
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        rescued = f" ({self.rescued} decoded by the PIL fallback)" if self.rescued else ""
        return (
            f"extract: {self.images} images, {self.quarantined} quarantined{rescued}, "
            f"{self.seconds:.1f} s, {rate:.1f} img/s -> {self.out}"
        )


@dataclass
class Model:
    """The backbone ready to run, and what identifies it."""

    arch: str
    backbone: torch.nn.Module
    head_name: str
    feature_dim: int
    num_classes: int
    backbone_sha256: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda was given but no CUDA device is available; use --device cpu")
    return torch.device(device)


def resolve_decoder(decoder: str) -> str:
    if decoder == "auto":
        if D.dali_available():
            return "dali"
        log.warning("NVIDIA DALI is not installed: decoding with PIL (slower); "
                    "install nvidia-dali-cuda130 for the fast path")
        return "pil"
    if decoder == "dali" and not D.dali_available():
        raise DataError("--decoder dali: NVIDIA DALI is not installed "
                        "(pip install nvidia-dali-cuda130), or pass --decoder pil")
    return decoder


def dali_device(device: torch.device) -> str:
    """DALI's decoder placement: nvJPEG + hardware decoder on CUDA, libjpeg-turbo on the CPU."""
    return "mixed" if device.type == "cuda" else "cpu"


def prepare_model(ckpt: Checkpoint, arch: str | None) -> Model:
    """Build the architecture, load the checkpoint into it, and cut off the head."""
    sd = ckpt.state_dict
    if arch is None:
        arch = ckpt.arch
        if arch is not None and ":" not in arch and arch not in M.torchvision_archs():
            raise ArchitectureError(
                f"the checkpoint names its architecture {arch!r}, which is not a torchvision "
                "model; pass --arch NAME or --arch package.module:function"
            )
        if arch is not None:
            log.info("architecture from the checkpoint: %s", arch)
    if arch is None:
        arch = M.infer_arch(sd)
    # The head is the last 2-d weight in registration order; its rows are the classes.
    head_keys = [k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2]
    if not head_keys:
        raise ArchitectureError(f"the checkpoint {ckpt.path} has no linear layer weights")
    num_classes = int(sd[head_keys[-1]].shape[0])
    model = M.build_model(arch, num_classes, sd)
    M.load_weights(model, sd, arch)
    backbone, head_name, dim = M.split_backbone(model)
    if M.head_out_features(sd, head_name) != num_classes:
        raise ArchitectureError(f"{arch}: the head {head_name} does not have {num_classes} outputs")
    return Model(arch, backbone.eval(), head_name, dim, num_classes,
                 hash_tensors(sd, exclude_prefixes=(f"{head_name}.",)))


def _forward_context(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


class ChunkProcessor:
    """Turns one chunk's files into (features, ok, reasons); one bad file costs only its row."""

    def __init__(self, model: Model, pre: M.Preprocess, *, device: torch.device, decoder: str,
                 precision: str, batch_size: int, pool: ThreadPoolExecutor, num_threads: int,
                 out_dtype: np.dtype):
        self.model, self.pre, self.device = model, pre, device
        self.precision, self.batch_size, self.pool = precision, batch_size, pool
        self.out_dtype = out_dtype
        self.dali = None
        if decoder == "dali":
            device_id = (device.index or 0) if device.type == "cuda" else None
            self.dali = D.DaliDecoder(pre, device=dali_device(device), max_batch=batch_size,
                                      num_threads=num_threads, device_id=device_id)
        self.memory_format = (torch.channels_last if device.type == "cuda"
                              else torch.contiguous_format)

    def __call__(self, blobs: Sequence[tuple[bytes, str | None]], progress: tqdm | None
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        n = len(blobs)
        feats = np.zeros((n, self.model.feature_dim), dtype=self.out_dtype)
        ok = np.zeros(n, dtype=bool)
        reasons = [""] * n
        rows: list[list[int]] = []
        outputs: list[torch.Tensor] = []
        for lo in range(0, n, self.batch_size):
            hi = min(lo + self.batch_size, n)
            batch = self._batch(blobs, lo, hi, reasons)
            if batch is not None:
                rows.append(batch[0])
                outputs.append(batch[1])
            if progress is not None:
                progress.update(hi - lo)
        if outputs:
            # One device-to-host copy per chunk: on CUDA the forward passes stay queued while
            # DALI decodes the next batch, instead of a sync after every batch.
            order = [i for r in rows for i in r]
            feats[order] = torch.cat(outputs).float().cpu().numpy().astype(self.out_dtype)
            ok[order] = True
        return feats, ok, reasons

    def _batch(self, blobs, lo, hi, reasons) -> tuple[list[int], torch.Tensor] | None:
        """Decode rows lo..hi and run the backbone; (rows that worked, their features)."""
        images: dict[int, torch.Tensor] = {}
        to_dali: list[int] = []
        to_pil: list[int] = []
        sizes: dict[int, tuple[int, int]] = {}
        for i in range(lo, hi):
            data, read_error = blobs[i]
            fmt, problem = D.sniff(data) if read_error is None else (None, read_error)
            if problem is not None:
                reasons[i] = problem
                continue
            size = D.image_size(data) if self.dali is not None and fmt in D.DALI_FORMATS else None
            if size is not None:
                sizes[i] = size
                to_dali.append(i)
            else:
                to_pil.append(i)
        if to_dali:
            decoded, errors = self.dali.decode([blobs[i][0] for i in to_dali],
                                               [sizes[i] for i in to_dali])
            rows = iter(decoded) if decoded is not None else iter(())
            for i, err in zip(to_dali, errors, strict=True):
                if err is None:
                    images[i] = next(rows)
                else:  # DALI cannot decode it; PIL may (and is the reference anyway)
                    reasons[i] = err
                    to_pil.append(i)
        if to_pil:
            results = self.pool.map(self._pil, [blobs[i][0] for i in to_pil])
            for i, (img, err) in zip(to_pil, results, strict=True):
                if img is None:
                    reasons[i] = f"{reasons[i]}; {err}" if reasons[i] else err
                else:
                    images[i] = img
                    if reasons[i]:
                        reasons[i] = f"decoded by PIL after: {reasons[i]}"
        if not images:
            return None
        order = sorted(images)
        batch = torch.stack([images[i].to(self.device) for i in order])
        return order, self._forward(batch)

    def _pil(self, data: bytes) -> tuple[torch.Tensor | None, str | None]:
        try:
            return D.pil_transform(D.pil_decode(data), self.pre), None
        except Exception as exc:  # PIL raises many types for undecodable data
            return None, f"undecodable: {type(exc).__name__}: {str(exc)[:160]}"

    @torch.inference_mode()
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.contiguous(memory_format=self.memory_format)
        with _forward_context(self.device, self.precision):
            return self.model.backbone(batch).flatten(1)


def run_extract(
    *,
    checkpoint: Path,
    data_root: Path,
    out: Path,
    splits: Sequence[str] | None = None,
    class_order: Path | None = None,
    arch: str | None = None,
    resize: int | None = None,
    crop: int | None = None,
    batch_size: int = 128,
    device: str = "auto",
    decoder: str = "auto",
    precision: str = "auto",
    float32: bool = False,
    chunk_rows: int = 1024,
    num_threads: int | None = None,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
    use_ema: bool = False,
    rank: int = 0,
    world_size: int = 1,
    argv: Sequence[str] | None = None,
) -> ExtractSummary:
    # --- validate everything before any heavy work -------------------------------------------
    if batch_size < 1 or chunk_rows < 1:
        raise DataError("--batch-size and --chunk-rows must be at least 1")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    if out.exists() and not S.is_store(out):
        S.check_replaceable(out)
    dev = resolve_device(device)
    decoder = resolve_decoder(decoder)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision != "fp32" and dev.type != "cuda":
        raise DataError(f"--precision {precision} needs --device cuda; on the CPU use fp32")
    num_threads = num_threads or min(os.cpu_count() or 1, 16)
    split_names = D.find_splits(data_root, splits)

    ckpt = load_checkpoint(checkpoint, trust=trust_checkpoint, use_ema=use_ema)
    model = prepare_model(ckpt, arch)
    pre, pre_source = M.default_preprocess(model.arch, ckpt.args)
    if resize is not None or crop is not None:
        pre = M.Preprocess(resize or pre.resize, crop or pre.crop, pre.interpolation, pre.mean,
                           pre.std)
        pre_source = "the command line"
    if pre.crop > pre.resize:
        raise DataError(f"--crop {pre.crop} is larger than --resize {pre.resize}")
    log.info("preprocessing: resize %d, crop %d, %s (from %s)", pre.resize, pre.crop,
             pre.interpolation, pre_source)

    folders = sorted({c for s in split_names for c in D.class_folders(data_root / s)})
    order = D.resolve_class_order(folders, class_order, ckpt.classes)
    for note in order.warnings:
        log.warning("class order: %s", note)
    log.info("labels in the store follow %s (%d classes)", order.source, len(order.classes))
    if len(order.classes) != model.num_classes:
        log.warning("the checkpoint's head has %d outputs but the class order lists %d classes",
                    model.num_classes, len(order.classes))
    scanned = [D.scan_split(s, data_root / s, order.classes) for s in split_names]

    out_dtype = np.dtype("float32" if float32 else "float16")
    versions = package_versions()
    components = {
        "backbone_sha256": model.backbone_sha256,
        "arch": model.arch,
        "head": model.head_name,
        "feature_dim": model.feature_dim,
        "preprocessing": pre.as_dict(),
        "decoder": "pil" if decoder == "pil" else f"dali-{dali_device(dev)}",
        "compute": {"device": dev.type, "precision": precision},
        "dtype": out_dtype.name,
        "chunk_rows": chunk_rows,
        "classes_sha256": S.fingerprint_digest({"classes": order.classes}),
        "files_sha256": {s.name: S.file_list_digest(s.files, s.labels) for s in scanned},
        "versions": {k: versions[k] for k in ("torch", "torchvision", "nvidia-dali-cuda130",
                                              "pillow", "quickfix-labels")},
    }
    group = _open_or_create(out, components, overwrite=overwrite, rank=rank, create_kwargs=dict(
        classes=order.classes,
        splits=[S.SplitSpec(s.name, s.files, s.labels) for s in scanned],
        feature_dim=model.feature_dim, dtype=out_dtype.name, chunk_rows=chunk_rows,
        record=run_record(argv, {
            "checkpoint": str(checkpoint), "data_root": str(data_root), "arch": model.arch,
            "class_order_source": order.source, "preprocessing_source": pre_source,
            "batch_size": batch_size, "num_threads": num_threads,
        }),
        extra_attrs={"checkpoint": {"path": str(checkpoint.resolve()),
                                    "backbone_sha256": model.backbone_sha256,
                                    "head": model.head_name, "num_classes": model.num_classes,
                                    "classes": ckpt.classes},
                     "class_audit": {"source": order.source, "warnings": order.warnings}},
    ))

    todo, resumed = {}, {}
    for s in scanned:
        done = S.split_progress(group, s.name)
        owned = S.owned_chunks(done.size, rank, world_size)
        todo[s.name] = [c for c in owned if not done[c]]
        resumed[s.name] = bool(todo[s.name]) and todo[s.name][0] > owned.start
    summary = ExtractSummary(out=out)
    if not any(todo.values()):
        summary.no_op = True
        return summary

    torch.set_num_threads(num_threads)
    model.backbone.to(dev)
    if dev.type == "cuda":
        model.backbone.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    with ThreadPoolExecutor(num_threads) as pool:
        process = ChunkProcessor(model, pre, device=dev, decoder=decoder, precision=precision,
                                 batch_size=batch_size, pool=pool, num_threads=num_threads,
                                 out_dtype=out_dtype)
        for s in scanned:
            chunks = todo[s.name]
            if not chunks:
                continue
            if resumed[s.name]:
                log.info("%s: resuming at chunk %d", s.name, chunks[0])
            total = sum(min(chunk_rows, len(s.files) - c * chunk_rows) for c in chunks)
            q, r = _extract_split(group, s, chunks, chunk_rows, process, pool, total)
            summary.images += total
            summary.quarantined += q
            summary.rescued += r
            summary.splits[s.name] = total
    summary.seconds = time.perf_counter() - start
    return summary


def _extract_split(group, split: D.Split, chunks: list[int], chunk_rows: int,
                   process: ChunkProcessor, pool: ThreadPoolExecutor, total: int
                   ) -> tuple[int, int]:
    def read(c: int) -> list[Future]:
        paths = split.files[c * chunk_rows:(c + 1) * chunk_rows]
        return [pool.submit(D.read_bytes, split.root / p) for p in paths]

    quarantined = rescued = 0
    with tqdm(total=total, unit="img", desc=split.name, dynamic_ncols=True,
              disable=None, smoothing=0.1) as bar:
        pending = read(chunks[0])
        for k, c in enumerate(chunks):
            blobs = [f.result() for f in pending]
            if k + 1 < len(chunks):  # read the next chunk's files while this one computes
                pending = read(chunks[k + 1])
            feats, ok, reasons = process(blobs, bar)
            S.write_chunk(group, split.name, c, feats, ok, reasons)
            lo = c * chunk_rows
            for i in np.flatnonzero(~ok):
                log.warning("quarantined %s: %s", split.files[lo + i], reasons[i])
            quarantined += int((~ok).sum())
            rescued += sum(1 for i, r in enumerate(reasons) if r and ok[i])
    return quarantined, rescued


def _open_or_create(out: Path, components: dict, *, overwrite: bool, rank: int,
                    create_kwargs: dict):
    if S.is_store(out):
        group = S.open_store(out, mode="r+")
        stored = group.attrs["fingerprint"]["components"]
        if stored == components:
            return group
        diffs = S.fingerprint_differences(stored, components)
        if not overwrite:
            raise StoreError(
                f"{out} was made from other inputs (differs in: {', '.join(diffs)}); "
                "pass --overwrite to replace it, or choose another --out"
            )
        log.warning("replacing %s (differs in: %s)", out, ", ".join(diffs))
    elif rank != 0:
        return _wait_for_store(out, components)
    out.parent.mkdir(parents=True, exist_ok=True)
    return S.create_store(out, fingerprint=components, **create_kwargs)


def _wait_for_store(out: Path, components: dict, timeout: float = 600.0):
    """Ranks other than 0 wait for rank 0 to create the store, then check it is the same."""
    deadline = time.monotonic() + timeout
    while not S.is_store(out):
        if time.monotonic() > deadline:
            raise StoreError(f"rank 0 did not create {out} within {timeout:.0f} s")
        time.sleep(0.5)
    group = S.open_store(out, mode="r+")
    if group.attrs["fingerprint"]["components"] != components:
        raise StoreError(f"{out} was created from other inputs than this rank's")
    return group
