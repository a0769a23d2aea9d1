"""The bundled demo: a real-image classifier trained with the wrong class order, then stage 1.

    python -m pipeline.demo --out demo-out

Nothing is downloaded. The images are scikit-learn's bundled handwritten digits (1,797 real
scans), written as an ImageFolder tree whose class folders are named `zero` ... `nine`, with a
few broken files mixed in. A torchvision ResNet-18 is trained on them the way a script built on
`ImageFolder` does it: classes sorted by folder *name* (eight, five, four, ...), not the
dataset's own order (zero, one, two, ...). That is the bug this project repairs.

The demo then runs stage 1 (`extract_features.py`) with the correct class order, and shows on
the cached features what the old head scores against the correct labels, and what a linear
head retrained on the same features reaches (the job of stage 2).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZE = 32  # digits are 8x8; upscaled so a stock ResNet-18 sees a reasonable image


def make_images(root: Path, seed: int = 0) -> None:
    """root/{train,val}/<name>/*.jpg from scikit-learn's digits, plus three broken files."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    n_val = len(order) // 5
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        folder = root / split / NAMES[digits.target[i]]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        img = Image.fromarray(pixels, mode="L").resize((SIZE, SIZE), Image.BICUBIC)
        img.save(folder / f"{i:04d}.jpg", quality=95)
    # what real crawls contain: an empty file, an HTML error page, a half-copied JPEG
    (root / "train" / "three" / "empty.jpg").write_bytes(b"")
    (root / "train" / "five" / "error_page.jpg").write_text("<html><body>403 Forbidden</body>")
    whole = (root / "train" / "seven").glob("*.jpg").__next__().read_bytes()
    (root / "train" / "seven" / "partial.jpg").write_bytes(whole[: len(whole) // 2])


def train_buggy_model(data: Path, out: Path, epochs: int, seed: int = 0) -> float:
    """Train like a typical script: ImageFolder labels (folder names sorted alphabetically)."""
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    tf = transforms.Compose([transforms.Grayscale(3), transforms.ToTensor(), norm])
    train = datasets.ImageFolder(data / "train", tf, is_valid_file=_is_good_image)
    val = datasets.ImageFolder(data / "val", tf)
    model = torchvision.models.resnet18(num_classes=10)
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
        print(f"  epoch {epoch + 1}/{epochs}", file=sys.stderr)
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(val, batch_size=256):
            correct += int((model(x).argmax(1) == y).sum())
    acc = correct / len(val)
    args = argparse.Namespace(model="resnet18", arch="resnet18", lr=0.05, epochs=epochs,
                              batch_size=64, val_resize_size=SIZE, val_crop_size=SIZE,
                              interpolation="bilinear", data_path=str(data))
    torch.save({
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "epoch": epochs - 1,
        "args": args,
        "best_acc1": np.float64(acc * 100),
        "class_to_idx": train.class_to_idx,  # the alphabetical (wrong) order
    }, out)
    return acc


def _is_good_image(path: str) -> bool:
    from .data import sniff

    return sniff(Path(path).read_bytes())[1] is None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    data, ckpt = args.out / "data", args.out / "checkpoint_best.pth"
    order_file = args.out / "class_order.txt"
    if not (data / "train").is_dir():
        print(f"writing demo images to {data}", file=sys.stderr)
        make_images(data)
    order_file.write_text("\n".join(NAMES) + "\n")
    if not ckpt.is_file():
        print(f"training a ResNet-18 with classes sorted by name -> {ckpt}", file=sys.stderr)
        start = time.perf_counter()
        acc = train_buggy_model(data, ckpt, args.epochs)
        print(f"  trained in {time.perf_counter() - start:.0f} s; val top-1 with its own "
              f"(wrong) labels: {acc:.1%}", file=sys.stderr)

    store = args.out / "features.zarr"
    script = Path(__file__).resolve().parent.parent / "extract_features.py"
    cmd = [sys.executable, str(script), "--checkpoint", str(ckpt), "--data-root", str(data),
           "--class-order", str(order_file), "--out", str(store)]
    print("$ " + " ".join(["python", "extract_features.py", *cmd[2:]]), file=sys.stderr)
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        return rc
    report(ckpt, store)
    return 0


def report(ckpt_path: Path, store_path: Path) -> None:
    """What the cached features show: the old head is wrong, a new linear head is right."""
    from sklearn.linear_model import LogisticRegression

    from .checkpoint import load_checkpoint
    from .store import open_store

    store = open_store(store_path)
    sets = {}
    for split in ("train", "val"):
        g = store[split]
        ok = g["ok"][:].astype(bool)
        sets[split] = (g["features"][:][ok].astype(np.float32), g["labels"][:][ok])
        print(f"{split}: {ok.sum()} images cached, {(~ok).sum()} quarantined", file=sys.stderr)
    sd = load_checkpoint(ckpt_path).state_dict
    w, b = sd["fc.weight"].numpy(), sd["fc.bias"].numpy()
    x_val, y_val = sets["val"]
    old = float(((x_val @ w.T + b).argmax(1) == y_val).mean())
    probe = LogisticRegression(max_iter=2000).fit(*sets["train"])
    new = float(probe.score(x_val, y_val))
    print(f"old head on the cached val features, correct labels: {old:.1%} top-1", file=sys.stderr)
    print(f"a linear head retrained on the cached features:      {new:.1%} top-1 "
          "(scikit-learn; stage 2 does this on the GPU)", file=sys.stderr)
    print(f"feature store: {store_path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
