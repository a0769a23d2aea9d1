"""Feature stores of real images, made the way a user makes them, to calibrate stage 2's grid.

    python bench/realfeatures.py --out /work/calib [--epochs N]

Builds, under OUT (every step is skipped when its output already exists):

1. Fashion-MNIST (70,000 real 28x28 clothing photos, 10 classes) from the Debian package
   `dataset-fashion-mnist` (the .deb in the apt cache; unpacked with `dpkg-deb -x`, no root),
   written as an ImageFolder tree OUT/fmnist/{train,val}/<class>/NNNNN.png (the dataset's own
   60k/10k split) with OUT/fmnist/class_order.txt listing the classes in the dataset's index
   order (t_shirt_top, trouser, ..., ankle_boot): the correct order.
2. Two torchvision ResNet-18 checkpoints trained on it the way an `ImageFolder` script does, i.e.
   with the classes sorted by folder name (the bug; 6 of 10 classes moved), saved in the
   torchvision-references layout of `pipeline/demo.py` (`model`, `args` with arch and
   val_resize_size/val_crop_size 32, `class_to_idx`, `best_acc1`):
   OUT/fmnist-r18/checkpoint_best.pth (`--epochs` epochs over the 60k train images) and
   OUT/fmnist-r18-weak/checkpoint_best.pth (`--weak-epochs` over a `--weak-subset` slice: a
   less converged backbone). Input 32x32 (bilinear upsample of 28x28, gray to 3 channels,
   ImageNet normalisation, as stage 1 does), random flips and +-3 px shifts, SGD momentum 0.9,
   weight decay 1e-4, OneCycle, batch 128, 2 torch threads.
3. Stage 1 with the CLI for each: OUT/fmnist-r18.zarr and OUT/fmnist-r18-weak.zarr
   (`extract_features.py --resize 32 --crop 32 --decoder dali --device cpu`).
4. The bundled demo (`python -m pipeline.demo --out OUT/demo`): scikit-learn digits, store
   OUT/demo/run/fixed/features.zarr from OUT/demo/run/checkpoint_best.pth.

Then it prints, for each store: its path, the checkpoint, the correct-order file, rows per
split, feature dim, and the checkpoint's val top-1 against the labels of its own (wrong)
training order (`best_acc1`, the accuracy the model really has).

Measured on this project's 2-core CPU machine (no GPU; torch 2.15 CPU with bf16 autocast,
DALI CPU), defaults, while another process (a pytest run) shared the two cores, so the training
times are up to ~2.5x what a quiet machine gives (a training step took 0.2 s quiet, 0.4-1 s
shared): unpack + 70k PNGs ~20 s; decoding them once for training 5 s; the ResNet-18, 5 epochs,
81-283 s/epoch, 983 s, val top-1 88.68%; the weak one (1 epoch on 6,000 images) 11 s, 64.80%;
stage 1 45 s and 48 s (70k images each, ~1,700 img/s); the demo 52 s. 18 min in all (plus the
demo).
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.demo import save_training_checkpoint  # noqa: E402

DEB = Path("/var/cache/apt/archives/dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb")
# the dataset's own index order (label 0 .. 9): the correct order
FMNIST_CLASSES = ("t_shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                  "sneaker", "bag", "ankle_boot")
SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST as an ImageFolder tree


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip): big-endian header of magic (dtype, ndim) and dims, then the data."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    assert raw[2] == 0x08, f"{path}: not uint8 data"
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def make_fmnist_tree(out: Path, deb: Path) -> Path:
    """out/fmnist/{train,val}/<class>/NNNNN.png and out/fmnist/class_order.txt."""
    from PIL import Image

    data = out / "fmnist"
    order_file = data / "class_order.txt"
    done = data / ".complete"
    if done.is_file():
        return order_file
    unpacked = out / "fmnist-deb"
    idx_dir = unpacked / "usr/share/datasets/fashion-mnist"
    if not idx_dir.is_dir():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = _read_idx(idx_dir / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(idx_dir / f"{prefix}-labels-idx1-ubyte.gz")
        assert len(images) == len(labels)
        for name in FMNIST_CLASSES:
            (data / split / name).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            path = data / split / FMNIST_CLASSES[label] / f"{i:05d}.png"
            Image.fromarray(img, mode="L").save(path)
        log(f"  {split}: {len(images)} images")
    order_file.write_text("\n".join(FMNIST_CLASSES) + "\n")
    done.write_text("ok\n")
    return order_file


# ---------------------------------------------------------------------------------------------
# Training with the wrong (alphabetical) order, like an ImageFolder script


def _load_split(folder: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """ImageFolder's samples and labels (folders sorted by name: the bug), decoded once with the
    eval transform stage 1 uses (bilinear resize to 32, to tensor, ImageNet normalisation).
    Gray images: one channel kept, expanded to three per batch (as RGB conversion would)."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Resize(SIZE, interpolation=transforms.InterpolationMode.BILINEAR,
                          antialias=True),
        transforms.CenterCrop(SIZE),
        transforms.PILToTensor(),
    ])
    ds = datasets.ImageFolder(folder, tf, loader=lambda p: _open_gray(p))
    loader = torch.utils.data.DataLoader(ds, batch_size=1000, num_workers=2)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    x = torch.cat(xs).float().div_(255)
    return x, torch.cat(ys), ds.class_to_idx


def _open_gray(path: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("L")


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def _augment(x: torch.Tensor, gen: torch.Generator, shift: int = 3) -> torch.Tensor:
    """Random horizontal flip and a random +-shift px translation (zero padding) per image."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = torch.nn.functional.pad(x, (shift,) * 4)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen).tolist()
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + SIZE, dx[i]:dx[i] + SIZE] for i in range(n)])


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for lo in range(0, len(x), 500):
            pred = model(_normalise(x[lo:lo + 500])).argmax(1)
            correct += int((pred == y[lo:lo + 500]).sum())
    return correct / len(x)


def train_model(train: tuple, val: tuple, out: Path, epochs: int, *, subset: int | None = None,
                seed: int = 0, data_path: Path | None = None, lr: float = 0.1,
                batch_size: int = 128, bf16: bool = True,
                time_limit: float | None = None) -> float:
    """Train a ResNet-18 on `train` (labels in ImageFolder's alphabetical order), save it in the
    torchvision-references layout of pipeline/demo.py, return val top-1 (same labels)."""
    x, y, class_to_idx = train
    xv, yv, val_class_to_idx = val
    assert class_to_idx == val_class_to_idx
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if subset is not None and subset < len(x):
        keep = torch.randperm(len(x), generator=gen)[:subset]
        x, y = x[keep], y[keep]
    model = torchvision.models.resnet18(num_classes=len(class_to_idx))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    per_epoch = -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        t0, total = time.perf_counter(), 0.0
        for step, lo in enumerate(range(0, len(x), batch_size)):
            idx = perm[lo:lo + batch_size]
            xb = _normalise(_augment(x[idx], gen))
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
            if time_limit is not None and time.perf_counter() - start > time_limit:
                log(f"  timing: {step + 1} steps of {batch_size} in "
                    f"{time.perf_counter() - t0:.1f} s")
                return (time.perf_counter() - t0) / (step + 1) * per_epoch
        log(f"  epoch {epoch + 1}/{epochs}: loss {total / per_epoch:.3f}, "
            f"{time.perf_counter() - t0:.0f} s")
    acc = evaluate(model, xv, yv)  # float32, as stage 1 runs it
    args = argparse.Namespace(model="resnet18", arch="resnet18", lr=lr, epochs=epochs,
                              batch_size=batch_size, momentum=0.9, weight_decay=1e-4,
                              lr_scheduler="onecycle", train_subset=subset or len(x), amp=bf16,
                              val_resize_size=SIZE, val_crop_size=SIZE,
                              interpolation="bilinear", data_path=str(data_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_training_checkpoint(out, model, opt, sched, epochs, args, acc, class_to_idx)
    return acc


# ---------------------------------------------------------------------------------------------
# Stage 1 and the report


def extract(ckpt: Path, data: Path, order_file: Path, store: Path, decoder: str) -> None:
    cmd = [sys.executable, str(ROOT / "extract_features.py"), "--checkpoint", str(ckpt),
           "--data-root", str(data), "--class-order", str(order_file), "--out", str(store),
           "--resize", str(SIZE), "--crop", str(SIZE), "--decoder", decoder, "--device", "cpu",
           "--num-threads", "2"]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)


def describe(store: Path, ckpt: Path, order_file: Path) -> str:
    import zarr

    root = zarr.open_group(str(store), mode="r")
    classes = list(root.attrs["classes"])
    lines = [f"store       {store}", f"checkpoint  {ckpt}", f"class order {order_file}"]
    for split in sorted(k for k, _ in root.groups()):
        g = root[split]
        ok = np.asarray(g["ok"][:])
        lines.append(f"  {split:5s} rows {g['features'].shape[0]:6d} "
                     f"(ok {int(ok.sum())}, quarantined {int((ok == 0).sum())}), "
                     f"feature dim {g['features'].shape[1]}, {g['features'].dtype}")
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    lines.append(f"  classes {len(classes)}; checkpoint val top-1 (its own wrong-order labels, "
                 f"best_acc1) {float(ck['best_acc1']):.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/work/calib"))
    parser.add_argument("--epochs", type=int, default=5,
                        help="epochs of the main Fashion-MNIST ResNet-18")
    parser.add_argument("--weak-epochs", type=int, default=1)
    parser.add_argument("--weak-subset", type=int, default=6000,
                        help="train images (random, seeded) for the weak checkpoint")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="train under CPU bf16 autocast (about 4x faster on CPUs with "
                        "AVX512-BF16; evaluation and stage 1 stay float32)")
    parser.add_argument("--deb", type=Path, default=DEB)
    parser.add_argument("--decoder", default="dali", choices=("auto", "dali", "pil"))
    parser.add_argument("--time-epoch", action="store_true",
                        help="only estimate the seconds per epoch on a slice, then stop")
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    order_file = make_fmnist_tree(out, args.deb)
    timings["fmnist images"] = time.perf_counter() - t
    data = out / "fmnist"
    runs = [(out / "fmnist-r18" / "checkpoint_best.pth", out / "fmnist-r18.zarr",
             args.epochs, None),
            (out / "fmnist-r18-weak" / "checkpoint_best.pth", out / "fmnist-r18-weak.zarr",
             args.weak_epochs, args.weak_subset)]
    if args.time_epoch or not all(ckpt.is_file() for ckpt, *_ in runs):
        t = time.perf_counter()
        train, val = _load_split(data / "train"), _load_split(data / "val")
        timings["decode for training"] = time.perf_counter() - t
        log(f"training order (ImageFolder, by name): {list(train[2])}")
        if args.time_epoch:
            est = train_model(train, val, out / "unused.pth", 1, bf16=args.bf16,
                              time_limit=60)
            log(f"estimated {est:.0f} s per epoch of {len(train[0])} images")
            return 0
        for ckpt, _, epochs, subset in runs:
            if ckpt.is_file():
                continue
            log(f"training ResNet-18, {epochs} epochs, subset {subset} -> {ckpt}")
            t = time.perf_counter()
            acc = train_model(train, val, ckpt, epochs, subset=subset, data_path=data,
                              bf16=args.bf16)
            timings[f"train {ckpt.parent.name}"] = time.perf_counter() - t
            log(f"  val top-1 (its own labels): {acc:.2%}")
        del train, val
    for ckpt, store, _, _ in runs:
        t = time.perf_counter()
        extract(ckpt, data, order_file, store, args.decoder)
        timings[f"stage 1 {store.name}"] = time.perf_counter() - t

    stores = [(store, ckpt, order_file) for ckpt, store, _, _ in runs]
    if not args.skip_demo:
        demo = out / "demo"
        demo_store = demo / "run" / "fixed" / "features.zarr"
        if not (demo_store / "zarr.json").is_file():
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pipeline.demo", "--out", str(demo)],
                           check=True, cwd=ROOT)
            timings["demo"] = time.perf_counter() - t
        stores.append((demo_store, demo / "run" / "checkpoint_best.pth",
                       demo / "class_order.txt"))

    print("\n".join(f"{k}: {v:.0f} s" for k, v in timings.items()))
    for store, ckpt, order in stores:
        print()
        print(describe(store, ckpt, order))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
