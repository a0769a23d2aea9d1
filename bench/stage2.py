#!/usr/bin/env python3
"""Stage 2 benchmark: ms per epoch for one head and an 8-point LR grid, against scikit-learn.

    python bench/stage2.py                     # CPU, scaled down (N=20000, D=512, C=100)
    python bench/stage2.py --device cuda --n 1281167 --dim 2048 --classes 1000 --no-sklearn

Features are synthetic but learnable (ReLU of class centres plus noise, stored as float16, like
pooled CNN features). Prints one table: ms/epoch (median of the timed epochs, after one warm-up
epoch) for one head and for the grid, their ratio, the end-to-end train_head.py time on a real
Zarr store, and scikit-learn LogisticRegression's time and val top-1 on the same features.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import head as H  # noqa: E402
from pipeline import store as S  # noqa: E402


def make_features(n: int, dim: int, classes: int, seed: int = 0, device: str = "cpu",
                  noise_scale: float = 5.0):
    gen = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen, device=device)
    y = torch.randint(0, classes, (n,), generator=gen, device=device)
    x = torch.empty(n, dim, dtype=torch.float16, device=device)
    for lo in range(0, n, 65536):  # in blocks: the float32 temporaries stay small
        yy = y[lo:lo + 65536]
        noise = torch.randn(yy.numel(), dim, generator=gen, device=device) * noise_scale
        x[lo:lo + 65536] = torch.relu(centres[yy] + noise).half()
    return x, y


def time_epochs(train: H.Features, lrs: list[float], classes: int, device: torch.device,
                epochs: int, module=H, wd: float = 0.0) -> tuple[float, H.TrainResult]:
    cfg = module.TrainConfig(lrs=lrs, wds=[wd], epochs=epochs + 1, batch_size=256,
                             warmup_epochs=1.0)
    res = module.train_heads(module.Features(train.x, train.y), cfg, num_classes=classes,
                             device=device)
    return 1000 * float(np.median(res.epoch_seconds[1:])), res


def head_at(rev: str):
    """pipeline/head.py as it was at git revision `rev`, imported as a module of its own."""
    import importlib.util
    import subprocess

    text = subprocess.run(["git", "show", f"{rev}:pipeline/head.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "head_baseline.py"
    path.write_text(text.replace("from .errors import", "from pipeline.errors import"))
    spec = importlib.util.spec_from_file_location("head_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["head_baseline"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sklearn", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--baseline", metavar="GITREV",
                    help="also time pipeline/head.py of this git revision, interleaved with "
                    "the current one in the same run (e.g. --baseline HEAD~1)")
    ap.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True,
                    help="also time train_head.py end to end on a real Zarr store")
    args = ap.parse_args()
    dev = torch.device(args.device)
    n_val = max(args.n // 20, 1000)
    x, y = make_features(args.n + n_val, args.dim, args.classes, device=args.device)
    xt, yt, xv, yv = x[:args.n], y[:args.n], x[args.n:], y[args.n:]
    train = H.Features(xt, yt)
    val = H.Features(xv, yv)

    one_ms, one = time_epochs(train, [0.1], args.classes, dev, args.epochs)
    lrs = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
    grid_ms, grid = time_epochs(train, lrs, args.classes, dev, args.epochs)
    acc_one = H.evaluate(val, one.weight.to(dev), one.bias.to(dev), device=dev)[0]["top1"]
    acc_grid = max(m["top1"] for m in H.evaluate(val, grid.weight.to(dev), grid.bias.to(dev),
                                                 device=dev))
    rows = []
    if args.baseline:
        base = head_at(args.baseline)
        pairs = {"one head": ([0.1], 0.0), "8-point LR grid": (lrs, 0.0),
                 "8-point LR grid, weight decay 1e-4": (lrs, 1e-4)}
        for what, (grid_lrs, wd) in pairs.items():
            ours, theirs = [], []
            for _ in range(3):  # interleaved, so that machine noise hits both alike
                theirs.append(time_epochs(train, grid_lrs, args.classes, dev, args.epochs,
                                          base, wd)[0])
                ours.append(time_epochs(train, grid_lrs, args.classes, dev, args.epochs,
                                        H, wd)[0])
            a, b = float(np.median(theirs)), float(np.median(ours))
            rows.append((f"{what}, ms/epoch: {args.baseline} -> now", f"{a:.1f} -> {b:.1f}",
                         f"now/baseline {b / a:.2f} (median of 3 interleaved runs)"))
    rows += [
        ("one head, ms/epoch", f"{one_ms:.1f}", f"val top-1 {acc_one:.2%} after "
         f"{args.epochs + 1} epochs"),
        ("8-point LR grid, ms/epoch", f"{grid_ms:.1f}", f"{grid_ms / one_ms:.2f}x one head; "
         f"best val top-1 {acc_grid:.2%}"),
    ]

    if args.e2e:
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "f.zarr"
            xs, ys = xt.cpu().numpy(), yt.cpu().numpy().astype(np.int32)
            xvs, yvs = xv.cpu().numpy(), yv.cpu().numpy().astype(np.int32)
            specs = [S.SplitSpec("train", [""] * len(ys), ys), S.SplitSpec("val", [""] * len(yvs),
                                                                          yvs)]
            g = S.create_store(store, classes=[str(i) for i in range(args.classes)],
                               splits=specs, feature_dim=args.dim, dtype="float16",
                               chunk_rows=8192, fingerprint={"backbone_sha256": "0" * 64,
                                                             "arch": "synthetic", "head": "fc",
                                                             "feature_dim": args.dim},
                               record={})
            for split, xx in (("train", xs), ("val", xvs)):
                for c in range(-(-len(xx) // 8192)):
                    part = xx[c * 8192:(c + 1) * 8192]
                    S.write_chunk(g, split, c, part, np.ones(len(part), bool), [""] * len(part))
            import train_head

            start = time.perf_counter()
            rc = train_head.main(["--features", str(store), "--out", str(Path(tmp) / "h.pt"),
                                  "--device", args.device, "--epochs", "5",
                                  "--lr", "0.01,0.03,0.1,0.3", "--weight-decay", "0"])
            e2e = time.perf_counter() - start
            assert rc == 0
            h = torch.load(Path(tmp) / "h.pt", weights_only=True)
            rows.append(("train_head.py end to end (5 epochs, 4 LRs)", f"{e2e * 1000:.0f}",
                         f"val top-1 {h['metrics']['val_top1']:.2%}; incl. store read, "
                         "holdout eval, outputs"))

    if args.sklearn:
        from sklearn.linear_model import LogisticRegression

        start = time.perf_counter()
        clf = LogisticRegression(max_iter=200).fit(xt.cpu().float().numpy(), yt.cpu().numpy())
        sk = time.perf_counter() - start
        acc = clf.score(xv.cpu().float().numpy(), yv.cpu().numpy())
        rows.append(("scikit-learn LogisticRegression (lbfgs, max_iter=200)",
                     f"{sk * 1000:.0f}", f"val top-1 {acc:.2%}"))

    print(f"# stage 2 benchmark: N={args.n} D={args.dim} C={args.classes} float16, "
          f"device {dev}")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    print(f"# machine: {name or platform.machine()}, {torch.get_num_threads()} torch threads; "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"| {'what':55} | {'ms':>9} | notes |")
    print(f"|{'-' * 57}|{'-' * 11}|-------|")
    for what, ms, note in rows:
        print(f"| {what:55} | {ms:>9} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
