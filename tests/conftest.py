"""Fixtures: small real-photo image trees and training-script checkpoints, made per test."""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_images

CLASSES = ("n01", "n02", "n03")
SIZE = dict(resize="40", crop="32")  # tiny eval transform keeps the CPU tests fast


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """scikit-learn's two bundled photos (427x640 RGB), the source of every test image."""
    return list(load_sample_images().images)


def photo_patch(photos, rng, h=60, w=80) -> np.ndarray:
    src = photos[int(rng.integers(len(photos)))]
    y = int(rng.integers(0, src.shape[0] - h))
    x = int(rng.integers(0, src.shape[1] - w))
    return src[y:y + h, x:x + w]


def jpeg_bytes(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=kw.pop("format", "JPEG"), **kw)
    return buf.getvalue()


def make_tree(root: Path, photos, *, per_class=(4, 2), classes=CLASSES, seed=0) -> Path:
    """root/{train,val}/<class>/img*.JPEG from crops of real photos."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                (d / f"img{k}.JPEG").write_bytes(jpeg_bytes(photo_patch(photos, rng), quality=90))
    return root


BAD_KINDS = ("zero_bytes", "html", "truncated", "corrupt_png", "cmyk", "grayscale", "png", "webp",
             "gif")


def write_bad(path: Path, kind: str, photos) -> None:
    rng = np.random.default_rng(hash(kind) % 2**32)
    patch = photo_patch(photos, rng)
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "html":
        path.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    elif kind == "truncated":
        data = jpeg_bytes(patch, quality=90)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt_png":  # complete file, damaged compressed data: passes every sniff
        data = bytearray(jpeg_bytes(patch, format="PNG"))
        data[data.index(b"IDAT") + 20] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "cmyk":
        buf = io.BytesIO()
        Image.fromarray(patch).convert("CMYK").save(buf, format="JPEG", quality=90)
        path.write_bytes(buf.getvalue())
    elif kind == "grayscale":
        buf = io.BytesIO()
        Image.fromarray(patch).convert("L").save(buf, format="JPEG", quality=90)
        path.write_bytes(buf.getvalue())
    elif kind in ("png", "webp", "gif"):
        path.write_bytes(jpeg_bytes(patch, format=kind.upper()))
    else:  # pragma: no cover
        raise ValueError(kind)


def make_model(arch="resnet18", num_classes=3, seed=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return trained_bn(torchvision.models.get_model(arch, weights=None, num_classes=num_classes))


def trained_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Give BatchNorm non-trivial statistics, as a trained model has; returns it in eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def training_checkpoint(model: torch.nn.Module, arch: str, *, prefix="module.", **extra) -> dict:
    """What torchvision's reference train.py (under DDP) saves, plus numpy scalars."""
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {
        "model": sd,
        "optimizer": opt.state_dict(),
        "epoch": 89,
        "best_acc1": np.float64(0.71),
        "args": argparse.Namespace(arch=arch, lr=0.1, epochs=90, data_path="/data"),
        **extra,
    }


@pytest.fixture
def tree(tmp_path, photos) -> Path:
    return make_tree(tmp_path / "data", photos)


@pytest.fixture
def model() -> torch.nn.Module:
    return make_model()


@pytest.fixture
def ckpt(tmp_path, model) -> Path:
    path = tmp_path / "checkpoint_best.pth"
    torch.save(training_checkpoint(model, "resnet18"), path)
    return path


def extract_args(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(ckpt), "--data-root", str(data), "--out", str(out),
            "--resize", SIZE["resize"], "--crop", SIZE["crop"], "--chunk-rows", "4",
            "--batch-size", "3", "--num-threads", "2", *extra]


@pytest.fixture(scope="session", autouse=True)
def _own_tmpdir(tmp_path_factory):
    """Temp files of the code under test and its subprocesses (torchrun's torchelastic_* folders)
    go under pytest's base folder, which a passing run removes, not into /tmp for good."""
    import tempfile

    mp = pytest.MonkeyPatch()
    mp.setenv("TMPDIR", str(tmp_path_factory.mktemp("TMPDIR")))
    mp.setattr(tempfile, "tempdir", None)  # tempfile caches the folder it found first
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """scikit-learn digits as JPEGs (with 3 broken files) through a ResNet-18, stage 1 for real."""
    import extract_features
    from pipeline.demo import make_images

    root = tmp_path_factory.mktemp("digits")
    make_images(root / "data")
    model = make_model("resnet18", num_classes=10, seed=0)
    ckpt = root / "checkpoint_best.pth"
    torch.save(training_checkpoint(model, "resnet18"), ckpt)
    store = root / "features.zarr"
    rc = extract_features.main(["--checkpoint", str(ckpt), "--data-root", str(root / "data"),
                                "--out", str(store), "--resize", "32", "--crop", "32",
                                "--decoder", "pil", "--float32", "--batch-size", "256"])
    assert rc == 0
    return {"root": root, "ckpt": ckpt, "store": store, "model": model}
