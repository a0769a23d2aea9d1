#!/usr/bin/env python3
"""Stage 3: write the trained head and the correct class order into a copy of the checkpoint.

    python stitch_checkpoint.py --checkpoint checkpoint_best.pth --head head.pt \
        --out fixed/checkpoint_best.pth --verify-data /data/imagenet/val

The flags are declared in `pipeline.settings`; `quickfix-labels` runs all three stages.
"""

from pipeline.cli import stitch_main as main
from pipeline.cli import stitch_parser as build_parser

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
