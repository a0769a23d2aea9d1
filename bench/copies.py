#!/usr/bin/env python3
"""Every copy gets its own head: a checkpoint with an EMA copy whose backbone differs.

    python bench/copies.py --out /work/copies-bench [--epochs 6 --ema-decay 0.98 0.99 0.995]
                           [--json bench/results/copies-cpu-DATE.json]

The case (every step is skipped when its output exists):

1. Images: scikit-learn's digits as the demo writes them (1,797 real scans, 32x32 JPEGs).
2. A torchvision ResNet-18 trained on them the way torchvision's references train with
   `--model-ema`: the classes in the folder-name order (the bug), and an exponential moving
   average of the weights and buffers (`torch.optim.swa_utils.AveragedModel` with
   `get_ema_multi_avg_fn(DECAY)`, `use_buffers=True`), updated every step: one case for each
   DECAY of `--ema-decay` (the higher, the further the EMA copy's backbone lags the model's).
   Saved as the references do: `model` and `model_ema` (the AveragedModel's state dict:
   `module.*` and `n_averaged`).

Then, side by side:
- `quickfix-labels --train` (the full pipeline): stages 1 and 2 on each copy, each copy's own
  head written into it;
- `quickfix-labels --train --head-for-every-copy`: the model's head written into both copies
  (what stage 3 did before).

For each fixed checkpoint, each copy's val top-1 is evaluated here, independently of the
project's code: the copy's weights loaded into a torchvision ResNet-18, the val images read with
torchvision's ImageFolder and transforms, against the correct labels.
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
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.demo import NAMES, SIZE, _is_good_image, make_images  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def transform():
    from torchvision import transforms

    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return transforms.Compose([transforms.Grayscale(3), transforms.ToTensor(), norm])


def train_with_ema(data: Path, out: Path, epochs: int, decay: float, seed: int = 0) -> None:
    """The bug (ImageFolder's name-sorted labels) with an EMA copy, as the references save it."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from torchvision import datasets

    torch.manual_seed(seed)
    train = datasets.ImageFolder(data / "train", transform(), is_valid_file=_is_good_image)
    model = torchvision.models.resnet18(num_classes=10)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    steps = epochs * -(-len(train) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            ema.update_parameters(model)
        log(f"  epoch {epoch + 1}/{epochs}")
    args = argparse.Namespace(model="resnet18", arch="resnet18", lr=0.05, epochs=epochs,
                              batch_size=64, val_resize_size=SIZE, val_crop_size=SIZE,
                              interpolation="bilinear", data_path=str(data), model_ema=True,
                              model_ema_decay=decay)
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "epoch": epochs - 1, "args": args,
                "class_to_idx": train.class_to_idx}, out)


def val_top1(ckpt: Path, key: str, data: Path) -> float:
    """One copy of the fixed checkpoint, end to end on the val images, correct labels."""
    from torchvision import datasets

    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    sd = {k.removeprefix("module."): v for k, v in raw[key].items() if k != "n_averaged"}
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(sd)
    model.eval()
    val = datasets.ImageFolder(data / "val", transform())
    correct = {name: i for i, name in enumerate(NAMES)}  # the digits' own order
    remap = {val.class_to_idx[name]: i for name, i in correct.items()}
    right = total = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(val, batch_size=256):
            want = torch.as_tensor([remap[int(t)] for t in y])
            right += int((model(x).argmax(1) == want).sum())
            total += len(y)
    return right / total


def backbone_gap(ckpt: Path) -> float:
    """How far the EMA copy's backbone is from the model's: relative L2 over every float
    tensor but the head."""
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    num = den = 0.0
    for k, v in raw["model"].items():
        if k.startswith("fc.") or not v.is_floating_point():
            continue
        e = raw["model_ema"][f"module.{k}"]
        num += float(((v - e) ** 2).sum())
        den += float((v ** 2).sum())
    return (num / den) ** 0.5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--ema-decay", type=float, nargs="+", default=[0.98, 0.99, 0.995])
    ap.add_argument("--fix-epochs", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    if not (data / "train").is_dir():
        make_images(data)
    order = args.out / "class_order.txt"
    order.write_text("\n".join(NAMES) + "\n")
    cases = []
    for decay in args.ema_decay:
        case = run_case(args, data, order, decay)
        if case is None:
            return 1
        cases.append(case)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    result = {
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "torchvision": torchvision.__version__},
        "cases": cases,
    }
    log(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def run_case(args, data: Path, order: Path, decay: float) -> dict | None:
    """One EMA decay: the checkpoint, then both fixes, each copy evaluated."""
    case_dir = args.out / f"ema-{decay}"
    ckpt = case_dir / "run" / "checkpoint_best.pth"
    if not ckpt.is_file():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        log(f"training a ResNet-18 with an EMA copy (decay {decay}) -> {ckpt}")
        train_with_ema(data, ckpt, args.epochs, decay)
    cmd = str(Path(sys.executable).parent / "quickfix-labels")
    runs = {}
    for name, extra in (("own heads", []), ("one head", ["--head-for-every-copy"])):
        folder = case_dir / name.replace(" ", "-")
        argv = [cmd, "--resume", str(ckpt), "--data-root", str(data), "--class-order",
                str(order), "--checkpoint-dir", str(folder), "--train", "--decoder", "pil",
                "--fix-epochs", str(args.fix_epochs), "--no-verify-data", *extra]
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        wall = time.perf_counter() - start
        (folder / "run.log").write_text(proc.stderr)
        if proc.returncode != 0:
            log(proc.stderr)
            return None
        fixed = folder / "checkpoint_best.pth"
        runs[name] = {"command": " ".join(argv[1:]), "wall_s": round(wall, 1),
                      "model_top1": val_top1(fixed, "model", data),
                      "ema_top1": val_top1(fixed, "model_ema", data)}
        log(f"decay {decay}, {name}: {runs[name]}")
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    return {"ema_decay": decay, "epochs": args.epochs,
            "steps": int(raw["model_ema"]["n_averaged"]),
            "ema_backbone_relative_l2": backbone_gap(ckpt), "runs": runs,
            "ema_gain": runs["own heads"]["ema_top1"] - runs["one head"]["ema_top1"]}


if __name__ == "__main__":
    sys.exit(main())
