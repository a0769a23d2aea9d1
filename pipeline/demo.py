"""The bundled demo: a real-image classifier trained with the wrong class order, then stage 1.

    python -m pipeline.demo --out demo-out

Nothing is downloaded. The images are scikit-learn's bundled handwritten digits (1,797 real
scans), written as an ImageFolder tree whose class folders are named `zero` ... `nine`, with a
few broken files mixed in. A torchvision ResNet-18 is trained on them the way a script built on
`ImageFolder` does it: classes sorted by folder *name* (eight, five, four, ...), not the
dataset's own order (zero, one, two, ...). That is the bug this project repairs.

The demo then runs `quickfix-labels` with the correct class order (its triage finds the head a
permutation from a few images per class and fixes it without training), and prints val top-1
end to end on the val images before and after the fix, beside a reference model trained with
the correct order from the start, and where the fixed checkpoint is.
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


def train_model(data: Path, out: Path, epochs: int, *, correct_order: bool = False,
                seed: int = 0) -> float:
    """Train like a typical script: ImageFolder labels, i.e. folder names sorted alphabetically
    (the bug). With `correct_order`, labels follow the digits' own order (the reference)."""
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    tf = transforms.Compose([transforms.Grayscale(3), transforms.ToTensor(), norm])
    train = datasets.ImageFolder(data / "train", tf, is_valid_file=_is_good_image)
    val = datasets.ImageFolder(data / "val", tf)
    class_to_idx = train.class_to_idx
    if correct_order:
        class_to_idx = {name: i for i, name in enumerate(NAMES)}
        remap = {train.class_to_idx[name]: i for name, i in class_to_idx.items()}
        train.target_transform = val.target_transform = remap.__getitem__
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
    save_training_checkpoint(out, model, opt, sched, epochs, args, acc, class_to_idx)
    return acc


def save_training_checkpoint(out: Path, model, opt, sched, epochs: int, args, acc: float,
                             class_to_idx: dict) -> None:
    """What torchvision's reference train.py saves as checkpoint_best.pth (plus its class map)."""
    torch.save({
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "epoch": epochs - 1,
        "args": args,
        "best_acc1": np.float64(acc * 100),
        "class_to_idx": class_to_idx,
    }, out)


def _is_good_image(path: str) -> bool:
    from .data import sniff

    return sniff(Path(path).read_bytes())[1] is None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the demo's training")
    args = parser.parse_args(argv)
    data = args.out / "data"
    ckpt = args.out / "run" / "checkpoint_best.pth"
    reference = args.out / "reference" / "checkpoint_best.pth"
    order_file = args.out / "class_order.txt"
    if not (data / "train").is_dir():
        print(f"writing demo images to {data}", file=sys.stderr)
        make_images(data)
    order_file.write_text("\n".join(NAMES) + "\n")
    for path, correct, what in ((ckpt, False, "classes sorted by name (the bug)"),
                                (reference, True, "the correct class order (reference)")):
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            print(f"training a ResNet-18 with {what} -> {path}", file=sys.stderr)
            start = time.perf_counter()
            acc = train_model(data, path, args.epochs, correct_order=correct)
            print(f"  trained in {time.perf_counter() - start:.0f} s; val top-1 against its "
                  f"own labels: {acc:.1%}", file=sys.stderr)

    # What `quickfix-labels` (and `make fix`) runs, with its default places: fixed/ beside the
    # checkpoint, holding the fixed checkpoint under the input's name, the store and the head.
    fixed = ckpt.parent / "fixed"
    head, out = fixed / "head.pt", fixed / "checkpoint_best.pth"
    flags = ["--resume", str(ckpt), "--data-root", str(data), "--class-order", str(order_file),
             "--checkpoint-dir", str(fixed)]
    print(f"$ quickfix-labels {' '.join(flags)}", file=sys.stderr)
    rc = subprocess.run([sys.executable, "-m", "pipeline", *flags]).returncode
    if rc != 0:
        return rc
    report(data, ckpt, out, reference, head)
    return 0


def report(data: Path, buggy: Path, fixed: Path, reference: Path, head_path: Path) -> None:
    """Val top-1 end to end on the images (full model, torchvision path), correct labels."""
    from .files import resolve_device
    from .headfile import HeadRecord
    from .stitch import verify_on_images

    head = HeadRecord.load(head_path)
    device = resolve_device("auto")
    rows = [(f"buggy model ({buggy})", buggy), (f"fixed model ({fixed})", fixed),
            (f"reference, trained with the correct order ({reference})", reference)]
    print("\nval top-1, end to end on the val images, against the correct labels:",
          file=sys.stderr)
    for name, path in rows:
        result = verify_on_images(path, data, head, device=device)
        print(f"  {result.top1:6.1%}  {name}", file=sys.stderr)
    diag = head.diagnosis
    recorded = diag.get("recorded_top1")
    recorded = f"{recorded:.1%}" if recorded is not None else "nothing"
    relabel = diag.get("relabel")
    if relabel:
        named = f" ({relabel['named']})" if relabel.get("named") else ""
        print(f"(triage: the old head was a {relabel['kind']} of the right one{named}, "
              f"{diag['classes_moved']} classes moved, fixed without training from "
              f"{sum(relabel['images'].values())} images; the checkpoint records top-1 "
              f"{recorded})", file=sys.stderr)
    else:
        print(f"(the old head was a permutation of the right one: {diag['is_permutation']}, "
              f"{diag['classes_moved']} classes moved; the backbone is judged "
              f"{diag.get('backbone', 'unknown')}: the checkpoint records top-1 {recorded})",
              file=sys.stderr)
    print(f"fixed checkpoint: {fixed}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
