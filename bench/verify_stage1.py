#!/usr/bin/env python3
"""Stage 1 against the torchvision/PIL path on ImageNet-sized real JPEGs, image by image.

    python bench/verify_stage1.py --images 200 --work /tmp/verify

Makes an ImageFolder tree of ~500x375 JPEGs (quality 90) cut from scikit-learn's bundled photos,
with every kind of bad file mixed in, and a training-script checkpoint of a torchvision ResNet-18
(random weights, non-trivial BatchNorm statistics). Runs extract_features.py with DALI and with
PIL, then the reference: torchvision transforms on PIL images through the model up to its head.
Prints cosine similarity (raw, and centred on the reference mean), head top-1 agreement and
img/s per decoder, and checks that a second run is a no-op. --checkpoint uses your own model.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zarr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.photos import make_photo_tree  # noqa: E402
from pipeline import data as D  # noqa: E402
from pipeline.checkpoint import load_checkpoint  # noqa: E402
from pipeline.extract import prepare_model  # noqa: E402
from pipeline.models import default_preprocess  # noqa: E402
from tests.conftest import BAD_KINDS, make_model, training_checkpoint, write_bad  # noqa: E402


def make_tree(root: Path, n: int) -> None:
    from sklearn.datasets import load_sample_images

    make_photo_tree(root, n)
    photos = load_sample_images().images
    for kind in BAD_KINDS:
        write_bad(root / "train" / "n00" / f"bad_{kind}.JPEG", kind, photos)


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(out.stderr)
    return time.perf_counter() - start, out.stderr


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/verify-stage1"))
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    data = args.work / "data"
    if not data.is_dir():
        make_tree(data, args.images)
    ckpt = args.checkpoint or args.work / "checkpoint_best.pth"
    if not ckpt.is_file():
        torch.save(training_checkpoint(make_model("resnet18", num_classes=4), "resnet18"), ckpt)

    loaded = load_checkpoint(ckpt)
    prepared = prepare_model(loaded, None)
    backbone = prepared.backbone
    head = torch.nn.Linear(prepared.feature_dim, prepared.num_classes)
    head.load_state_dict({k: loaded.state_dict[f"{prepared.head_layer}.{k}"]
                          for k in ("weight", "bias")})
    pre, _ = default_preprocess(prepared.arch, loaded.args)

    rows = []
    for decoder in ("dali", "pil"):
        store = args.work / f"{decoder}.zarr"
        if store.exists():
            shutil.rmtree(store)
        cmd = [sys.executable, "extract_features.py", "--checkpoint", str(ckpt), "--data-root",
               str(data), "--out", str(store), "--decoder", decoder, "--float32",
               "--num-threads", str(args.threads)]
        seconds, log = run(cmd)
        summary = [ln for ln in log.splitlines() if ln.startswith("extract:")][-1]
        _, again = run(cmd)
        assert "already complete" in again, again
        g = zarr.open_group(str(store), mode="r")
        cos_all, ccos_all, agree, n_ok, n_q = [], [], [], 0, 0
        for split in ("train", "val"):
            s = g[split]
            ok = s["ok"][:].astype(bool)
            files = [f for f, o in zip(s["files"][:], ok, strict=True) if o]
            feats = s["features"][:][ok]
            with torch.no_grad():
                ref = torch.cat([
                    backbone(torch.stack([D.pil_transform(D.pil_decode(
                        (data / split / f).read_bytes()), pre) for f in files[i:i + 64]]))
                    for i in range(0, len(files), 64)]).numpy()
                ours = head(torch.from_numpy(feats)).argmax(1)
                theirs = head(torch.from_numpy(ref)).argmax(1)
            feats, ref = feats.astype(np.float64), ref.astype(np.float64)
            cos = (feats * ref).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(ref, axis=1)
            # Also against the spread between images: centred on the reference mean, so a
            # feature component shared by every image cannot make two paths look alike.
            mu = ref.mean(0)
            a, b = feats - mu, ref - mu
            ccos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            cos_all.append(cos)
            ccos_all.append(ccos)
            agree.append((ours == theirs).numpy())
            n_ok += int(ok.sum())
            n_q += int((~ok).sum())
        cos, ccos = np.concatenate(cos_all), np.concatenate(ccos_all)
        rows.append((decoder, n_ok, n_q, cos.min(), ccos.min(),
                     np.concatenate(agree).mean(), summary))
    print(f"{'decoder':8} {'ok':>5} {'quar':>5} {'1-cos max':>10} {'1-ccos max':>10} "
          f"{'top1 agree':>10}")
    for d, n_ok, n_q, cmin, ccmin, ag, summary in rows:
        print(f"{d:8} {n_ok:5d} {n_q:5d} {1 - cmin:10.2e} {1 - ccmin:10.2e} {ag:10.4f}   {summary}")
    print("second run: no-op for both decoders")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
