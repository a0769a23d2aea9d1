#!/usr/bin/env python3
"""Stage 3: write the trained head and the correct class order into a copy of the checkpoint.

    python stitch_checkpoint.py --checkpoint checkpoint_best.pth --head head.pt \
        --out fixed/checkpoint_best.pth --verify-data /data/imagenet/val

The original is never modified. The copy keeps every key; only the head (in every copy of the
model, EMA included) and the class mapping change, and every backbone tensor is verified
bit-identical before the file is moved into place.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.checkpoint import load_head
from pipeline.cli import log, run_main, script_parser
from pipeline.errors import DataError
from pipeline.files import resolve_device
from pipeline.stitch import stitch, verify_on_images


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", "--resume", type=Path, required=True,
                        help="the original checkpoint (read only)")
    parser.add_argument("--head", type=Path, required=True, help="written by train_head.py")
    parser.add_argument("--out", type=Path, required=True, help="the fixed checkpoint to write")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction,
                        help="replace an existing --out (never the input)")
    parser.add_argument("--verify-data", type=Path, metavar="DIR",
                        help="run the fixed model end to end on these val images (a split "
                        "folder, or a root with val/) and report its top-1")
    parser.add_argument("--aux-heads", choices=("auto", "permute", "keep"),
                        help="auxiliary heads over the same classes (GoogLeNet, Inception v3): "
                        "auto re-orders them with stage 2's permutation when the old head was a "
                        "clean permutation of the right one and refuses otherwise; permute "
                        "always applies stage 2's best permutation; keep leaves them as they are")
    parser.add_argument("--verify-batch-size", type=int, metavar="N",
                        help="images per batch of --verify-data")
    parser.add_argument("--progress-every", type=float, metavar="SECONDS",
                        help="off a terminal (a SLURM or nohup log), print a --verify-data "
                        "progress line this often")
    parser.set_defaults(overwrite=False, aux_heads="auto", verify_batch_size=128,
                        progress_every=30.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        device = None
        if args.verify_data is not None:  # checked before anything is written
            device = resolve_device(args.device)
            if not args.verify_data.is_dir():
                raise DataError(f"--verify-data {args.verify_data} is not a directory")
            if args.verify_batch_size < 1:
                raise DataError(f"--verify-batch-size {args.verify_batch_size}: must be at "
                                "least 1")
        summary = stitch(checkpoint=args.checkpoint, head_path=args.head, out=args.out,
                         overwrite=args.overwrite, trust_checkpoint=args.trust_checkpoint,
                         aux_heads=args.aux_heads)
        log.info(summary.line())
        if args.verify_data is not None:
            head = load_head(args.head)
            result = verify_on_images(args.out, args.verify_data, head,
                                      device=device,
                                      batch_size=args.verify_batch_size,
                                      trust=args.trust_checkpoint,
                                      progress_every=args.progress_every)
            log.info(result.line(args.verify_data, head["metrics"].get("val_top1")))
        return 0

    return run_main(body, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
