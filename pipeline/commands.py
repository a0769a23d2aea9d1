"""The command lines: the three stage scripts and `quickfix-labels`, which runs all three.

Each stage's flags are declared once, here, and shared: `quickfix-labels` (`pipeline.fix`)
takes the flags of every stage, so anything a stage script accepts can be given to it too.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from . import dist
from .cli import log, run_main, script_parser
from .train import DEFAULT_LR, DEFAULT_WD

EXTRACT_DOC = """Stage 1: run the frozen backbone once and cache pooled features in a Zarr store.

    python extract_features.py --checkpoint checkpoint_best.pth --data-root /data/imagenet \\
        --dataset imagenet1k --out features.zarr

Rerunning the same command resumes an interrupted run, and is a no-op on a finished store.
"""

TRAIN_DOC = """Stage 2: train only the classification head on the cached features (seconds).

    python train_head.py --features features.zarr --checkpoint checkpoint_best.pth --out head.pt

Every --lr x --weight-decay combination trains together in one pass; the best on a holdout
carved from train is kept, and val top-1/top-5 is reported for every point. With --checkpoint,
the old head is diagnosed first: if its rows are a permutation of the right head, --init auto
starts from the permuted rows; the permuted old head is also a candidate of its own (epoch 0),
chosen when it wins on the holdout, and --epochs 0 makes it the fix with no training. The
backbone is judged too (ok, weak, untrained) against the accuracy the checkpoint records.
"""

STITCH_DOC = """Stage 3: write the new head and the correct class order into a copy of the model.

    python stitch_checkpoint.py --checkpoint checkpoint_best.pth --head head.pt \\
        --out fixed/checkpoint_best.pth --verify-data /data/imagenet/val

The original is never modified. The copy keeps every key; only the head (in every copy of the
model, EMA included) and the class mapping change, and every backbone tensor is verified
bit-identical before the file is moved into place.
"""

EXTRACT_DEFAULTS = dict(decoder="auto", precision="auto", float32=False, chunk_rows=1024,
                        ema=None, verify=False, progress_every=30.0)
TRAIN_DEFAULTS = dict(lr=DEFAULT_LR, weight_decay=DEFAULT_WD, batch_size=256,
                      label_smoothing=0.0, warmup_epochs=1.0, seed=0, holdout_fraction=0.1,
                      init="auto", stream=None, stream_from_store=None, stream_buffer=64)
STITCH_DEFAULTS = dict(aux_heads="auto", verify_batch_size=128)


def add_class_order_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--class-order", type=Path,
                        help="the correct class order: one class id per line, or "
                        "imagenet_class_index.json form (default: sorted folder names)")
    from .presets import PRESETS

    parser.add_argument("--dataset", metavar="NAME",
                        help="a dataset whose standard order is built in, instead of "
                        f"--class-order: {', '.join(sorted(PRESETS))} (the class folders are "
                        "checked against it, and id_to_class gets its human names)")


def add_extract_flags(parser: argparse.ArgumentParser, *, batch_flag: str = "--batch-size"
                      ) -> None:
    """Stage 1's flags, except its input and output paths (`batch_flag`: the name of its batch
    size, which `quickfix-labels` leaves to the head)."""
    parser.add_argument("--splits", nargs="+", metavar="SPLIT",
                        help="split folders to extract (default: those present of "
                        "train, val, validation, test)")
    add_class_order_flags(parser)
    parser.add_argument("--arch",
                        help="torchvision model name, timm:NAME (pip install "
                        "'quickfix-labels[timm]') or package.module:function (default: the "
                        "checkpoint's arch, else inferred from its weights)")
    parser.add_argument("--resize", type=int, help="short-side resize (default: the "
                        "architecture's eval transform)")
    parser.add_argument("--crop", type=int, help="center crop (default: the architecture's)")
    parser.add_argument(batch_flag, dest="extract_batch_size", type=int, default=128,
                        metavar="N",
                        help="images per forward pass of the backbone")
    parser.add_argument("--decoder", choices=("auto", "dali", "pil"),
                        help="auto: DALI when installed, else PIL")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                        help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    parser.add_argument("--float32", action=argparse.BooleanOptionalAction,
                        help="store features as float32 instead of float16")
    parser.add_argument("--chunk-rows", type=int,
                        help="rows per storage chunk (the unit of resume and of writers)")
    parser.add_argument("--num-threads", type=int,
                        help="DALI decoder threads and torch CPU threads (default: cores, max 16)")
    parser.add_argument("--read-workers", type=int,
                        help="DALI worker processes that read, check and measure the files "
                        "(default: a quarter of --num-threads, at least 1, at most 8)")
    parser.add_argument("--progress-every", type=float, metavar="SECONDS",
                        help="when stderr is not a terminal (a SLURM or nohup log), log a "
                        "progress line this often")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction,
                        help="use the checkpoint's EMA weights; stages 2 and 3 follow the "
                        "store's choice (default: the EMA for a timm checkpoint that has one, "
                        "as timm loads it, else the model)")
    parser.add_argument("--head", metavar="NAME",
                        help="the classification layer to retrain, e.g. fc or head (default: "
                        "timm's get_classifier(), else the last linear layer)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction,
                        help="read every chunk of an existing store and check its checksum "
                        "(every run checks by listing that no chunk is missing); damaged "
                        "chunks are recomputed")
    parser.set_defaults(**EXTRACT_DEFAULTS)


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Stage 2's flags, except its paths and its epochs."""
    parser.add_argument("--lr", help="learning rate(s), comma-separated: a grid in one pass")
    parser.add_argument("--weight-decay", help="weight decay value(s), comma-separated: the "
                        "L2 penalty wd/2*||W||^2 on the raw head's weight, as "
                        "torch.optim.SGD(weight_decay=wd) on an nn.Linear's weight")
    parser.add_argument("--batch-size", type=int, help="the head's training batch")
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--warmup-epochs", type=float, help="linear warmup before the cosine "
                        "decay")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--holdout-fraction", type=float,
                        help="share of train held out to choose the grid point (never val)")
    parser.add_argument("--init", choices=("auto", "zeros", "old-head"),
                        help="auto: the permuted old head when it is a permutation, else zeros")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction,
                        help="stream batches from host memory instead of keeping the features "
                        "on the device (default: resident when they fit)")
    parser.add_argument("--stream-from-store", action=argparse.BooleanOptionalAction,
                        help="out of core: read the features from the store in chunks, with a "
                        "bounded buffer, instead of loading them into host memory (default: "
                        "when they do not fit in the host memory available)")
    parser.add_argument("--stream-buffer", type=float, metavar="MB",
                        help="host memory for the out-of-core shuffle window and read-ahead "
                        "(a larger window reads less in step with the training: on 2 CPU cores "
                        "64 MB gave the shortest epochs, BENCHMARKS.md)")
    parser.set_defaults(**TRAIN_DEFAULTS)


def add_stitch_flags(parser: argparse.ArgumentParser) -> None:
    """Stage 3's flags, except its paths and --verify-data."""
    parser.add_argument("--aux-heads", choices=("auto", "permute", "keep"),
                        help="auxiliary heads over the same classes (GoogLeNet, Inception v3): "
                        "auto re-orders them with stage 2's permutation when the old head was a "
                        "clean permutation of the right one and refuses otherwise; permute "
                        "always applies stage 2's best permutation; keep leaves them as they are")
    parser.add_argument("--verify-batch-size", type=int, metavar="N",
                        help="images per batch of --verify-data")
    parser.set_defaults(**STITCH_DEFAULTS)


# --- stage 1 ---------------------------------------------------------------------------------

def extract_parser() -> argparse.ArgumentParser:
    parser = script_parser(EXTRACT_DOC)
    parser.add_argument("--checkpoint", "--resume", type=Path, required=True,
                        help="the trained model (training-script checkpoint or state dict)")
    parser.add_argument("--data-root", type=Path, required=True,
                        help="ImageFolder tree: DATA_ROOT/<split>/<class>/<image>")
    add_extract_flags(parser)
    parser.add_argument("--out", type=Path, required=True, help="the feature store to write")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                        help="replace a store that was made from other inputs")
    return parser


def extract_kwargs(args: argparse.Namespace) -> dict:
    """run_extract's arguments from a parsed command line (either command's)."""
    return dict(
        checkpoint=args.checkpoint, data_root=args.data_root, splits=args.splits,
        class_order=args.class_order, dataset=args.dataset, arch=args.arch,
        resize=args.resize, crop=args.crop, batch_size=args.extract_batch_size,
        device=args.device, decoder=args.decoder, precision=args.precision,
        float32=args.float32, chunk_rows=args.chunk_rows, num_threads=args.num_threads,
        read_workers=args.read_workers, progress_every=args.progress_every,
        verify=args.verify, trust_checkpoint=args.trust_checkpoint, use_ema=args.ema,
        head=args.head, rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)))


def extract_main(argv: list[str] | None = None) -> int:
    from .extract import run_extract

    def body(args: argparse.Namespace) -> int:
        group = dist.join("gloo")  # under torchrun: the job's process group
        if not group.main:
            log.setLevel(max(log.level, logging.WARNING))  # one voice: rank 0's
        try:
            summary = run_extract(**extract_kwargs(args), out=args.out,
                                  overwrite=args.overwrite, group=group, argv=argv)
        finally:
            dist.leave()
        if group.main:
            log.info(summary.line())
        return 0

    return run_main(body, extract_parser(), argv)


# --- stage 2 ---------------------------------------------------------------------------------

def train_parser() -> argparse.ArgumentParser:
    parser = script_parser(TRAIN_DOC)
    parser.add_argument("--features", type=Path, required=True,
                        help="the feature store written by extract_features.py")
    parser.add_argument("--out", type=Path, required=True, help="the head file to write")
    parser.add_argument("--checkpoint", "--resume", type=Path,
                        help="the original model: checked against the store, diagnosed, "
                        "judged against the accuracy it records, and used for a warm start")
    parser.add_argument("--epochs", "--fix-epochs", type=int, default=5,
                        help="passes over the features")
    add_train_flags(parser)
    return parser


def train_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
        batch_size=args.batch_size, label_smoothing=args.label_smoothing,
        warmup_epochs=args.warmup_epochs, device=args.device, seed=args.seed,
        holdout_fraction=args.holdout_fraction, checkpoint=args.checkpoint, init=args.init,
        stream=args.stream, stream_from_store=args.stream_from_store,
        stream_buffer_mb=args.stream_buffer, trust_checkpoint=args.trust_checkpoint)


def train_backend(device: str) -> str:
    """The process group's backend under torchrun: NCCL for the gradients on GPUs (the device
    itself is checked in run_train, where an error stops every rank with one line)."""
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "cuda" if cuda else "gloo"


def train_main(argv: list[str] | None = None) -> int:
    from .train import run_train

    def body(args: argparse.Namespace) -> int:
        group = dist.join(train_backend(args.device))
        if not group.main:
            log.setLevel(max(log.level, logging.WARNING))  # one voice: rank 0's
        try:
            summary = run_train(features=args.features, out=args.out, **train_kwargs(args),
                                group=group, argv=argv)
        finally:
            dist.leave()
        if group.main:
            log.info(summary.line())
        return 0

    return run_main(body, train_parser(), argv)


# --- stage 3 ---------------------------------------------------------------------------------

def stitch_parser() -> argparse.ArgumentParser:
    parser = script_parser(STITCH_DOC)
    parser.add_argument("--checkpoint", "--resume", type=Path, required=True,
                        help="the original checkpoint (read only)")
    parser.add_argument("--head", type=Path, required=True, help="written by train_head.py")
    parser.add_argument("--out", type=Path, required=True, help="the fixed checkpoint to write")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                        help="replace an existing --out (never the input)")
    parser.add_argument("--verify-data", type=Path, metavar="DIR",
                        help="run the fixed model end to end on these val images (a split "
                        "folder, or a root with val/) and report its top-1")
    add_stitch_flags(parser)
    parser.add_argument("--progress-every", type=float, metavar="SECONDS", default=30.0,
                        help="off a terminal (a SLURM or nohup log), print a --verify-data "
                        "progress line this often")
    return parser


def run_stitch(args: argparse.Namespace, *, checkpoint: Path, head: Path, out: Path,
               overwrite: bool, verify_data: Path | None) -> None:
    """Stage 3 and its end-to-end check on images, with their summary lines."""
    from .checkpoint import load_head
    from .errors import DataError
    from .files import resolve_device
    from .stitch import stitch, verify_on_images

    device = None
    if verify_data is not None:  # checked before anything is written
        device = resolve_device(args.device)
        if not verify_data.is_dir():
            raise DataError(f"--verify-data {verify_data} is not a directory")
        if args.verify_batch_size < 1:
            raise DataError(f"--verify-batch-size {args.verify_batch_size}: must be at "
                            "least 1")
    summary = stitch(checkpoint=checkpoint, head_path=head, out=out, overwrite=overwrite,
                     trust_checkpoint=args.trust_checkpoint, aux_heads=args.aux_heads)
    log.info(summary.line())
    if verify_data is not None:
        loaded = load_head(head)
        result = verify_on_images(out, verify_data, loaded, device=device,
                                  batch_size=args.verify_batch_size,
                                  trust=args.trust_checkpoint,
                                  progress_every=args.progress_every)
        log.info(result.line(verify_data, loaded["metrics"].get("val_top1")))


def stitch_main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        run_stitch(args, checkpoint=args.checkpoint, head=args.head, out=args.out,
                   overwrite=args.overwrite, verify_data=args.verify_data)
        return 0

    return run_main(body, stitch_parser(), argv)
