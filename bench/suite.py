#!/usr/bin/env python3
"""The whole benchmark in one run: stage 1 against its ceilings, our fix against the old remedy.

    python bench/suite.py                       # CPU, small (ResNet-18, 300 images)
    python bench/suite.py --device cuda         # GPU: ResNet-50, 20,000 images, full stage 2

On the same generated ImageNet-like JPEGs (natural-photo crops, ~500x375, quality 90), measures:
  a. decode-only ceiling: DALI decode + resize + crop (mixed on CUDA, CPU otherwise), bytes in RAM
  b. model-only ceiling: the backbone forward on pre-made tensors (bf16 + channels_last on CUDA)
  c. stage 1 end to end (extract_features: read, decode, model, Zarr write)
  d. the old training script's path: torchvision DataLoader + PIL decoding, same model
  e. the old remedy (5 epochs of FC-only training, backbone re-run every epoch) against our fix
     (stage 1 once + 5 epochs of stage 2), wall time and ratio
  f. stage 2 ms/epoch for one head and an 8-point LR grid (1.28 M x 2048 x 1000 on CUDA)
Prints a table and writes it, with the machine and versions, as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.photos import make_photo_tree  # noqa: E402
from bench.stage2 import make_features, time_epochs  # noqa: E402
from pipeline import data as D  # noqa: E402
from pipeline import head as H  # noqa: E402
from pipeline.cli import package_versions, setup_logging  # noqa: E402
from pipeline.extract import run_extract  # noqa: E402
from pipeline.models import Preprocess, split_backbone  # noqa: E402
from tests.conftest import make_model, training_checkpoint  # noqa: E402

PRE = Preprocess(256, 224)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def machine(dev: torch.device) -> dict:
    info = {"cpu_cores": os.cpu_count(), "platform": platform.platform(),
            "versions": package_versions()}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    return info


def decode_ceiling(files: list[Path], dev: torch.device, batch: int, threads: int) -> float:
    """(a) DALI decode + resize + crop from bytes already in RAM."""
    blobs = [f.read_bytes() for f in files]
    sizes = [D.image_size(b) for b in blobs]
    gpu = dev.type == "cuda"
    dali = D.DaliDecoder(PRE, device="mixed" if gpu else "cpu", max_batch=batch,
                         num_threads=threads, device_id=(dev.index or 0) if gpu else None)
    dali.decode(blobs[:batch], sizes[:batch])  # build + warm up
    sync(dev)
    start = time.perf_counter()
    for lo in range(0, len(blobs), batch):
        out, _ = dali.decode(blobs[lo:lo + batch], sizes[lo:lo + batch])
    sync(dev)
    return len(blobs) / (time.perf_counter() - start)


def model_ceiling(backbone, dev: torch.device, batch: int, iters: int) -> float:
    """(b) backbone forward on tensors already on the device."""
    x = torch.randn(batch, 3, PRE.crop, PRE.crop, device=dev)
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), ctx:
        backbone(x)
        sync(dev)
        start = time.perf_counter()
        for _ in range(iters):
            backbone(x)
        sync(dev)
    return batch * iters / (time.perf_counter() - start)


def dataloader_path(root: Path, backbone, dev: torch.device, batch: int, workers: int) -> float:
    """(d) what the old training script's validation does: ImageFolder + PIL + DataLoader."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(PRE.resize), transforms.CenterCrop(PRE.crop),
                             transforms.ToTensor(),
                             transforms.Normalize(PRE.mean, PRE.std)])
    ds = datasets.ImageFolder(root, tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers,
                                         pin_memory=dev.type == "cuda")
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    start = time.perf_counter()
    with torch.inference_mode(), ctx:
        for x, _ in loader:
            backbone(x.to(dev, non_blocking=True))
    sync(dev)
    return len(ds) / (time.perf_counter() - start)


def old_remedy(root: Path, model, head_name: str, dev: torch.device, batch: int, workers: int,
               epochs: int) -> float:
    """(e) freeze the backbone, train the FC layer, re-running the backbone on every epoch."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(PRE.crop),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(PRE.mean, PRE.std)])
    ds = datasets.ImageFolder(root, tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         pin_memory=dev.type == "cuda", drop_last=False)
    backbone, _, _ = split_backbone(model)
    backbone.eval().to(dev)
    fc = model.get_submodule(head_name).to(dev)
    opt = torch.optim.SGD(fc.parameters(), lr=0.01, momentum=0.9)
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with torch.no_grad(), ctx:
                feats = backbone(x)
            loss = torch.nn.functional.cross_entropy(fc(feats.float()), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    sync(dev)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--images", type=int, help="default: 20000 on CUDA, 300 on the CPU")
    ap.add_argument("--arch", help="default: resnet50 on CUDA, resnet18 on the CPU")
    ap.add_argument("--batch-size", type=int, help="default: 256 on CUDA, 32 on the CPU")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/quickfix-bench"))
    ap.add_argument("--out", type=Path, default=Path("bench-results.json"))
    ap.add_argument("--stage2-size", help="N,D,C (default: 1281167,2048,1000 on CUDA, "
                    "20000,512,100 on the CPU)")
    args = ap.parse_args()
    setup_logging()
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                       else "cpu" if args.device == "auto" else args.device)
    gpu = dev.type == "cuda"
    n_images = args.images or (20000 if gpu else 300)
    arch = args.arch or ("resnet50" if gpu else "resnet18")
    batch = args.batch_size or (256 if gpu else 32)
    torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True

    data = args.work / f"data-{n_images}"
    if not data.is_dir():
        t0 = time.perf_counter()
        make_photo_tree(data, n_images, classes=10)
        print(f"generated {n_images} JPEGs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    train_files = sorted((data / "train").rglob("*.JPEG"))
    n_train = len(train_files)
    model = make_model(arch, num_classes=10)
    ckpt = args.work / f"{arch}.pth"
    torch.save(training_checkpoint(model, arch), ckpt)
    backbone, head_name, _ = split_backbone(model)
    backbone.eval().to(dev)
    if gpu:
        backbone.to(memory_format=torch.channels_last)
    rows: dict[str, dict] = {}

    rows["a_decode_ceiling"] = {"img_s": decode_ceiling(train_files, dev, batch, args.threads)}
    rows["b_model_ceiling"] = {"img_s": model_ceiling(backbone, dev, batch,
                                                      iters=30 if gpu else 4)}
    store = args.work / "bench.zarr"
    t0 = time.perf_counter()
    summary = run_extract(checkpoint=ckpt, data_root=data, out=store, splits=["train"],
                          resize=PRE.resize, crop=PRE.crop, batch_size=batch,
                          device=dev.type, decoder="dali", num_threads=args.threads,
                          overwrite=True)
    stage1_wall = time.perf_counter() - t0
    if summary.no_op:  # a store from an earlier run: time a fresh one
        import shutil

        shutil.rmtree(store)
        t0 = time.perf_counter()
        summary = run_extract(checkpoint=ckpt, data_root=data, out=store, splits=["train"],
                              resize=PRE.resize, crop=PRE.crop, batch_size=batch,
                              device=dev.type, decoder="dali", num_threads=args.threads)
        stage1_wall = time.perf_counter() - t0
    rows["c_stage1"] = {"img_s": summary.images / summary.seconds, "wall_s": stage1_wall}
    rows["d_dataloader_pil"] = {"img_s": dataloader_path(data / "train", backbone, dev, batch,
                                                         args.threads)}

    import train_head

    t0 = time.perf_counter()
    rc = train_head.main(["--features", str(store), "--out", str(args.work / "head.pt"),
                          "--device", dev.type, "--epochs", str(args.epochs), "--lr", "0.1",
                          "--weight-decay", "0", "--holdout-fraction", "0"])
    assert rc == 0
    stage2_wall = time.perf_counter() - t0
    remedy = old_remedy(data / "train", model, head_name, dev, batch, args.threads, args.epochs)
    ours = stage1_wall + stage2_wall
    rows["e_fix"] = {"old_remedy_s": remedy, "ours_s": ours, "stage1_s": stage1_wall,
                     "stage2_s": stage2_wall, "speedup": remedy / ours}

    n, d, c = (int(v) for v in (args.stage2_size or (
        "1281167,2048,1000" if gpu else "20000,512,100")).split(","))
    x, y = make_features(n, d, c, device=dev.type)
    feats = H.Features(x, y)
    one_ms, _ = time_epochs(feats, [0.1], c, dev, 3)
    grid_ms, _ = time_epochs(feats, [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0], c, dev, 3)
    rows["f_stage2"] = {"n": n, "dim": d, "classes": c, "one_head_ms_epoch": one_ms,
                        "grid8_ms_epoch": grid_ms, "grid_over_one": grid_ms / one_ms}
    del x, y, feats

    s1 = rows["c_stage1"]["img_s"]
    result = {"device": str(dev), "arch": arch, "images_train": n_train, "batch": batch,
              "threads": args.threads, "machine": machine(dev), "results": rows,
              "ratios": {"stage1_over_decode_ceiling": s1 / rows["a_decode_ceiling"]["img_s"],
                         "model_ceiling_over_stage1": rows["b_model_ceiling"]["img_s"] / s1,
                         "stage1_over_dataloader": s1 / rows["d_dataloader_pil"]["img_s"]}}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n# {dev} {result['machine'].get('gpu', platform.processor() or 'cpu')}, "
          f"{args.threads} threads, {arch}, {n_train} train images, batch {batch}")
    print("| measurement | value |")
    print("|---|---:|")
    print(f"| a. decode ceiling (DALI {'mixed' if gpu else 'cpu'}) | "
          f"{rows['a_decode_ceiling']['img_s']:.0f} img/s |")
    print(f"| b. model ceiling ({arch}{', bf16' if gpu else ', fp32'}) | "
          f"{rows['b_model_ceiling']['img_s']:.0f} img/s |")
    print(f"| c. stage 1 end to end | {s1:.0f} img/s |")
    print(f"| d. old path: DataLoader + PIL, same model | "
          f"{rows['d_dataloader_pil']['img_s']:.0f} img/s |")
    print(f"| e. old remedy, {args.epochs} epochs | {remedy:.1f} s |")
    print(f"| e. our fix: stage 1 + {args.epochs} epochs of stage 2 | {ours:.1f} s "
          f"({stage1_wall:.1f} + {stage2_wall:.1f}) |")
    print(f"| e. speedup | {remedy / ours:.1f}x |")
    print(f"| f. stage 2, one head ({n}x{d}, {c} classes) | {one_ms:.1f} ms/epoch |")
    print(f"| f. stage 2, 8-point grid | {grid_ms:.1f} ms/epoch "
          f"({grid_ms / one_ms:.2f}x one head) |")
    for k, v in result["ratios"].items():
        print(f"| ratio {k} | {v:.2f} |")
    print(f"(JSON: {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
