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

import torch

from pipeline.cli import log, run_main, script_parser
from pipeline.stitch import stitch, verify_on_images
from pipeline.train import load_head


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
    parser.set_defaults(overwrite=False, aux_heads="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        summary = stitch(checkpoint=args.checkpoint, head_path=args.head, out=args.out,
                         overwrite=args.overwrite, trust_checkpoint=args.trust_checkpoint,
                         aux_heads=args.aux_heads)
        log.info(summary.line())
        if args.verify_data is not None:
            head = load_head(args.head)
            device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available()
                                  else "cpu")
            acc, n = verify_on_images(args.out, args.verify_data, head, device=device,
                                      trust=args.trust_checkpoint)
            cached = head["metrics"].get("val_top1")
            beside = f" (stage 2 on cached features: {cached:.2%})" if cached is not None else ""
            log.info("verify: the fixed model end to end on %d images of %s: top-1 %.2f%%%s",
                     n, args.verify_data, 100 * acc, beside)
        return 0

    return run_main(body, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
