#!/usr/bin/env python3
"""Stage 1: run the frozen backbone once and cache pooled features in a Zarr store.

    python extract_features.py --checkpoint checkpoint_best.pth --data-root /data/imagenet \
        --dataset imagenet1k --out features.zarr

Rerunning the same command resumes an interrupted run, and is a no-op on a finished store.
The flags are declared in `pipeline.settings`; `quickfix-labels` runs all three stages.
"""

from pipeline.cli import extract_main as main
from pipeline.cli import extract_parser as build_parser

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
