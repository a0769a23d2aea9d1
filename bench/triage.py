#!/usr/bin/env python3
"""The triage against the full pipeline, on a 1000-class case of real images.

    python bench/triage.py --out /work/triage-bench [--train-per-class 100 --val-per-class 4]
                           [--json bench/results/triage-cpu-DATE.json]

The case, built here from what installs offline (every step is skipped when its output exists):

1. Images: Fashion-MNIST (the Debian package's 70,000 real 28x28 clothing photos) composed into
   56x56 images of three tiles (top left, top right, bottom left). Class (a, b, c), the tiles'
   classes, 1000 classes in all, folders n000 ... n999 (a*100 + b*10 + c: the index order),
   named "sandal / bag / coat". `--train-per-class` train images per class from the photos'
   train split, `--val-per-class` val images from their test split (100 and 4: 25 train images
   for each val image, as ImageNet has). PNG, so decoding is real but cheap.
2. The backbone, `bench.models:tiles`: a small CNN trained here on the 60,000 train photos, run
   on each tile; features are the three tiles' log-probabilities. The head scores the classes'
   log-probabilities under independent tiles (rows e_a + e_(10+b) + e_(20+c)): what a
   converged head on these features is. Its top-1 is set by the tile CNN (~0.9^3).
3. Checkpoints (the torchvision references' layout, `best_acc1` measured here on the val
   images against the labels the model was trained with: its own-label top-1):
   - relabel: the head's rows in the order of the classes sorted by human name (the bug), no
     class map recorded;
   - random: a random head;
   - noisy: the head in the right order, but a fifth of the classes never learned (their rows
     far below the rest: what labels that put those classes' images under other classes give).

Then, side by side on this machine:
- `quickfix-labels` (the triage) on the relabel case, twice (before and after the full run);
- the three scripts in full on the same case: extract_features.py on every image,
  train_head.py (its defaults), stitch_checkpoint.py;
- `quickfix-labels --triage only` on the random and noisy cases (must not relabel).
For each: wall time, images decoded (stage 1's rows), and val top-1 of the fixed model,
evaluated here (PIL decoding, the model in torch: none of the project's code) against the
correct labels, beside the buggy model's own-label top-1.
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.models import TILE, TileNet, tiles  # noqa: E402
from bench.realfeatures import DEB, FMNIST_CLASSES, _read_idx  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 2 * TILE


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmnist(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    unpacked = out / "fmnist-deb"
    idx = unpacked / "usr/share/datasets/fashion-mnist"
    if not idx.is_dir():
        subprocess.run(["dpkg-deb", "-x", str(DEB), str(unpacked)], check=True)
    return {split: (_read_idx(idx / f"{p}-images-idx3-ubyte.gz"),
                    _read_idx(idx / f"{p}-labels-idx1-ubyte.gz").astype(np.int64))
            for split, p in (("train", "train"), ("test", "t10k"))}


def normalised(gray: np.ndarray) -> torch.Tensor:
    """uint8 [n, h, w] -> float [n, 3, h, w], ImageNet-normalised (the eval transform)."""
    x = torch.as_tensor(gray).float().div_(255).unsqueeze(1).expand(-1, 3, -1, -1)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------
# 1-2. the tile CNN and the images


def train_tiles(photos, out: Path, epochs: int) -> Path:
    path = out / "tilenet.pt"
    if path.is_file():
        return path
    torch.manual_seed(0)
    x, y = photos["train"]
    net = TileNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                          nesterov=True)
    steps = epochs * (len(y) // 256)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.2, total_steps=steps)
    start = time.perf_counter()
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y) - 255, 256):
            idx = perm[i:i + 256].numpy()
            xb = normalised(x[idx])
            shift = np.random.randint(-2, 3, size=2)  # +-2 px, the batch alike
            xb = torch.roll(xb, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(net(xb), torch.as_tensor(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"  tile CNN epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}")
    net.eval()
    tx, ty = photos["test"]
    with torch.no_grad():
        pred = torch.cat([net(normalised(tx[i:i + 1000])).argmax(1) for i in
                          range(0, len(ty), 1000)])
    acc = float((pred.numpy() == ty).mean())
    log(f"  tile CNN: {time.perf_counter() - start:.0f} s, test top-1 {acc:.2%}")
    torch.save({"state_dict": net.state_dict(), "tile_top1": acc}, path)
    return path


def class_names() -> list[str]:
    return [f"{FMNIST_CLASSES[k // 100]} / {FMNIST_CLASSES[k // 10 % 10]} / "
            f"{FMNIST_CLASSES[k % 10]}" for k in range(1000)]


def compose(photos, out: Path, per_class: dict[str, int]) -> Path:
    """out/data/{train,val}/nABC/*.png and out/class_index.json (the correct order)."""
    from PIL import Image

    data = out / "data"
    done = data / ".complete"
    if done.is_file():
        return data
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for split, source in (("train", "train"), ("val", "test")):
        x, y = photos[source]
        by_class = [np.flatnonzero(y == c) for c in range(10)]
        for k in range(1000):
            folder = data / split / f"n{k:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            a, b, c = k // 100, k // 10 % 10, k % 10
            for i in range(per_class[split]):
                img = np.zeros((SIZE, SIZE), np.uint8)
                img[:TILE, :TILE] = x[rng.choice(by_class[a])]
                img[:TILE, TILE:] = x[rng.choice(by_class[b])]
                img[TILE:, :TILE] = x[rng.choice(by_class[c])]
                Image.fromarray(img, mode="L").save(folder / f"{k:03d}_{i:04d}.png",
                                                    compress_level=1)
        log(f"  {split}: {1000 * per_class[split]} images")
    log(f"  composed in {time.perf_counter() - start:.0f} s")
    done.write_text("ok\n")
    return data


# ---------------------------------------------------------------------------------------------
# 3. checkpoints


def right_head() -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(1000, 30)
    for k in range(1000):
        w[k, k // 100], w[k, 10 + k // 10 % 10], w[k, 20 + k % 10] = 1.0, 1.0, 1.0
    return w, torch.zeros(1000)


def val_set(data: Path) -> tuple[torch.Tensor, np.ndarray]:
    """The val images, decoded with PIL (not the project's code), and their correct labels."""
    from PIL import Image

    files = sorted((data / "val").glob("n*/*.png"))
    gray = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])
    labels = np.asarray([int(f.parent.name[1:]) for f in files])
    return normalised(gray), labels


def predict(ckpt: Path, val: torch.Tensor) -> np.ndarray:
    """The model's predictions on the val images, with the head the checkpoint holds."""
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = tiles(num_classes=raw["model"]["fc.weight"].shape[0]
                  if "model" in raw else raw["state_dict"]["fc.weight"].shape[0])
    sd = raw.get("model", raw.get("state_dict"))
    model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    model.eval()
    with torch.no_grad():
        return torch.cat([model(val[i:i + 1000]).argmax(1) for i in
                          range(0, len(val), 1000)]).numpy()


def checkpoints(out: Path, tilenet: Path, val) -> dict[str, dict]:
    net = torch.load(tilenet, weights_only=True)["state_dict"]
    w, b = right_head()
    names = class_names()
    by_name = sorted(range(1000), key=lambda k: names[k])  # the bug: rows in name order
    row_of = np.empty(1000, np.int64)
    row_of[by_name] = np.arange(1000)  # class k's row
    g = torch.Generator().manual_seed(0)
    never = torch.randperm(1000, generator=g)[:200]
    noisy_b = b.clone()
    noisy_b[never] = -8.0
    cases = {
        "relabel": (w[by_name], b[by_name], row_of),
        "random": (torch.randn(1000, 30, generator=g) * 0.3, torch.zeros(1000), np.arange(1000)),
        "noisy": (w, noisy_b, np.arange(1000)),
    }
    found = {}
    for name, (cw, cb, own_row) in cases.items():
        path = out / name / "checkpoint_best.pth"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            model = tiles(1000)
            model.tile.load_state_dict(net)
            model.fc.weight.data.copy_(cw)
            model.fc.bias.data.copy_(cb)
            torch.save({"model": model.state_dict(), "epoch": 29, "best_acc1": np.float64(0),
                        "args": argparse.Namespace(arch="bench.models:tiles", lr=0.1,
                                                   val_resize_size=SIZE, val_crop_size=SIZE)},
                       path)
        pred = predict(path, val[0])
        own = float((pred == own_row[val[1]]).mean())  # against the labels it was trained with
        raw = torch.load(path, weights_only=False)
        raw["best_acc1"] = np.float64(100 * own)
        torch.save(raw, path)
        found[name] = {"checkpoint": path, "own_label_top1": own}
        log(f"  {name}: own-label val top-1 {own:.2%}")
    return found


# ---------------------------------------------------------------------------------------------
# runs


def timed(cmd: list[str], log_path: Path) -> tuple[float, int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    log_path.write_text(proc.stderr + proc.stdout)
    return wall, proc.returncode, proc.stderr


def rows_of(store: Path) -> int:
    from pipeline import store as S

    fs = S.FeatureStore.open(store)
    return sum(len(fs.read(s, "labels")) for s in fs.splits)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--val-per-class", type=int, default=4)
    ap.add_argument("--tile-epochs", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    qf = str(Path(py).parent / "quickfix-labels")
    log("case:")
    photos = fmnist(args.out)
    tilenet = train_tiles(photos, args.out, args.tile_epochs)
    data = compose(photos, args.out, {"train": args.train_per_class,
                                      "val": args.val_per_class})
    order = args.out / "class_index.json"
    order.write_text(json.dumps({str(k): [f"n{k:03d}", n] for k, n in
                                 enumerate(class_names())}))
    val = val_set(data)
    cases = checkpoints(args.out, tilenet, val)
    size = ["--resize", str(SIZE), "--crop", str(SIZE)]
    total = sum(1 for _ in (data / "train").glob("*/*.png")) + len(val[1])
    runs: dict[str, dict] = {}

    def quickfix(name: str, case: str, *extra: str) -> dict:
        ckpt = cases[case]["checkpoint"]
        fixed = ckpt.parent / f"fixed-{name}"
        subprocess.run(["rm", "-rf", str(fixed)], check=True)
        wall, rc, err = timed([qf, "--checkpoint", str(ckpt), "--data-root", str(data),
                               "--class-order", str(order), "--checkpoint-dir", str(fixed),
                               *size, *extra], args.out / f"{name}.log")
        sample = fixed / "triage" / "sample.zarr"
        rec = {"wall_s": wall, "rc": rc, "images_decoded": rows_of(sample) if sample.exists()
               else 0, "line": next((ln for ln in err.splitlines()
                                     if ln.startswith(("triage: a", "triage: metadata",
                                                       "error:"))), None)}
        if (fixed / "features.zarr").exists():
            rec["images_decoded"] += rows_of(fixed / "features.zarr")
        out = fixed / "checkpoint_best.pth"
        if rc == 0 and out.is_file():
            rec["fixed_top1"] = float((predict(out, val[0]) == val[1]).mean())
            report = out.with_name("checkpoint_best.triage.json")
            if report.is_file():
                r = json.loads(report.read_text())
                rec.update(kind=r["kind"], named=r["named"], moved=r["moved"],
                           sample_per_class=r["sample_per_class"])
                # every round's sample (a grown sample decodes its images again)
                rec["images_decoded"] = max(rec["images_decoded"], r.get("images_decoded", 0))
        log(f"{name}: {wall:.1f} s, rc {rc}, {rec['images_decoded']} images: {rec['line']}")
        return rec

    def full() -> dict:
        ckpt = cases["relabel"]["checkpoint"]
        work = args.out / "full"
        subprocess.run(["rm", "-rf", str(work)], check=True)
        work.mkdir()
        store, head, out = work / "features.zarr", work / "head.pt", work / "checkpoint_best.pth"
        steps = {
            "extract": [py, "extract_features.py", "--checkpoint", str(ckpt), "--data-root",
                        str(data), "--class-order", str(order), "--out", str(store), *size],
            "train": [py, "train_head.py", "--features", str(store), "--checkpoint", str(ckpt),
                      "--out", str(head)],
            "stitch": [py, "stitch_checkpoint.py", "--checkpoint", str(ckpt), "--head",
                       str(head), "--out", str(out)],
        }
        rec: dict = {"wall_s": 0.0}
        for step, cmd in steps.items():
            wall, rc, _ = timed(cmd, args.out / f"full-{step}.log")
            if rc != 0:
                raise SystemExit(f"full pipeline: {step} failed (rc {rc}); see "
                                 f"{args.out / f'full-{step}.log'}")
            rec[f"{step}_s"] = wall
            rec["wall_s"] += wall
        rec["images_decoded"] = rows_of(store)
        rec["fixed_top1"] = float((predict(out, val[0]) == val[1]).mean())
        parts = ", ".join(f"{s} {rec[s + '_s']:.1f} s" for s in steps)
        log(f"full: {rec['wall_s']:.1f} s ({parts}), {rec['images_decoded']} images")
        return rec

    log("runs:")
    runs["triage_1"] = quickfix("triage_1", "relabel")
    runs["full"] = full()
    runs["triage_2"] = quickfix("triage_2", "relabel")
    runs["random"] = quickfix("random", "random", "--triage", "only")
    runs["noisy"] = quickfix("noisy", "noisy", "--triage", "only")

    tri = [runs["triage_1"], runs["triage_2"]]
    own = cases["relabel"]["own_label_top1"]
    summary = {
        "images_total": total,
        "triage_images_share": max(r["images_decoded"] for r in tri)
        / runs["full"]["images_decoded"],
        "speedup": runs["full"]["wall_s"] / float(np.median([r["wall_s"] for r in tri])),
        "own_label_top1": own,
        "triage_fixed_top1": tri[0].get("fixed_top1"),
        "full_fixed_top1": runs["full"]["fixed_top1"],
        "triage_minus_own_pt": 100 * (tri[0].get("fixed_top1", float("nan")) - own),
        "non_relabels_relabelled": [n for n in ("random", "noisy") if runs[n]["rc"] == 0],
    }
    import importlib.metadata as md

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    result = {
        "command": " ".join(["python", "bench/triage.py", *sys.argv[1:]]),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                    **{p: md.version(p) for p in ("torch", "torchvision", "zarr",
                                                  "nvidia-dali-cuda130")
                       if _has(md, p)}},
        "date": time.strftime("%Y-%m-%d"),
        "case": {"classes": 1000, "train_per_class": args.train_per_class,
                 "val_per_class": args.val_per_class,
                 "tile_top1": torch.load(tilenet, weights_only=True)["tile_top1"],
                 **{f"{n}_own_label_top1": c["own_label_top1"] for n, c in cases.items()}},
        "runs": runs, "summary": summary,
    }
    log(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


def _has(md, name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
