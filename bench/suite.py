#!/usr/bin/env python3
"""The whole benchmark in one run: stage 1 against a reference DALI pipeline, our fix against the
old remedy.

    python bench/suite.py                       # CPU: input path + ResNet-50 on small trees
    python bench/suite.py --device cuda         # GPU: 20,000 images, full-scale stage 2

On the same generated ImageNet-like JPEGs (natural-photo crops, ~500x375, quality 90), measures:
  a. the reference: DALI's own reader + decoder + resize + crop, pipelined, tuned over a few
     thread counts and prefetch depths (bench/reference.py; `mixed` decoder on CUDA)
  b. model-only ceiling: the backbone forward on pre-made tensors (bf16 + channels_last on CUDA)
  c. stage 1 end to end (extract_features: read, check, decode, model, Zarr write) against (a)
     on the same files, alternating runs so that load on a shared machine hits both alike, for
     each --models entry: `pool` (bench/models.py, costs nothing: the input path alone) and real
     backbones; with where stage 1's time went
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
from bench.reference import reference_rate, tune  # noqa: E402
from bench.stage2 import make_features, time_epochs  # noqa: E402
from pipeline import head as H  # noqa: E402
from pipeline.cli import setup_logging  # noqa: E402
from pipeline.extract import run_extract  # noqa: E402
from pipeline.models import Preprocess, split_backbone  # noqa: E402
from pipeline.provenance import package_versions  # noqa: E402
from pipeline.settings import ExtractSettings  # noqa: E402
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


def subset_tree(data: Path, out: Path, n: int) -> Path:
    """out/train/<class>/<file>: symlinks to the first n train images of `data` by file name
    (the generator numbers images across classes, so every class is in)."""
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    for f in sorted((data / "train").rglob("*.JPEG"), key=lambda p: p.name)[:n]:
        link = tmp / "train" / f.parent.name / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f)
    tmp.rename(out)
    return out


def checkpoint_for(model_name: str, work: Path) -> Path:
    path = work / f"{model_name}.pth"
    if model_name == "pool":
        from bench.models import pool

        torch.save({"state_dict": pool(10).state_dict(), "arch": "bench.models:pool"}, path)
    else:
        torch.save(training_checkpoint(make_model(model_name, num_classes=10), model_name), path)
    return path


def stage1_rate(ckpt: Path, data: Path, store: Path, dev: torch.device, batch: int,
                threads: int) -> tuple[float, dict]:
    """(img/s, where the time went) for one fresh stage 1 run over data/train."""
    import shutil

    shutil.rmtree(store, ignore_errors=True)
    summary = run_extract(ExtractSettings(
        checkpoint=ckpt, data_root=data, out=store, splits=["train"], resize=PRE.resize,
        crop=PRE.crop, batch_size=batch, device=dev.type, decoder="dali", num_threads=threads,
        overwrite=True))
    profile = dict(summary.profile, seconds=summary.seconds)
    return summary.images / summary.seconds, profile


def stage1_vs_reference(model_name: str, data: Path, work: Path, dev: torch.device, batch: int,
                        threads: int, ref_settings: dict, reps: int) -> dict:
    """Alternate reference and stage 1 runs on the same files; the ratio of their medians."""
    import statistics

    ckpt = checkpoint_for(model_name, work)
    files = sorted((data / "train").rglob("*.JPEG"))
    store = work / f"stage1-{model_name}.zarr"
    stage1_rate(ckpt, data, store, dev, batch, threads)  # warm-up: imports, caches, cudnn
    pairs = []
    for _ in range(reps):
        ref = reference_rate(files, gpu=dev.type == "cuda", batch=batch, **ref_settings)
        ours, profile = stage1_rate(ckpt, data, store, dev, batch, threads)
        pairs.append((ref, ours))
    ref_med = statistics.median(r for r, _ in pairs)
    ours_med = statistics.median(o for _, o in pairs)
    return {"images": len(files), "reference_img_s": ref_med, "stage1_img_s": ours_med,
            "ratio": ours_med / ref_med, "pair_ratios": [o / r for r, o in pairs],
            "pairs": pairs, "profile_last_run": profile}


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
    ap.add_argument("--images", type=int, help="images generated (4/5 go to train); default: "
                    "20000 on CUDA, 2500 on the CPU")
    ap.add_argument("--model-images", type=int, help="train images for the runs with a real "
                    "backbone (c with --models other than pool, d, e); default: all on CUDA, 240 "
                    "on the CPU")
    ap.add_argument("--models", default="pool,resnet50",
                    help="stage 1 against the reference with each: pool (the input path alone) "
                    "and/or torchvision architectures")
    ap.add_argument("--arch", help="backbone of b, d, e; default: resnet50 on CUDA, resnet18 on "
                    "the CPU")
    ap.add_argument("--batch-size", type=int, help="default: 256 on CUDA, 64 on the CPU")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3, help="alternating reference/stage 1 pairs")
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
    n_images = args.images or (20000 if gpu else 2500)
    arch = args.arch or ("resnet50" if gpu else "resnet18")
    batch = args.batch_size or (256 if gpu else 64)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True
    args.work.mkdir(parents=True, exist_ok=True)

    data = args.work / f"data-{n_images}"
    if not data.is_dir():
        t0 = time.perf_counter()
        make_photo_tree(data, n_images, classes=10)
        print(f"generated {n_images} JPEGs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    n_train = len(list((data / "train").rglob("*.JPEG")))
    n_model = min(args.model_images or (n_train if gpu else 240), n_train)
    small = data if n_model == n_train else subset_tree(data, args.work / f"data-{n_images}-"
                                                        f"first{n_model}", n_model)
    rows: dict[str, dict] = {}

    # a. the reference, tuned on the whole train tree; c. stage 1 against it
    rows["a_reference"] = tune(sorted((data / "train").rglob("*.JPEG")), gpu=gpu, batch=batch,
                               cores=args.threads)
    ref_settings = rows["a_reference"]["settings"]
    for name in models:
        tree = data if name == "pool" else small
        rows[f"c_stage1_{name}"] = stage1_vs_reference(name, tree, args.work, dev, batch,
                                                       args.threads, ref_settings, args.reps)

    model = make_model(arch, num_classes=10)
    ckpt = checkpoint_for(arch, args.work)
    backbone, heads, _ = split_backbone(model)
    head_name = heads.head
    backbone.eval().to(dev)
    if gpu:
        backbone.to(memory_format=torch.channels_last)
    rows["b_model_ceiling"] = {"arch": arch, "img_s": model_ceiling(backbone, dev, batch,
                                                                    iters=30 if gpu else 3)}
    rows["d_dataloader_pil"] = {"img_s": dataloader_path(small / "train", backbone, dev, batch,
                                                         args.threads)}

    store = args.work / "fix.zarr"
    t0 = time.perf_counter()
    img_s, _ = stage1_rate(ckpt, small, store, dev, batch, args.threads)  # a fresh store
    stage1_wall = time.perf_counter() - t0
    rows["c_stage1_fix"] = {"arch": arch, "img_s": img_s, "wall_s": stage1_wall}

    import train_head

    t0 = time.perf_counter()
    rc = train_head.main(["--features", str(store), "--out", str(args.work / "head.pt"),
                          "--device", dev.type, "--epochs", str(args.epochs), "--lr", "0.1",
                          "--weight-decay", "0", "--holdout-fraction", "0"])
    assert rc == 0
    stage2_wall = time.perf_counter() - t0
    remedy = old_remedy(small / "train", model, head_name, dev, batch, args.threads, args.epochs)
    ours = stage1_wall + stage2_wall
    rows["e_fix"] = {"arch": arch, "images": n_model, "old_remedy_s": remedy, "ours_s": ours,
                     "stage1_s": stage1_wall, "stage2_s": stage2_wall, "speedup": remedy / ours}

    n, d, c = (int(v) for v in (args.stage2_size or (
        "1281167,2048,1000" if gpu else "20000,512,100")).split(","))
    x, y = make_features(n, d, c, device=dev.type)
    feats = H.Features(x, y)
    one_ms, _ = time_epochs(feats, [0.1], c, dev, 3)
    grid_ms, _ = time_epochs(feats, [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0], c, dev, 3)
    rows["f_stage2"] = {"n": n, "dim": d, "classes": c, "one_head_ms_epoch": one_ms,
                        "grid8_ms_epoch": grid_ms, "grid_over_one": grid_ms / one_ms}
    del x, y, feats

    ratios = {f"stage1_{m}_over_reference": rows[f"c_stage1_{m}"]["ratio"] for m in models}
    if arch in models:
        ratios[f"model_ceiling_over_stage1_{arch}"] = (rows["b_model_ceiling"]["img_s"]
                                                       / rows[f"c_stage1_{arch}"]["stage1_img_s"])
    ratios["stage1_over_dataloader"] = (rows["c_stage1_fix"]["img_s"]
                                        / rows["d_dataloader_pil"]["img_s"])
    result = {"device": str(dev), "arch": arch, "images_train": n_train, "model_images": n_model,
              "batch": batch, "threads": args.threads, "reps": args.reps, "models": models,
              "machine": machine(dev), "results": rows, "ratios": ratios}
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result, gpu)
    print(f"(JSON: {args.out})")
    return 0


def print_table(result: dict, gpu: bool) -> None:
    rows, arch = result["results"], result["arch"]
    ref = rows["a_reference"]["settings"]
    print(f"\n# {result['device']} {result['machine'].get('gpu', platform.processor() or 'cpu')},"
          f" {result['threads']} threads, batch {result['batch']}, {result['images_train']} train "
          f"images ({result['model_images']} with a real backbone), {result['reps']} pairs")
    print("| measurement | value |")
    print("|---|---:|")
    print(f"| a. reference DALI pipeline ({'mixed' if gpu else 'cpu'} decoder), tuned: "
          f"{', '.join(f'{k} {v}' for k, v in ref.items())} | "
          f"{max(t['img_s'] for t in rows['a_reference']['tuning']):.0f} img/s |")
    for m in result["models"]:
        c = rows[f"c_stage1_{m}"]
        prof = c["profile_last_run"]
        print(f"| c. stage 1, {m} ({c['images']} images): stage 1 / reference | "
              f"{c['stage1_img_s']:.0f} / {c['reference_img_s']:.0f} img/s = "
              f"**{c['ratio']:.2f}x** (pairs: "
              f"{', '.join(f'{r:.2f}' for r in c['pair_ratios'])}) |")
        print(f"| c. stage 1, {m}: where the time went (last run, {prof['seconds']:.2f} s) | "
              f"waiting for decoded batches {prof['wait_for_batches_s']:.2f} s, forward "
              f"{prof['forward_s']:.2f} s, writer thread busy {prof['writer_busy_s']:.2f} s "
              f"(overlapped) |")
    print(f"| b. model ceiling ({arch}{', bf16' if gpu else ', fp32'}) | "
          f"{rows['b_model_ceiling']['img_s']:.0f} img/s |")
    print(f"| c. stage 1 end to end, {arch} | {rows['c_stage1_fix']['img_s']:.0f} img/s |")
    print(f"| d. old path: DataLoader + PIL, same model | "
          f"{rows['d_dataloader_pil']['img_s']:.0f} img/s |")
    e = rows["e_fix"]
    print(f"| e. old remedy, {e['images']} images | {e['old_remedy_s']:.1f} s |")
    print(f"| e. our fix: stage 1 + stage 2 | {e['ours_s']:.1f} s "
          f"({e['stage1_s']:.1f} + {e['stage2_s']:.1f}) |")
    print(f"| e. speedup | {e['speedup']:.1f}x |")
    f = rows["f_stage2"]
    print(f"| f. stage 2, one head ({f['n']}x{f['dim']}, {f['classes']} classes) | "
          f"{f['one_head_ms_epoch']:.1f} ms/epoch |")
    print(f"| f. stage 2, 8-point grid | {f['grid8_ms_epoch']:.1f} ms/epoch "
          f"({f['grid_over_one']:.2f}x one head) |")
    for k, v in result["ratios"].items():
        print(f"| ratio {k} | {v:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
