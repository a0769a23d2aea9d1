"""Stage 1: run the frozen backbone once over every image and cache the pooled features.

    python extract_features.py --checkpoint checkpoint_best.pth --data-root /data/imagenet \
        --out features.zarr

The run validates every input before any heavy work, resumes at the first unfinished chunk,
is a no-op on a finished store, and refuses a store made from other inputs.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data as D
from . import dist as Dist
from . import models as M
from . import readers as R
from . import store as S
from .checkpoint import LAYOUTS, Checkpoint, backbone_digest, load_checkpoint
from .errors import ArchitectureError, DataError, StoreError, ref
from .files import resolve_device
from .progress import Progress
from .provenance import package_versions, run_record
from .settings import ExtractSettings

log = logging.getLogger("quickfix")
X = ExtractSettings  # its settings, named in messages: X.ref("crop")


@dataclass
class ExtractSummary:
    out: Path
    images: int = 0
    quarantined: int = 0
    rescued: int = 0
    seconds: float = 0.0
    no_op: bool = False
    ranks: int = 1  # torchrun processes that shared the job
    splits: dict[str, int] = field(default_factory=dict)
    # where the time went: waiting for decoded batches, the forward pass (host side), the
    # writer thread's busy time (it overlaps the others), batches DALI re-decoded on the side
    profile: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        if self.no_op:
            return f"extract: {self.out} is already complete for these inputs; nothing to do"
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        rescued = f" ({self.rescued} decoded by the PIL fallback)" if self.rescued else ""
        ranks = f" on {self.ranks} ranks" if self.ranks > 1 else ""
        return (
            f"extract: {self.images} images{ranks}, {self.quarantined} quarantined{rescued}, "
            f"{self.seconds:.1f} s, {rate:.1f} img/s -> {self.out}"
        )


@dataclass
class Model:
    """The backbone ready to run, and what identifies it."""

    arch: str
    backbone: torch.nn.Module
    head_layer: str
    feature_dim: int
    num_classes: int
    backbone_sha256: str
    heads: M.Heads | None = None
    full: torch.nn.Module | None = None  # the whole model (timm reads its data config)


def resolve_decoder(decoder: str) -> str:
    if decoder == "auto":
        if R.dali_available():
            return "dali"
        log.warning("NVIDIA DALI is not installed: decoding with PIL (slower); "
                    "install nvidia-dali-cuda130 for the fast path")
        return "pil"
    if decoder == "dali" and not R.dali_available():
        raise DataError(f"{X.ref('decoder', 'dali')}: NVIDIA DALI is not installed "
                        f"(pip install nvidia-dali-cuda130), or pass {R.PIL}")
    return decoder


def prepare_model(ckpt: Checkpoint, arch: str | None, head_layer: str | None = None) -> Model:
    """Build the architecture, load the checkpoint into it, and cut off the head."""
    sd = ckpt.state_dict
    if arch is None:
        arch = ckpt.arch
        if arch is not None and ":" not in arch and arch not in M.torchvision_archs():
            raise ArchitectureError(
                f"the checkpoint names its architecture {arch!r}, which is not a torchvision "
                f"model; pass {X.ref('arch', 'NAME')}, {X.ref('arch', 'timm:NAME')} or "
                f"{X.ref('arch', 'package.module:function')}")
        if arch is not None:
            log.info("architecture from the checkpoint: %s", arch)
    if arch is None:
        arch = M.infer_arch(sd)
    if head_layer is not None and getattr(sd.get(f"{head_layer}.weight"), "ndim", 0) != 2:
        layers = [k.removesuffix(".weight") for k, v in sd.items()
                  if k.endswith(".weight") and v.ndim == 2]
        raise ArchitectureError(f"{X.ref('head_layer', head_layer)}: the checkpoint has no 2-d "
                                f"{head_layer}.weight; its linear layers are "
                                f"{', '.join(layers[-8:]) or 'none'}")
    _, num_classes = M.find_head_of(arch, sd, head_layer)
    model = M.build_model(arch, num_classes, sd)
    M.load_weights(model, sd, arch)
    heads = M.find_heads(model, head_layer)
    backbone, heads, dim = M.split_backbone(model, heads)
    if M.head_out_features(sd, heads.head) != num_classes:
        raise ArchitectureError(f"{arch}: the head {heads.head} does not have {num_classes} "
                                f"outputs; name the classification head with "
                                f"{X.ref('head_layer')}")
    if heads.tied:
        log.info("heads %s are averaged at eval time: the backbone gives the average of their "
                 "inputs, and each receives the new head", ", ".join(heads.replaced))
    return Model(arch, backbone.eval(), heads.head, dim, num_classes, "", heads, model)


def settle_heads(model: Model, state_dict, size: int) -> None:
    """Decide which candidate auxiliary heads really are (a probe at the crop size), then the
    backbone digest, which leaves out every head."""
    heads, used = M.settle_auxiliary(model.full, model.heads, size)
    if used:
        log.warning("layers %s have as many outputs as the head (%d) but the model uses them at "
                    "eval time, so they are not heads and are left as they are; if one is a "
                    "second classification head, pass %s to choose the one to retrain",
                    ", ".join(used), model.num_classes, X.ref("head_layer"))
    if heads.auxiliary:
        log.info("auxiliary heads over the same classes: %s (stage 3 re-orders them too)",
                 ", ".join(heads.auxiliary))
    model.heads = heads
    model.backbone_sha256 = backbone_digest(state_dict, heads.head, heads_record(heads))


def heads_record(heads: M.Heads) -> dict:
    """The heads besides the main one, as the store records them (empty for most models)."""
    return {k: list(v) for k, v in (("tied", heads.tied), ("auxiliary", heads.auxiliary)) if v}


def forward_context(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


class Engine:
    """The backbone on its device: images in, features on their way to the host out.

    On CUDA the forward pass is queued on the current stream and its features are copied into one
    of a few pinned host buffers without blocking; the returned CUDA event says when they have
    landed, and `release` gives the buffer back (and lets DALI's input buffer go). The host never
    waits for the GPU here, so the GPU computes batch k while DALI decodes batch k+1. With the
    features comes each row's largest magnitude (NaN when a value is NaN), computed before the
    cast to the store's dtype, so the writer can refuse NaN, inf and float16 overflow.
    """

    def __init__(self, model: Model, device: torch.device, precision: str, out_dtype: np.dtype,
                 batch_size: int, buffers: int = 4):
        self.model, self.device, self.precision = model, device, precision
        self.cuda = device.type == "cuda"
        self.memory_format = torch.channels_last if self.cuda else torch.contiguous_format
        self.out_dtype = torch.float32 if out_dtype == np.float32 else torch.float16
        self.forward_seconds = 0.0
        self._free: queue.Queue = queue.Queue()
        if self.cuda:
            for _ in range(buffers):
                self._free.put((torch.empty(batch_size, model.feature_dim, dtype=self.out_dtype,
                                            pin_memory=True),
                                torch.empty(batch_size, dtype=torch.float32, pin_memory=True)))

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, keep: object = None, check=lambda: None):
        """(features [n, D], largest |value| per row [n], CUDA event or None, release callback
        or None).

        `check` raises if the consumer of the features has failed (so we never wait on it)."""
        start = time.perf_counter()
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        with forward_context(self.device, self.precision):
            features = self.model.backbone(x).flatten(1)
        peak = features.detach().abs().amax(1).float()
        if not self.cuda:
            self.forward_seconds += time.perf_counter() - start
            return features, peak, None, None
        while True:  # wait while the writer holds every buffer, unless it has failed
            try:
                buf, peak_buf = self._free.get(timeout=1.0)
                break
            except queue.Empty:
                check()
        out = buf[:len(features)]
        out.copy_(features.to(self.out_dtype), non_blocking=True)
        out_peak = peak_buf[:len(features)]
        out_peak.copy_(peak, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        self.forward_seconds += time.perf_counter() - start

        def release(bufs=(buf, peak_buf), keep=keep, x=x):  # the GPU is done with x and DALI's
            self._free.put(bufs)

        return out, out_peak, ready, release


# ---------------------------------------------------------------------------------------------
# What stage 1 settles before it touches the store


@dataclass(frozen=True)
class Runtime:
    """How this process runs the stage: the settings resolved on this machine."""

    device: torch.device
    decoder: str  # "dali" or "pil"
    precision: str  # "fp32", "bf16" or "fp16"
    num_threads: int
    read_workers: int

    @property
    def decoder_name(self) -> str:
        """The decoder as the store records it: pil, dali-cpu or dali-mixed."""
        return "pil" if self.decoder == "pil" else f"dali-{R.dali_device(self.device)}"


@dataclass
class Job:
    """The inputs checked, the model ready, the files scanned, and the store they make."""

    settings: ExtractSettings
    runtime: Runtime
    model: Model
    pre: M.Preprocess
    scanned: list[D.Split]
    components: dict  # the store's fingerprint, before hashing
    spec: dict  # the rest of what a new store is made from (store.create_store's arguments)

    @property
    def out(self) -> Path:
        return self.settings.out

    @property
    def chunk_rows(self) -> int:
        return self.settings.chunk_rows

    @property
    def out_dtype(self) -> np.dtype:
        return np.dtype("float32" if self.settings.float32 else "float16")


def prepare(settings: ExtractSettings, argv: Sequence[str] | None) -> Job:
    """Everything checked and settled before any heavy work: where and how to compute, the
    model and its eval transform, the class order, the files, and the store's identity."""
    if settings.out.exists() and not S.is_store(settings.out):
        S.check_replaceable(settings.out)
    runtime = resolve_runtime(settings)
    sizes = settings.sample_sizes()
    split_names = D.find_splits(settings.data_root, settings.splits if sizes is None or
                                "*" in sizes else [s for s in sizes if s != "*"])
    ckpt, model, pre, pre_source = load_model(settings)
    order = resolve_order(settings, ckpt, model, split_names)
    scanned = [D.store_order(_sampled(D.scan_split(s, settings.data_root / s, order.classes),
                                      sizes)) for s in split_names]
    components = fingerprint(settings, runtime, model, pre, order, scanned)
    spec = dict(
        classes=order.classes,
        splits=[S.SplitSpec(s.name, s.files, s.labels, s.stats) for s in scanned],
        feature_dim=model.feature_dim, dtype=components["dtype"],
        chunk_rows=settings.chunk_rows,
        record=run_record(argv, {
            "checkpoint": str(settings.checkpoint), "data_root": str(settings.data_root),
            "arch": model.arch, "class_order_source": order.source,
            "preprocessing_source": pre_source, "batch_size": settings.batch_size,
            "num_threads": runtime.num_threads, "read_workers": runtime.read_workers}),
        extra_attrs={"checkpoint": {"path": str(settings.checkpoint.resolve()),
                                    "backbone_sha256": model.backbone_sha256,
                                    "head": model.head_layer, "num_classes": model.num_classes,
                                    "classes": ckpt.classes, "layout": ckpt.layout,
                                    "weights": ckpt.source_key, "ema": ckpt.use_ema},
                     "class_audit": {"source": order.source, "warnings": order.warnings},
                     "class_names": order.names,
                     **({"sample": {"per_class": sizes}} if sizes is not None else {})})
    return Job(settings, runtime, model, pre, scanned, components, spec)


def _sampled(split: D.Split, sizes: dict[str, int] | None) -> D.Split:
    """The split, or its class-stratified sample (--per-class)."""
    if sizes is None:
        return split
    k = sizes.get(split.name, sizes.get("*"))
    sample = D.sample_per_class(split, k)
    log.info("split %s: a sample of %d image(s) per class: %d of %d", split.name, k,
             len(sample.files), len(split.files))
    return sample


def resolve_runtime(settings: ExtractSettings) -> Runtime:
    dev = resolve_device(settings.device)
    decoder = resolve_decoder(settings.decoder)
    precision = settings.precision
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision != "fp32" and dev.type != "cuda":
        raise DataError(f"{X.ref('precision', precision)} needs {ref('device', 'cuda')}; on "
                        "the CPU use fp32")
    threads = settings.num_threads or R.default_threads()
    return Runtime(dev, decoder, precision, threads,
                   settings.read_workers or R.default_workers(threads))


def load_model(settings: ExtractSettings
               ) -> tuple[Checkpoint, Model, M.Preprocess, str]:
    """The checkpoint, its backbone ready to run, and the eval transform (and its source)."""
    ckpt = load_checkpoint(settings.checkpoint, trust=settings.trust_checkpoint,
                           use_ema=settings.ema)
    log.info("checkpoint: %s, weights from %s", LAYOUTS[ckpt.layout],
             ckpt.source_key or "the file itself")
    model = prepare_model(ckpt, settings.arch, settings.head_layer)
    pre, pre_source = M.default_preprocess(model.arch, ckpt.args, model.full)
    if settings.resize is not None or settings.crop is not None:
        pre = M.Preprocess(settings.resize or pre.resize, settings.crop or pre.crop,
                           pre.interpolation, pre.mean, pre.std)
        pre_source = "the command line"
    if pre.crop > pre.resize:
        raise DataError(f"{X.ref('crop', pre.crop)} is larger than {X.ref('resize', pre.resize)}")
    settle_heads(model, ckpt.state_dict, pre.crop)
    model.full = None
    log.info("preprocessing: resize %d, crop %d, %s (from %s)", pre.resize, pre.crop,
             pre.interpolation, pre_source)
    return ckpt, model, pre, pre_source


def resolve_order(settings: ExtractSettings, ckpt: Checkpoint, model: Model,
                  split_names: list[str]) -> D.ClassOrder:
    """The correct class order, audited against the folders and the checkpoint's mapping."""
    by_split = {s: D.class_folders(settings.data_root / s) for s in split_names}
    folders = sorted({c for names in by_split.values() for c in names})
    order = D.resolve_class_order(folders, settings.class_order, ckpt.classes, settings.dataset,
                                  by_split)
    for note in order.warnings:
        log.warning("class order: %s", note)
    log.info("labels in the store follow %s (%d classes)", order.source, len(order.classes))
    if settings.dataset is not None and len(order.classes) != model.num_classes:
        raise DataError(f"{X.ref('dataset', settings.dataset)} has {len(order.classes)} classes "
                        f"but the checkpoint's head {model.head_layer} has {model.num_classes} "
                        f"outputs: this model was not trained on it (give its order with "
                        f"{X.ref('class_order')})")
    if len(order.classes) != model.num_classes:
        log.warning("the checkpoint's head has %d outputs but the class order lists %d classes",
                    model.num_classes, len(order.classes))
    return order


def fingerprint(settings: ExtractSettings, runtime: Runtime, model: Model, pre: M.Preprocess,
                order: D.ClassOrder, scanned: list[D.Split]) -> dict:
    """What the features are made from: a store of other components is another store."""
    versions = package_versions()
    return {
        "backbone_sha256": model.backbone_sha256,
        "arch": model.arch,
        "head": model.head_layer,
        **({"other_heads": other} if (other := heads_record(model.heads)) else {}),
        "feature_dim": model.feature_dim,
        "preprocessing": pre.as_dict(),
        "decoder": runtime.decoder_name,
        # how the crop is resized: a store resumed by another way would mix (slightly) different
        # features, so it is refused
        "resize": "torchvision" if runtime.decoder == "pil" else "dali-crop-region",
        "compute": {"device": runtime.device.type, "precision": runtime.precision},
        "dtype": "float32" if settings.float32 else "float16",
        "chunk_rows": settings.chunk_rows,
        "row_order": D.ROW_ORDER,
        "classes_sha256": S.fingerprint_digest({"classes": order.classes}),
        "files_sha256": {s.name: S.file_list_digest(s.files, s.labels) for s in scanned},
        "versions": {k: versions[k] for k in ("torch", "torchvision", "nvidia-dali-cuda130",
                                              "pillow", "quickfix-labels")},
    }


# ---------------------------------------------------------------------------------------------
# The run


def run_extract(settings: ExtractSettings, *, group: Dist.Group | None = None,
                argv: Sequence[str] | None = None) -> ExtractSummary:
    """Extract the features of every image of the data root's splits into the store.

    Under torchrun (`group` joined), rank 0 creates or opens the store, every rank waits for it
    on a collective, and rank 0 shares the chunks left to do among the ranks; the job's progress
    and summary are rank 0's. Without it, the settings' rank/world_size (RANK/WORLD_SIZE set by
    hand) take a fixed share of the chunks with no coordination, for independent jobs.
    """
    grp = group or Dist.Group.single()
    if grp.collective:
        settings = settings.replace(rank=grp.rank, world_size=grp.world)
    # every rank prepares; a user error on any of them stops all with one line (rank 0's)
    job = grp.agree(lambda: prepare(settings, argv))
    with contextlib.ExitStack() as held:
        store, todo, total = (_shared_work if grp.collective else _own_work)(job, grp, held)
        return _extract(job, store, todo, total, grp)


def _shared_work(job: Job, grp: Dist.Group, held: contextlib.ExitStack
                 ) -> tuple[S.FeatureStore, dict[str, list[int]], int]:
    """Under torchrun: rank 0 takes the writer lock for the job and creates, checks or repairs
    the store while the others wait on the collective; then every rank opens it and checks that
    it was made from the same inputs as its own, and takes its share of what is left."""
    grp.agree(lambda: _open_or_create(job, rank=0, held=held), only_rank0=True)
    store = grp.agree(lambda: _open_existing(job.out, job.components))
    shares = grp.share(lambda: _share_chunks(store, job.scanned, grp.world))
    todo = {s.name: shares[s.name][grp.rank] for s in job.scanned}
    total = sum(_rows(part, job.chunk_rows, len(s.files)) for s in job.scanned
                for part in shares[s.name])
    return store, todo, total


def _own_work(job: Job, grp: Dist.Group, held: contextlib.ExitStack
              ) -> tuple[S.FeatureStore, dict[str, list[int]], int]:
    """Alone, or one of the independent jobs of RANK/WORLD_SIZE set by hand (they take no lock:
    they share the store on purpose): the chunks of this job's fixed share not yet done."""
    rank, world = job.settings.rank, job.settings.world_size
    store = _open_or_create(job, rank=rank, held=held if world == 1 else None)
    todo = {}
    for s in job.scanned:
        done = store.done(s.name)
        owned = S.owned_chunks(done.size, rank, world)
        todo[s.name] = [c for c in owned if not done[c]]
        if todo[s.name] and todo[s.name][0] > owned.start:
            log.info("%s: resuming at chunk %d", s.name, todo[s.name][0])
    total = sum(_rows(todo[s.name], job.chunk_rows, len(s.files)) for s in job.scanned)
    return store, todo, total


def _extract(job: Job, store: S.FeatureStore, todo: dict[str, list[int]], total: int,
             grp: Dist.Group) -> ExtractSummary:
    summary = ExtractSummary(out=job.out, ranks=grp.world if grp.collective else 1)
    if total == 0:
        summary.no_op = True
        return summary
    for s in job.scanned:
        summary.splits[s.name] = _rows(todo[s.name], job.chunk_rows, len(s.files))
    summary.images = sum(summary.splits.values())

    start = time.perf_counter()
    with Progress(total, "extract", interval=job.settings.progress_every,
                  show=grp.main) as progress:
        if summary.images:
            _run_rank(job, todo, store, summary, progress, grp)
        if grp.collective:
            _gather(grp, summary, progress)
    summary.seconds = time.perf_counter() - start
    return summary


def _rows(chunks: Sequence[int], chunk_rows: int, n: int) -> int:
    return sum(min(chunk_rows, n - c * chunk_rows) for c in chunks)


def _share_chunks(store: S.FeatureStore, scanned: list[D.Split], world: int
                  ) -> dict[str, list[list[int]]]:
    """The chunks not yet done, in `world` contiguous shares of (nearly) equal size, read once
    by rank 0 before any rank writes: a rerun after a rank died splits what is left evenly."""
    shares = {}
    for s in scanned:
        done = store.done(s.name)
        left = np.flatnonzero(~done)
        if left.size and left.size < done.size:
            log.info("%s: %d of %d chunks already done; %d ranks share the other %d", s.name,
                     done.size - left.size, done.size, world, left.size)
        shares[s.name] = [part.tolist() for part in np.array_split(left, world)]
        if 0 < left.size < world:
            log.warning("%s: %d chunks left for %d ranks, so %d ranks have nothing to do; a "
                        "smaller %s (now %d) gives every rank a share", s.name, left.size,
                        world, world - left.size, X.ref("chunk_rows"), store.chunk_rows(s.name))
    return shares


def _gather(grp: Dist.Group, summary: ExtractSummary, progress: Progress) -> None:
    """Post this rank's counts; rank 0 shows the job's progress until every rank has posted,
    then sums them into the job's summary."""
    grp.post(f"extract/summary/{grp.rank}", {
        "quarantined": summary.quarantined, "rescued": summary.rescued,
        "splits": summary.splits})
    grp.add("extract/finished", 1)
    if not grp.main:
        return
    while grp.add("extract/finished", 0) < grp.world:
        progress.set(grp.add("extract/images", 0))
        time.sleep(0.2)
    progress.set(grp.add("extract/images", 0))
    summary.splits, summary.quarantined, summary.rescued = {}, 0, 0
    for r in range(grp.world):
        rec = grp.read(f"extract/summary/{r}")
        summary.quarantined += rec["quarantined"]
        summary.rescued += rec["rescued"]
        for name, n in rec["splits"].items():
            summary.splits[name] = summary.splits.get(name, 0) + n
    summary.images = sum(summary.splits.values())


def _run_rank(job: Job, todo: dict[str, list[int]], store: S.FeatureStore,
              summary: ExtractSummary, progress: Progress, grp: Dist.Group) -> None:
    """This process's chunks: decode, forward, write."""
    rt, batch_size = job.runtime, job.settings.batch_size
    plan = R.plan_batches([(i, c, len(s.files)) for i, s in enumerate(job.scanned)
                           for c in todo[s.name]], job.chunk_rows, batch_size)
    reader = R.open_reader(rt.decoder, [s.root for s in job.scanned],
                           [s.files for s in job.scanned], plan, job.pre, device=rt.device,
                           precision=rt.precision, batch_size=batch_size,
                           num_threads=rt.num_threads, read_workers=rt.read_workers)
    try:
        reader.start()  # before the model touches CUDA: DALI's workers are forked
        torch.set_num_threads(rt.num_threads)
        job.model.backbone.to(rt.device)
        if rt.device.type == "cuda":
            job.model.backbone.to(memory_format=torch.channels_last)
        engine = Engine(job.model, rt.device, rt.precision, job.out_dtype, batch_size)
        _run_batches(reader, engine, store, job, summary, progress, grp)
    finally:
        reader.close()
    summary.profile["recovered_batches"] = reader.recovered_batches


def _run_batches(reader, engine: Engine, store: S.FeatureStore, job: Job,
                 summary: ExtractSummary, progress: Progress, grp: Dist.Group) -> None:
    """Decode (reader, in the background) -> forward (here) -> write (writer thread)."""
    autocast = engine.cuda and engine.precision != "fp32"
    writer = S.ChunkWriter(store, [s.name for s in job.scanned],
                           [s.files for s in job.scanned], chunk_rows=job.chunk_rows,
                           feature_dim=engine.model.feature_dim, dtype=job.out_dtype,
                           nonfinite_hint=f"{X.ref('precision', engine.precision)} computes in "
                           "reduced precision, which can overflow: rerun with "
                           f"{X.ref('precision', 'fp32')}" if autocast
                           else "the checkpoint's weights may hold NaN/inf, or the model "
                           "overflows on these images")
    waited = 0.0
    count = grp.collective
    try:
        batches = iter(reader)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - t0
            if batch is None:
                break
            features, peak, ready, release = engine(batch.images, batch.keep,
                                                    writer.raise_if_failed)
            writer.put(batch.split, batch.lo, features, batch.ok, batch.reasons, peak=peak,
                       ready=ready, release=release)
            # under torchrun the bar shows the whole job: every rank adds to one counter
            progress.set(grp.add("extract/images", batch.n)) if count else progress.update(batch.n)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    summary.quarantined, summary.rescued = writer.quarantined, writer.rescued
    summary.profile.update(wait_for_batches_s=waited, forward_s=engine.forward_seconds,
                           writer_busy_s=writer.busy_seconds)


# ---------------------------------------------------------------------------------------------
# The store of this job: made, or proven and repaired


def _open_or_create(job: Job, *, rank: int, held: contextlib.ExitStack | None
                    ) -> S.FeatureStore:
    """The store for this job: created, or opened and proven (and repaired) if it exists.

    `held` keeps the writer lock for the rest of the run (None: RANK/WORLD_SIZE set by hand,
    independent jobs that share the store on purpose, take none)."""
    out, overwrite = job.out, job.settings.overwrite
    if held is not None:
        held.enter_context(S.WriterLock(out))
    if rank == 0 and S.is_damaged_store(out) and not overwrite:
        if not S.restore_root(out, fingerprint=job.components, **job.spec):
            S.open_store(out)  # says what is wrong, and that --overwrite makes it anew
        log.warning("%s had lost its root metadata (zarr.json); its splits record these "
                    "inputs, so it was written again from them", out)
    store = _open_current(out, overwrite) if S.is_store(out) else None
    if store is not None:
        if store.components == job.components:
            # by hand, the other ranks' jobs leave the checks to rank 0's
            if rank != 0 or _prove(store, job):
                return store
        else:
            _replacing(out, S.fingerprint_differences(store.components, job.components),
                       overwrite)
    elif rank != 0:
        return _wait_for_store(out, job.components)
    out.parent.mkdir(parents=True, exist_ok=True)
    return S.FeatureStore(out, S.create_store(out, fingerprint=job.components, **job.spec))


def _open_current(out: Path, overwrite: bool) -> S.FeatureStore | None:
    """The store at `out`, of this tool's layout version; one of another is refused (naming
    --overwrite), or with --overwrite left to be replaced (None)."""
    try:
        return S.FeatureStore.open(out, mode="r+")
    except StoreError as exc:
        if not overwrite:
            raise
        log.warning("replacing %s: %s", out, exc.raw)
        return None


def _replacing(out: Path, diffs: list[str], overwrite: bool) -> None:
    if not overwrite:
        raise StoreError(f"{out} was made from other inputs (differs in: {', '.join(diffs)}); "
                         f"pass {X.ref('overwrite')} to replace it, or choose another "
                         f"{X.ref('out')}")
    log.warning("replacing %s (differs in: %s)", out, ", ".join(diffs))


def _prove(store: S.FeatureStore, job: Job) -> bool:
    """An existing store of these inputs: every chunk marked done must be there (by listing; by
    reading with --verify), and while chunks are still to do, no file under a done chunk may
    have changed (the store would mix old and new features: refused, or with --overwrite made
    anew, when this returns False). Damaged chunks are made to-do again, so this run recomputes
    them. The classes' human names are those of this run."""
    damage = _damage(store, job)
    refresh = S.Damage()  # chunks still to do whose files changed: their record is rewritten
    changed = {s.name: _changed_files(store, s, damage, refresh) for s in job.scanned
               if s.name not in damage.splits}
    pending = bool(damage) or any(not store.done(s.name).all()
                                  for s in job.scanned if s.name not in damage.splits)
    for split, (count, examples) in changed.items():
        if count and not _changes_allowed(split, count, examples, job, pending):
            return False
    if damage:
        log.warning("%s is damaged (%s): repairing; those chunks are recomputed", job.out,
                    damage.describe())
    for split, bad in refresh.chunks.items():
        log.info("%s: files changed under %d chunk(s) not yet done; they are extracted as they "
                 "are now", split, len(bad))
        for c, why in bad.items():
            damage.add(split, c, why)
    if damage:
        store.repair(damage, job.spec["splits"], feature_dim=job.model.feature_dim,
                     dtype=job.out_dtype.name, chunk_rows=job.chunk_rows)
    elif job.settings.verify:
        log.info("verify: every chunk of %s reads back and passes its checksum", job.out)
    if store.set_class_names(job.spec["extra_attrs"]["class_names"]):
        # not part of the store's inputs (they change no feature): those of the latest run
        log.info("%s: the classes' names %s", job.out,
                 "recorded" if store.class_names else "removed")
    return True


def _damage(store: S.FeatureStore, job: Job) -> S.Damage:
    """What is wrong with the store: by listing (every run), or by reading every chunk."""
    if not job.settings.verify:
        return store.check()
    rows = sum(len(s.files) for s in job.scanned)
    with Progress(rows, "verify", interval=30.0) as bar:
        return store.verify(bar)


def _changes_allowed(split: str, count: int, examples: list[str], job: Job,
                     pending: bool) -> bool:
    """Files changed under chunks already done: with --overwrite the store is made anew
    (False); else a warning on a finished store (it keeps the features of the files as they
    were), and refused while chunks are still to do (it would mix old and new features)."""
    what = (f"{split}: {count} file(s) changed since {job.out} was started "
            f"({'; '.join(examples)}{'; ...' if count > len(examples) else ''})")
    if job.settings.overwrite:
        log.warning("%s; making the store anew", what)
        return False
    if pending:
        raise StoreError(f"{what}; finishing the store would mix features of the old and the "
                         f"new files: pass {X.ref('overwrite')} to start it again")
    log.warning("%s; the store holds the features of the files as they were: pass %s to "
                "extract them again", what, X.ref("overwrite"))
    return True


def _changed_files(store: S.FeatureStore, split: D.Split, damage: S.Damage,
                   refresh: S.Damage) -> tuple[int, list[str]]:
    """How many files under chunks already done differ in size or modification time from the
    store's record of them, and the first three, described. A file that changed under a chunk
    still to do only needs its record rewritten (noted in `refresh`); a record that cannot be
    read is damage."""
    stored = store.read_noting(split.name, "stat", damage)
    differ = (stored != split.stats).any(axis=1)
    rows = store.chunk_rows(split.name)
    done = store.done(split.name)
    for c in np.flatnonzero(~done):
        if differ[c * rows:(c + 1) * rows].any():
            refresh.add(split.name, int(c), "a file changed before the chunk was done")
    for c in [*damage.chunks.get(split.name, {}), *refresh.chunks.get(split.name, {})]:
        differ[c * rows:(c + 1) * rows] = False
    differ = np.flatnonzero(differ)
    examples = []
    for i in differ[:3]:
        size0, size1 = int(stored[i][0]), int(split.stats[i][0])
        what = "modified in place" if size0 == size1 else f"size {size0} -> {size1} bytes"
        examples.append(f"{split.files[i]}: {what}")
    return int(differ.size), examples


def _wait_for_store(out: Path, components: dict, timeout: float = 600.0) -> S.FeatureStore:
    """Without torchrun, ranks other than 0 (independent jobs) wait for rank 0 to create the
    store, then check it is the same."""
    deadline = time.monotonic() + timeout
    while not S.is_store(out):
        if time.monotonic() > deadline:
            raise StoreError(f"rank 0 did not create {out} within {timeout:.0f} s")
        time.sleep(0.5)
    return _open_existing(out, components)


def _open_existing(out: Path, components: dict) -> S.FeatureStore:
    store = S.FeatureStore.open(out, mode="r+")
    if store.components != components:
        raise StoreError(f"{out} was created from other inputs than this rank's")
    return store
