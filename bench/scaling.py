#!/usr/bin/env python3
"""Scale-out benchmarks: stage 1 on N torchrun ranks against one process, and stage 2 out of core
against in memory (peak RSS and ms/epoch).

    python bench/scaling.py stage1 --images 600 --ranks 2 --reps 3
    python bench/scaling.py stage2 --rows 160000 --buffers 64,256 --epochs 2

stage1: one process with T threads against `torchrun --nproc-per-node N` with T/N threads each,
on the same ImageNet-like JPEGs (bench/photos.py), the runs interleaved; the wall time of each
whole command (launch, model load and scan included) and the extraction time of its summary line.

stage2: a store of `rows` x 2048 float16 train features (synthetic, learnable, rows permuted as
stage 1 keeps them), read by train_head.py in memory and out of core with each buffer, under
/usr/bin/time -v (peak RSS), after the store has been read once (page cache warm); a tiny
store gives the process's fixed RSS (Python, torch, zarr). Prints a table; --json writes the
results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import store as S  # noqa: E402
from pipeline.provenance import package_versions  # noqa: E402


def run(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return wall, out.stderr


# --- stage 1 -----------------------------------------------------------------------------------


def stage1(args) -> dict:
    from bench.photos import make_photo_tree
    from bench.suite import checkpoint_for

    work = Path(args.work)
    data = work / f"photos-{args.images}"
    if not data.is_dir():
        make_photo_tree(data, args.images, classes=4)
    ckpt = checkpoint_for(args.model, work)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    common = ["--checkpoint", str(ckpt), "--data-root", str(data), "--splits", "train",
              "--batch-size", str(args.batch), "--decoder", args.decoder, "--device", "cpu",
              "--chunk-rows", str(args.chunk_rows)]
    script = str(ROOT / "extract_features.py")
    one = [sys.executable, script, *common, "--num-threads", str(args.threads)]
    many = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(args.ranks), script, *common, "--num-threads", str(args.threads // args.ranks)]
    rows = {"one": [], "ranks": []}
    for rep in range(args.reps + 1):  # the first round warms the page cache and the imports
        for name, cmd in (("one", one), ("ranks", many)):
            store = work / f"s1-{name}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            wall, err = run([*cmd, "--out", str(store)], env)
            m = re.search(r"extract: (\d+) images.*?, ([\d.]+) s, ([\d.]+) img/s", err)
            if rep:
                rows[name].append({"wall_s": wall, "extract_s": float(m.group(2)),
                                   "img_s": float(m.group(3))})
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("wall_s", "extract_s", "img_s")}
           for k, v in rows.items()}
    return {"images": int(m.group(1)), "model": args.model, "decoder": args.decoder,
            "chunk_rows": args.chunk_rows, "batch": args.batch,
            "threads_total": args.threads, "ranks": args.ranks, "runs": rows, "median": med,
            "wall_ratio_ranks_over_one": med["ranks"]["wall_s"] / med["one"]["wall_s"],
            "extract_ratio_ranks_over_one": med["ranks"]["extract_s"] / med["one"]["extract_s"]}


# --- stage 2 -----------------------------------------------------------------------------------


def make_store(path: Path, rows: int, dim: int, classes: int, chunk_rows: int = 1024) -> Path:
    """Learnable float16 features (ReLU of class centres plus noise), rows in random order."""
    if S.is_store(path):
        return path
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, size=(classes, dim)).astype(np.float32)
    n = {"train": rows, "val": max(rows // 20, classes)}
    labels = {s: rng.integers(0, classes, size=k).astype(np.int32) for s, k in n.items()}
    specs = [S.SplitSpec(s, [f"{s}/{i}.jpg" for i in range(k)], labels[s]) for s, k in n.items()]
    comps = {"backbone_sha256": "0" * 64, "arch": "resnet50", "head": "fc",
             "feature_dim": dim, "row_order": "permuted-v1"}
    group = S.create_store(path, classes=[f"c{i}" for i in range(classes)], splits=specs,
                           feature_dim=dim, dtype="float16", chunk_rows=chunk_rows,
                           fingerprint=comps, record={})
    for s, k in n.items():
        for c in range(-(-k // chunk_rows)):
            lo, hi = c * chunk_rows, min((c + 1) * chunk_rows, k)
            y = labels[s][lo:hi]
            x = np.maximum(centres[y] + rng.normal(0, 12.0, size=(hi - lo, dim)), 0)
            S.write_chunk(group, s, c, x.astype(np.float16), np.ones(hi - lo, bool),
                          [""] * (hi - lo))
    return path


def measured(cmd: list[str], env: dict) -> dict:
    wall, err = run(["/usr/bin/time", "-v", *cmd], env)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
    m = re.search(r"val top-1 ([\d.]+)%.*?\(([\d.]+) ms/epoch", err)
    return {"wall_s": wall, "peak_rss_mb": rss_kb / 1024, "val_top1": float(m.group(1)) / 100,
            "ms_per_epoch": float(m.group(2))}


def stage2(args) -> dict:
    work = Path(args.work)
    store = make_store(work / f"ooc-{args.rows}x{args.dim}x{args.classes}.zarr", args.rows,
                       args.dim, args.classes)
    tiny = make_store(work / f"ooc-tiny-{args.classes}.zarr", 2048, args.dim, args.classes)
    size = sum(f.stat().st_size for f in (store / "train" / "features").rglob("*") if f.is_file())
    for f in store.rglob("*"):  # into the page cache
        if f.is_file():
            f.read_bytes()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    script = str(ROOT / "train_head.py")
    common = ["--epochs", str(args.epochs), "--lr", args.lr, "--weight-decay", args.wd,
              "--device", "cpu"]
    out = work / "ooc-head.pt"
    result = {"rows": args.rows, "dim": args.dim, "classes": args.classes,
              "train_features_mb": size / 2**20, "epochs": args.epochs, "lr": args.lr,
              "weight_decay": args.wd, "runs": {}}
    plans = [("fixed (tiny store, in memory)", tiny, ["--no-stream-from-store"])]
    for _ in range(args.reps):
        plans.append(("in memory", store, ["--no-stream-from-store"]))
        plans += [(f"out of core, buffer {b} MB", store,
                   ["--stream-from-store", "--stream-buffer", str(b)])
                  for b in args.buffers.split(",")]
    for name, path, extra in plans:
        rec = measured([sys.executable, script, "--features", str(path), "--out", str(out),
                        *common, *extra], env)
        result["runs"].setdefault(name, []).append(rec)
    result["median"] = {k: {f: statistics.median(r[f] for r in v) for f in v[0]}
                        for k, v in result["runs"].items()}
    base = result["median"]["in memory"]["ms_per_epoch"]
    for v in result["median"].values():
        v["epoch_ratio_to_in_memory"] = v["ms_per_epoch"] / base
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p1 = sub.add_parser("stage1")
    p1.add_argument("--images", type=int, default=600)
    p1.add_argument("--model", default="resnet18")
    p1.add_argument("--decoder", default="dali", choices=("dali", "pil"))
    p1.add_argument("--batch", type=int, default=32)
    p1.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p1.add_argument("--ranks", type=int, default=2)
    p1.add_argument("--reps", type=int, default=3)
    p1.add_argument("--chunk-rows", type=int, default=64,
                    help="the unit the ranks share: many chunks per rank balance the work")
    p2 = sub.add_parser("stage2")
    p2.add_argument("--rows", type=int, default=160000)
    p2.add_argument("--dim", type=int, default=2048)
    p2.add_argument("--classes", type=int, default=10)
    p2.add_argument("--buffers", default="64,256")
    p2.add_argument("--epochs", type=int, default=2)
    p2.add_argument("--lr", default="0.03,0.1,0.3,1")
    p2.add_argument("--wd", default="0,0.0001")
    p2.add_argument("--reps", type=int, default=1)
    for p in (p1, p2):
        p.add_argument("--work", default="/tmp/quickfix-scaling")
        p.add_argument("--json", type=Path)
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    result = stage1(args) if args.what == "stage1" else stage2(args)
    result["machine"] = {"cpu_cores": os.cpu_count(), "platform": platform.platform(),
                         "versions": package_versions(), "command": " ".join(sys.argv)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    for name, med in result["median"].items():
        print(f"{name:32s} " + "  ".join(f"{k} {v:.3f}" for k, v in med.items()))
    for k in ("wall_ratio_ranks_over_one", "extract_ratio_ranks_over_one"):
        if k in result:
            print(f"{k}: {result[k]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
