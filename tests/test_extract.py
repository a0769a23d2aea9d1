"""Stage 1 end to end, through extract_features.main, on real JPEG crops and real models."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import extract_features
from pipeline import data as D
from pipeline.models import Preprocess, split_backbone

from .conftest import BAD_KINDS, SIZE, extract_args, make_model, training_checkpoint, write_bad

ROOT = Path(__file__).resolve().parent.parent
PRE = Preprocess(int(SIZE["resize"]), int(SIZE["crop"]))


def reference_features(model, root: Path, files) -> np.ndarray:
    """The torchvision/PIL path: decode, eval transform, the model up to its head."""
    backbone, _, _ = split_backbone(model)
    images = torch.stack([D.pil_transform(D.pil_decode((root / f).read_bytes()), PRE)
                          for f in files])
    with torch.no_grad():
        return backbone.eval()(images).numpy()


def cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def read_split(store: Path, split: str) -> dict:
    g = zarr.open_group(str(store), mode="r")[split]
    return {k: g[k][:] for k in ("features", "labels", "files", "ok", "reasons", "chunk_done")}


def assert_finished_equal(resumed: Path, clean: Path) -> None:
    """A store finished after a kill equals one made without interruption, bit for bit."""
    a, b = read_split(resumed, "train"), read_split(clean, "train")
    assert a["chunk_done"].all()
    assert a["features"].tobytes() == b["features"].tobytes()
    for k in ("labels", "files", "ok", "reasons"):
        np.testing.assert_array_equal(a[k], b[k])


def chunk_files(store: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}


@pytest.mark.parametrize("decoder", ["dali", "pil"])
def test_store_matches_torchvision_path(tmp_path, tree, ckpt, model, photos, decoder):
    for kind in BAD_KINDS:
        write_bad(tree / "train" / "n02" / f"bad_{kind}.JPEG", kind, photos)
    out = tmp_path / "f.zarr"
    rc = extract_features.main(extract_args(ckpt, tree, out, "--decoder", decoder, "--float32"))
    assert rc == 0
    got = read_split(out, "train")
    files = list(got["files"])
    reasons = dict(zip(files, got["reasons"], strict=True))
    ok = dict(zip(files, got["ok"].astype(bool), strict=True))
    assert len(files) == 12 + len(BAD_KINDS)
    # quarantined with a reason, and only those
    assert not ok["n02/bad_zero_bytes.JPEG"] and "empty" in reasons["n02/bad_zero_bytes.JPEG"]
    assert not ok["n02/bad_html.JPEG"] and "HTML" in reasons["n02/bad_html.JPEG"]
    assert not ok["n02/bad_truncated.JPEG"] and "truncated" in reasons["n02/bad_truncated.JPEG"]
    # a damaged PNG fails DALI inside a batch (bisected out) and PIL: quarantined, neighbours kept
    bad_png = "n02/bad_corrupt_png.JPEG"
    assert not ok[bad_png] and "undecodable" in reasons[bad_png]
    if decoder == "dali":
        assert "DALI could not decode it" in reasons[bad_png]
    assert sum(not v for v in ok.values()) == 4
    bad_rows = [i for i, f in enumerate(files) if not ok[f]]
    assert not got["features"][bad_rows].any()
    # labels follow the (sorted) class folders
    assert got["labels"].tolist() == [["n01", "n02", "n03"].index(f.split("/")[0]) for f in files]
    assert got["chunk_done"].all()
    # every decodable image (CMYK, grayscale, PNG/WebP/GIF named .jpg) matches the reference
    good = [i for i, f in enumerate(files) if ok[f]]
    ref = reference_features(model, tree / "train", [files[i] for i in good])
    cos = cosine(got["features"][good], ref)
    print(f"{decoder}: min cosine to the torchvision/PIL path {cos.min():.6f} over {len(good)}")
    if decoder == "pil":
        np.testing.assert_allclose(got["features"][good], ref, rtol=1e-4, atol=1e-5)
    else:
        assert cos.min() >= 0.999
    val = read_split(out, "val")
    assert val["ok"].all() and len(val["files"]) == 6


def test_dali_against_pil_reference(tmp_path, tree, ckpt):
    stores = {}
    for decoder in ("dali", "pil"):
        stores[decoder] = tmp_path / f"{decoder}.zarr"
        assert extract_features.main(extract_args(ckpt, tree, stores[decoder], "--decoder",
                                                  decoder, "--float32")) == 0
    for split in ("train", "val"):
        a, b = read_split(stores["dali"], split), read_split(stores["pil"], split)
        assert list(a["files"]) == list(b["files"])
        cos = cosine(a["features"], b["features"])
        print(f"{split}: DALI vs PIL cosine min {cos.min():.6f} mean {cos.mean():.6f}")
        assert cos.min() >= 0.999


def test_second_run_is_a_noop(tmp_path, tree, ckpt, capsys):
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    before = chunk_files(out)
    capsys.readouterr()
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    assert "already complete" in capsys.readouterr().err
    assert chunk_files(out) == before


def test_other_inputs_are_refused_unless_overwrite(tmp_path, tree, ckpt, capsys, model):
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    before = chunk_files(out)
    args = extract_args(ckpt, tree, out)
    args[args.index("--crop") + 1] = "24"
    assert extract_features.main(args) == 2
    err = capsys.readouterr().err
    assert "made from other inputs" in err and "preprocessing.crop" in err
    assert chunk_files(out) == before
    # a different backbone is refused too
    other = tmp_path / "other.pth"
    torch.save(training_checkpoint(make_model(seed=1), "resnet18"), other)
    assert extract_features.main(extract_args(other, tree, out)) == 2
    assert "backbone_sha256" in capsys.readouterr().err
    assert extract_features.main(args + ["--overwrite"]) == 0
    assert zarr.open_group(str(out))["train"]["features"].shape == (12, 512)
    assert not list(tmp_path.glob(".f.zarr.*"))  # no temp folders left behind


def test_out_that_is_not_a_store_is_never_replaced(tmp_path, tree, ckpt, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    assert extract_features.main(extract_args(ckpt, tree, out, "--overwrite")) == 2
    assert "not a feature store" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "do not delete"


@pytest.mark.parametrize("form", ["text", "json"])
def test_class_order_file_sets_labels_and_is_audited(tmp_path, tree, model, capsys, form):
    ckpt = tmp_path / "ckpt.pth"
    torch.save(training_checkpoint(model, "resnet18", id_to_class=["n01", "n02", "n03"]), ckpt)
    order = ["n03", "n01", "n02"]
    if form == "text":
        path = tmp_path / "order.txt"
        path.write_text("\n".join(order) + "\n")
    else:
        path = tmp_path / "imagenet_class_index.json"
        path.write_text(json.dumps({str(i): [c, f"name {c}"] for i, c in enumerate(order)}))
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out, "--class-order", str(path))) == 0
    err = capsys.readouterr().err
    assert (f"checkpoint's own class mapping and the class-order file {path} disagree at 3 of 3"
            in err)
    assert f"labels in the store follow the class-order file {path}" in err
    got = read_split(out, "val")
    assert got["labels"].tolist() == [order.index(f.split("/")[0]) for f in got["files"]]
    assert zarr.open_group(str(out)).attrs["classes"] == order


def test_two_writers_on_disjoint_chunks_equal_one(tmp_path, tree, ckpt, monkeypatch):
    single = tmp_path / "single.zarr"
    assert extract_features.main(extract_args(ckpt, tree, single)) == 0
    shared = tmp_path / "shared.zarr"
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert extract_features.main(extract_args(ckpt, tree, shared)) == 0
        done = read_split(shared, "train")["chunk_done"]
        assert done.tolist() == ([1, 1, 0] if rank == 0 else [1, 1, 1])
    for split in ("train", "val"):
        a, b = read_split(single, split), read_split(shared, split)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_sigkill_then_resume_is_bit_identical(tmp_path, photos):
    from .conftest import make_tree

    tree = make_tree(tmp_path / "data", photos, per_class=(8, 0), classes=("a", "b"))
    (tree / "val").rmdir() if (tree / "val").exists() and not any((tree / "val").iterdir()) \
        else None
    from .factories import slow_net

    ckpt = tmp_path / "ckpt.pth"
    torch.save({"state_dict": slow_net(2).state_dict(), "arch": "tests.factories:slow_net"},
               ckpt)
    args = ["--checkpoint", str(ckpt), "--data-root", str(tree), "--splits", "train",
            "--resize", "40", "--crop", "32", "--chunk-rows", "2", "--batch-size", "2",
            "--num-threads", "1", "--float32"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), SLOWNET_SECONDS="0.25")
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, str(ROOT / "extract_features.py"), *args,
                             "--out", str(killed)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dir = killed / "train" / "chunk_done" / "c"
    deadline = time.monotonic() + 120
    while not (done_dir.is_dir() and len(list(done_dir.iterdir())) >= 2):
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_split(killed, "train")["chunk_done"]
    assert 2 <= partial.sum() < partial.size  # really interrupted part-way
    env["SLOWNET_SECONDS"] = "0"
    resumed = subprocess.run([sys.executable, str(ROOT / "extract_features.py"), *args,
                              "--out", str(killed)], env=env, cwd=ROOT, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at chunk {int(partial.sum())}" in resumed.stderr
    clean = tmp_path / "clean.zarr"
    whole = subprocess.run([sys.executable, str(ROOT / "extract_features.py"), *args,
                            "--out", str(clean)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    assert_finished_equal(killed, clean)


def test_flipped_bit_is_caught(tmp_path, tree, ckpt):
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    chunk = out / "train" / "features" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0x04
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_group(str(out), mode="r")["train"]["features"][:4]


def test_store_records_what_made_it(tmp_path, tree, ckpt):
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    attrs = zarr.open_group(str(out)).attrs
    comp = attrs["fingerprint"]["components"]
    assert comp["arch"] == "resnet18" and comp["head"] == "fc" and comp["feature_dim"] == 512
    assert comp["decoder"] == "dali-cpu" and comp["dtype"] == "float16"
    assert comp["preprocessing"]["crop"] == 32
    assert attrs["record"]["argv"][1:3] == ["--checkpoint", str(ckpt)]
    assert attrs["checkpoint"]["backbone_sha256"] == comp["backbone_sha256"]
    assert zarr.open_group(str(out))["train"]["features"].dtype == np.float16


def test_mobilenet_head_in_classifier(tmp_path, tree):
    model = make_model("mobilenet_v3_small")
    ckpt = tmp_path / "mnv3.pth"
    torch.save(training_checkpoint(model, "mobilenet_v3_small"), ckpt)
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out, "--float32")) == 0
    got = read_split(out, "val")
    assert got["features"].shape == (6, 1024)
    ref = reference_features(model, tree / "val", list(got["files"]))
    assert cosine(got["features"], ref).min() >= 0.999


@pytest.mark.gpu
def test_mixed_decoder_matches_cpu_path(tmp_path, tree, ckpt):
    stores = {}
    for device in ("cpu", "cuda"):
        stores[device] = tmp_path / f"{device}.zarr"
        assert extract_features.main(extract_args(ckpt, tree, stores[device], "--device", device,
                                                  "--decoder", "dali", "--float32")) == 0
    for split in ("train", "val"):
        a, b = read_split(stores["cpu"], split), read_split(stores["cuda"], split)
        cos = cosine(a["features"], b["features"])
        print(f"{split}: mixed (GPU, bf16) vs CPU cosine min {cos.min():.5f}")
        assert cos.min() >= 0.99
