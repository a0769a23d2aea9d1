#!/usr/bin/env python3
"""Stage 1: run the frozen backbone once and cache pooled features in a Zarr store.

    python extract_features.py --checkpoint checkpoint_best.pth --data-root /data/imagenet \
        --class-order imagenet_class_index.json --out features.zarr

Rerunning the same command resumes an interrupted run, and is a no-op on a finished store.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from pipeline import dist
from pipeline.cli import log, run_main, script_parser
from pipeline.extract import run_extract


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", "--resume", type=Path, required=True,
                        help="the trained model (training-script checkpoint or state dict)")
    parser.add_argument("--data-root", type=Path, required=True,
                        help="ImageFolder tree: DATA_ROOT/<split>/<class>/<image>")
    parser.add_argument("--splits", nargs="+", metavar="SPLIT",
                        help="split folders to extract (default: those present of "
                        "train, val, validation, test)")
    parser.add_argument("--class-order", type=Path,
                        help="the correct class order: one class id per line, or "
                        "imagenet_class_index.json form (default: sorted folder names)")
    parser.add_argument("--arch",
                        help="torchvision model name, timm:NAME (pip install "
                        "'quickfix-labels[timm]') or package.module:function (default: the "
                        "checkpoint's arch, else inferred from its weights)")
    parser.add_argument("--resize", type=int, help="short-side resize (default: the "
                        "architecture's eval transform)")
    parser.add_argument("--crop", type=int, help="center crop (default: the architecture's)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass")
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
    parser.add_argument("--out", type=Path, required=True, help="the feature store to write")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction,
                        help="replace a store that was made from other inputs")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction,
                        help="read every chunk of an existing store and check its checksum "
                        "(every run checks by listing that no chunk is missing); damaged "
                        "chunks are recomputed")
    parser.set_defaults(batch_size=128, decoder="auto", precision="auto", float32=False,
                        chunk_rows=1024, ema=None, overwrite=False, verify=False,
                        progress_every=30.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        group = dist.join("gloo")  # under torchrun: the job's process group
        if not group.main:
            log.setLevel(max(log.level, logging.WARNING))  # one voice: rank 0's
        try:
            summary = run_extract(
                checkpoint=args.checkpoint, data_root=args.data_root, out=args.out,
                splits=args.splits, class_order=args.class_order, arch=args.arch,
                resize=args.resize, crop=args.crop, batch_size=args.batch_size,
                device=args.device, decoder=args.decoder, precision=args.precision,
                float32=args.float32, chunk_rows=args.chunk_rows, num_threads=args.num_threads,
                read_workers=args.read_workers, progress_every=args.progress_every,
                overwrite=args.overwrite, verify=args.verify,
                trust_checkpoint=args.trust_checkpoint,
                use_ema=args.ema, head=args.head, rank=int(os.environ.get("RANK", 0)),
                world_size=int(os.environ.get("WORLD_SIZE", 1)),
                group=group, argv=argv,
            )
        finally:
            dist.leave()
        if group.main:
            log.info(summary.line())
        return 0

    return run_main(body, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
