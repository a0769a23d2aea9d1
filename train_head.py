#!/usr/bin/env python3
"""Stage 2: train only the classification head on the cached features (seconds, not hours).

    python train_head.py --features features.zarr --checkpoint checkpoint_best.pth --out head.pt

The flags are declared in `pipeline.settings`; `quickfix-labels` runs all three stages.
"""

from pipeline.cli import train_main as main
from pipeline.cli import train_parser as build_parser

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
