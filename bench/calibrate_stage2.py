#!/usr/bin/env python3
"""Calibrate stage 2's default grid on real-image feature stores.

    python bench/calibrate_stage2.py NAME=STORE[,CHECKPOINT] ... [--epochs 5] [--json out.json]

For each store, one `train_head.py` run trains a wide grid (every LR x weight decay below, from
zeros, and again from the permuted old head when a checkpoint is given) at the default batch
and epochs. A point trained in the grid equals the point trained alone (same batches), so every
candidate default grid can then be judged from these runs: the point it would choose on the
holdout (the permuted old head is a candidate too), and that point's val top-1, beside the best
val top-1 of the whole wide grid (an oracle that peeks at val). The stores are made by
`bench/realfeatures.py` (Fashion-MNIST, the bundled demo's digits).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train_head  # noqa: E402
from pipeline import head as H  # noqa: E402

WIDE_LR = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
WIDE_WD = [0.0, 1e-5, 1e-4, 1e-3, 1e-2]
CANDIDATE_GRIDS = {
    "previous default: LR 0.01-0.3 x WD 0, 1e-3, 1e-2": ([0.01, 0.03, 0.1, 0.3], [0, 1e-3, 1e-2]),
    "LR 0.01-0.3 x WD 0, 1e-4": ([0.01, 0.03, 0.1, 0.3], [0, 1e-4]),
    "LR 0.03-1 x WD 0, 1e-4": ([0.03, 0.1, 0.3, 1.0], [0, 1e-4]),
    "LR 0.01-1 x WD 0, 1e-4, 1e-3": ([0.01, 0.03, 0.1, 0.3, 1.0], [0, 1e-4, 1e-3]),
    "LR 0.1 x WD 0 (one point)": ([0.1], [0]),
}


def run(store: Path, checkpoint: Path | None, init: str, epochs: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "head.pt"
        args = ["--features", str(store), "--out", str(out), "--epochs", str(epochs),
                "--lr", ",".join(map(str, WIDE_LR)),
                "--weight-decay", ",".join(map(str, WIDE_WD)), "--init", init]
        if checkpoint is not None:
            args += ["--checkpoint", str(checkpoint)]
        if train_head.main(args) != 0:
            raise SystemExit(f"train_head.py failed on {store}")
        return torch.load(out, weights_only=True)["grid"]


def chosen(records: list[dict], lrs, wds) -> dict:
    pool = [r for r in records if r["candidate"] != "grid"
            or (r["lr"] in lrs and r["weight_decay"] in wds)]
    return pool[H.choose(pool, "holdout")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stores", nargs="+", metavar="NAME=STORE[,CHECKPOINT]")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = {}
    for spec in args.stores:
        name, _, paths = spec.partition("=")
        store, _, ckpt = paths.partition(",")
        runs = {"zeros": run(Path(store), Path(ckpt) if ckpt else None, "zeros", args.epochs)}
        if ckpt:
            runs["auto"] = run(Path(store), Path(ckpt), "auto", args.epochs)
        results[name] = runs

    print(f"# stage 2 calibration: {args.epochs} epochs, batch 256; "
          f"{platform.machine()}, torch {torch.__version__}")
    for name, runs in results.items():
        zeros = [r for r in runs["zeros"] if r["candidate"] == "grid"]
        print(f"\n## {name}: val top-1 (%) from zeros after {args.epochs} epochs, "
              "LR down, weight decay across")
        print("| LR | " + " | ".join(f"wd {w:g}" for w in WIDE_WD) + " |")
        print("|---|" + "---|" * len(WIDE_WD))
        for lr in WIDE_LR:
            cells = [next(r for r in zeros if r["lr"] == lr and r["weight_decay"] == wd)
                     for wd in WIDE_WD]
            print(f"| {lr:g} | " + " | ".join(f"{100 * c['val_top1']:.2f}" for c in cells) + " |")
        old = [r for r in runs["zeros"] if r["candidate"] != "grid"]
        if old:
            print(f"\npermuted old head (no training): val top-1 {100 * old[0]['val_top1']:.2f}")
        print(f"\n| grid ({name}) | init | chosen on the holdout | its val top-1 | "
              "best val top-1 of the wide grid (oracle) |")
        print("|---|---|---|---|---|")
        for init, records in runs.items():
            oracle = max(r["val_top1"] for r in records)
            for grid, (lrs, wds) in CANDIDATE_GRIDS.items():
                c = chosen(records, lrs, wds)
                what = ("old head (permuted)" if c["candidate"] != "grid"
                        else f"lr={c['lr']:g} wd={c['weight_decay']:g}")
                print(f"| {grid} | {init} | {what} | {100 * c['val_top1']:.2f} | "
                      f"{100 * oracle:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
