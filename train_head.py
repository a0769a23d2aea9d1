#!/usr/bin/env python3
"""Stage 2: train only the classification head on the cached features (seconds, not hours).

    python train_head.py --features features.zarr --checkpoint checkpoint_best.pth --out head.pt

Every --lr x --weight-decay combination trains together in one pass; the best on a holdout
carved from train is kept, and val top-1/top-5 is reported for every point. With --checkpoint,
the old head is diagnosed first: if its rows are a permutation of the right head, --init auto
starts from the permuted rows; the permuted old head is also a candidate of its own (epoch 0),
chosen when it wins on the holdout, and --epochs 0 makes it the fix with no training.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from pipeline import dist
from pipeline.cli import log, run_main, script_parser
from pipeline.train import DEFAULT_LR, DEFAULT_WD, run_train


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--features", type=Path, required=True,
                        help="the feature store written by extract_features.py")
    parser.add_argument("--out", type=Path, required=True, help="the head file to write")
    parser.add_argument("--checkpoint", "--resume", type=Path,
                        help="the original model: checked against the store, diagnosed, and "
                        "used for a warm start")
    parser.add_argument("--epochs", "--fix-epochs", type=int, help="passes over the features")
    parser.add_argument("--lr", help="learning rate(s), comma-separated: a grid in one pass")
    parser.add_argument("--weight-decay", help="weight decay value(s), comma-separated: the "
                        "L2 penalty wd/2*||W||^2 on the raw head's weight, as "
                        "torch.optim.SGD(weight_decay=wd) on an nn.Linear's weight")
    parser.add_argument("--batch-size", type=int)
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
    parser.set_defaults(epochs=5, lr=DEFAULT_LR, weight_decay=DEFAULT_WD,
                        batch_size=256, label_smoothing=0.0, warmup_epochs=1.0, seed=0,
                        holdout_fraction=0.1, init="auto", stream=None,
                        stream_from_store=None, stream_buffer=64)
    return parser


def main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        # under torchrun: the job's process group (NCCL for the gradients on GPUs); the device
        # itself is checked in run_train, where an error stops every rank with one line
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        group = dist.join("cuda" if cuda else "gloo")
        if not group.main:
            log.setLevel(max(log.level, logging.WARNING))  # one voice: rank 0's
        try:
            summary = run_train(
                features=args.features, out=args.out, epochs=args.epochs, lr=args.lr,
                weight_decay=args.weight_decay, batch_size=args.batch_size,
                label_smoothing=args.label_smoothing, warmup_epochs=args.warmup_epochs,
                device=args.device, seed=args.seed, holdout_fraction=args.holdout_fraction,
                checkpoint=args.checkpoint, init=args.init, stream=args.stream,
                stream_from_store=args.stream_from_store, stream_buffer_mb=args.stream_buffer,
                trust_checkpoint=args.trust_checkpoint, group=group, argv=argv,
            )
        finally:
            dist.leave()
        if group.main:
            log.info(summary.line())
        return 0

    return run_main(body, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
