"""Faults a user's machine brings: damaged stores, two writers, non-finite features, changed
files, odd names, a full disk. Each on a real store made by stage 1 from real images."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import extract_features
import train_head
from pipeline import data as D
from pipeline import store as S
from tests.conftest import extract_args, make_model, training_checkpoint
from tests.test_extract import cosine
from tests.test_train import separable, synthetic_store


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    """The features of two copies of one image that sat at different places in their batches.
    Bit-identity is promised only for the same rows recomputed the same way (a resume): the
    backbone's kernels may round a row differently at another batch position (oneDNN's fp32
    convolutions on AMX do, by a unit in the last place of a float16), so: equal up to that."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    assert cosine(a[None], b[None])[0] > 0.9999
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * float(np.abs(b).max()))

ROOT = Path(__file__).resolve().parent.parent


def errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def all_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file()}


@pytest.fixture
def finished(tmp_path, tree, ckpt):
    """A finished store (train: 3 chunks of 4 rows, val: 2 chunks) and a pristine copy."""
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    pristine = tmp_path / "pristine.zarr"
    shutil.copytree(out, pristine)
    return out, pristine


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


# tampering -> how stage 2 sees it: "listing" (refused before reading), "reading" (refused when
# the chunk is read), None (an array stage 2 does not read: only --verify finds it)
TAMPERINGS = {
    "features chunk deleted": (lambda s: (s / "train/features/c/1/0").unlink(), "listing"),
    "ok chunk deleted": (lambda s: (s / "train/ok/c/0").unlink(), "listing"),
    "labels chunk deleted": (lambda s: (s / "train/labels/c/2").unlink(), "listing"),
    "reasons chunk deleted": (lambda s: (s / "val/reasons/c/0").unlink(), "listing"),
    "files chunk deleted": (lambda s: (s / "train/files/c/1").unlink(), "listing"),
    "split folder deleted": (lambda s: shutil.rmtree(s / "val"), "listing"),
    "array metadata deleted": (lambda s: (s / "train/ok/zarr.json").unlink(), "listing"),
    "chunk_done mark flipped": (lambda s: _flip(s / "train/chunk_done/c/2"), "listing"),
    "features bit flipped": (lambda s: _flip(s / "train/features/c/0/0"), "reading"),
    "labels chunk truncated": (lambda s: (s / "val/labels/c/1").write_bytes(b"\x28\xb5"),
                               "reading"),
    "files chunk truncated": (lambda s: (s / "train/files/c/1").write_bytes(b"\x28\xb5"), None),
    "stat chunk bit flipped": (lambda s: _flip(s / "val/stat/c/1/0"), None),
    "NaN written with a valid checksum": (lambda s: _write_nan(s), "reading"),
    # another chunk's file, intact (its checksum passes), at the wrong position
    "labels chunk swapped": (lambda s: shutil.copyfile(s / "train/labels/c/0",
                                                       s / "train/labels/c/2"), "reading"),
    "features chunk swapped": (lambda s: shutil.copyfile(s / "train/features/c/0/0",
                                                         s / "train/features/c/1/0"), "reading"),
    "ok chunk swapped": (lambda s: shutil.copyfile(s / "val/ok/c/1", s / "val/ok/c/0"),
                         "reading"),
}


def _write_nan(store: Path) -> None:
    arr = zarr.open_group(str(store), mode="r+")["val"]["features"]
    row = arr[4].copy()
    row[7] = np.nan
    arr[4] = row


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_a_damaged_store_is_refused_then_repaired_bit_identical(finished, tree, ckpt, capsys,
                                                                tmp_path, name):
    out, pristine = finished
    tamper, seen = TAMPERINGS[name]
    tamper(out)
    capsys.readouterr()
    head = tmp_path / "head.pt"
    rc = train_head.main(["--features", str(out), "--out", str(head), "--epochs", "1"])
    lines = errors(capsys)
    if seen is None:
        assert rc == 0 and not lines
    else:
        assert rc == 2 and len(lines) == 1 and not head.exists(), lines
        assert "damaged" in lines[0] and "rerun extract_features.py" in lines[0], lines[0]
    if seen == "reading":  # the chunk is named
        where = {"labels chunk truncated": "val/labels chunk 1",
                 "features bit flipped": "train/features chunk 0",
                 "NaN written with a valid checksum": "val/features chunk 1 is not the file",
                 "labels chunk swapped": "train/labels chunk 2 is not the file",
                 "features chunk swapped": "train/features chunk 1 is not the file",
                 "ok chunk swapped": "val/ok chunk 0 is not the file"}[name]
        assert where in lines[0] and "--verify" in lines[0], lines[0]
    if seen != "listing":
        # listing alone cannot see a bad checksum: a plain rerun has nothing to do
        assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    assert extract_features.main(extract_args(ckpt, tree, out, "--verify")) == 0
    err = capsys.readouterr().err
    assert "repairing" in err and "Traceback" not in err
    assert all_files(out) == all_files(pristine)
    assert train_head.main(["--features", str(out), "--out", str(head), "--epochs", "1"]) == 0


def test_listing_check_names_the_chunk(finished):
    out, _ = finished
    (out / "train/features/c/1/0").unlink()
    (out / "train/labels/c/2").unlink()
    damage = S.check_store(S.open_store(out))
    assert damage.chunks == {"train": {1: "features chunk file missing",
                                       2: "labels chunk file missing"}}
    assert "train chunk 1: features chunk file missing" in damage.describe()


def test_verify_on_an_untouched_store_changes_nothing(finished, tree, ckpt, capsys):
    out, pristine = finished
    capsys.readouterr()
    assert extract_features.main(extract_args(ckpt, tree, out, "--verify")) == 0
    err = capsys.readouterr().err
    assert "passes its checksum" in err and "nothing to do" in err
    assert all_files(out) == all_files(pristine)


# ---------------------------------------------------------------------------------------------
# one writer at a time

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.store import WriterLock
    lock = WriterLock(Path(sys.argv[1])).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def _hold(store: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(store)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_killed_one_blocks_nothing(tmp_path, tree, ckpt,
                                                                    capsys):
    out = tmp_path / "f.zarr"
    holder = _hold(out)
    try:
        for extra in ((), ("--overwrite", "--crop", "40")):
            assert extract_features.main(extract_args(ckpt, tree, out, *extra)) == 2
            (line,) = errors(capsys)
            assert "is being written by another run" in line
            assert f"pid {holder.pid}" in line and os.uname().nodename in line
        assert not out.exists()
        rc = train_head.main(["--features", str(out), "--out", str(tmp_path / "h.pt")])
        assert rc == 2
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    capsys.readouterr()
    # the kernel released the dead holder's lock: the next run goes ahead, and cleans up
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    assert not (tmp_path / ".f.zarr.lock").exists()


def test_train_head_refuses_a_store_being_written(finished, tmp_path, capsys):
    out, _ = finished
    holder = _hold(out)
    try:
        capsys.readouterr()
        rc = train_head.main(["--features", str(out), "--out", str(tmp_path / "h.pt")])
        (line,) = errors(capsys)
        assert rc == 2 and "is being written by a stage 1 run" in line
    finally:
        holder.kill()
        holder.wait()


def test_two_racing_runs_with_other_settings_never_mix(tmp_path, tree, ckpt):
    """Started together on one --out, one with another crop and --overwrite: whatever the
    interleaving, the store ends as one run's store, its fingerprint naming its settings."""
    out = tmp_path / "f.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "extract_features.py",
                              *extract_args(ckpt, tree, out, *extra)], cwd=ROOT, env=env,
                             stderr=subprocess.PIPE, text=True)
            for extra in ((), ("--crop", "40", "--overwrite"))]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    assert all("Traceback" not in err for _, err in results), results
    assert any(rc == 0 for rc, _ in results), results
    # rerunning each command: the one whose settings the store holds has nothing to do
    crop = S.open_store(out).attrs["fingerprint"]["components"]["preprocessing"]["crop"]
    args = extract_args(ckpt, tree, out, *(("--crop", "40") if crop == 40 else ()))
    proc = subprocess.run([sys.executable, "extract_features.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "nothing to do" in proc.stderr, proc.stderr
    # and its features are that run's, all of them
    fresh = tmp_path / "fresh.zarr"
    extra = ("--crop", "40") if crop == 40 else ()
    assert extract_features.main(extract_args(ckpt, tree, fresh, *extra)) == 0
    for split in ("train", "val"):
        a, b = S.open_store(out)[split], S.open_store(fresh)[split]
        assert a["features"][:].tobytes() == b["features"][:].tobytes()


# ---------------------------------------------------------------------------------------------
# finite values only


def _ckpt_with(tmp_path: Path, edit) -> Path:
    model = make_model()
    with torch.no_grad():
        edit(model)
    path = tmp_path / "edited.pth"
    torch.save(training_checkpoint(model, "resnet18"), path)
    return path


def test_nan_weights_stop_stage_1_naming_the_files(tmp_path, tree, capsys):
    ckpt = _ckpt_with(tmp_path, lambda m: m.layer4[1].conv2.weight.__setitem__(
        (0, 0, 0, 0), float("nan")))
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out)) == 2
    (line,) = errors(capsys)
    assert "non-finite features (NaN or inf)" in line and ".JPEG" in line
    assert not S.split_progress(S.open_store(out), "train").any()


def test_features_beyond_float16_point_to_float32(tmp_path, tree, capsys):
    def scale(m):
        m.layer4[1].bn2.weight.mul_(1e6)
        m.layer4[1].bn2.bias.add_(1e5)

    ckpt = _ckpt_with(tmp_path, scale)
    assert extract_features.main(extract_args(ckpt, tree, tmp_path / "a.zarr")) == 2
    (line,) = errors(capsys)
    assert "beyond float16's range" in line and "--float32" in line
    assert extract_features.main(extract_args(ckpt, tree, tmp_path / "b.zarr",
                                              "--float32")) == 0
    x = zarr.open_group(str(tmp_path / "b.zarr"))["train"]["features"][:]
    assert np.isfinite(x).all() and np.abs(x).max() > 65504


def test_train_head_refuses_non_finite_features(tmp_path, capsys):
    x, y, classes = separable()
    x["train"][5, 3] = np.nan
    store = synthetic_store(tmp_path / "s.zarr", x, y, classes)
    assert train_head.main(["--features", str(store), "--out", str(tmp_path / "h.pt")]) == 2
    (line,) = errors(capsys)
    assert "non-finite features in train chunk 0" in line


def test_diverged_grid_points_are_reported_and_never_chosen(tmp_path, capsys):
    x, y, classes = separable()
    store = synthetic_store(tmp_path / "s.zarr", x, y, classes)
    out = tmp_path / "head.pt"
    assert train_head.main(["--features", str(store), "--out", str(out), "--epochs", "3",
                            "--lr", "0.1,1e38", "--weight-decay", "0"]) == 0
    err = capsys.readouterr().err
    assert "diverged (not a candidate)" in err and "1 of 2 grid points diverged" in err
    head = torch.load(out, weights_only=True)
    assert head["metrics"]["lr"] == 0.1 and torch.isfinite(head["weight"]).all()
    assert [g["diverged"] for g in head["grid"]] == [False, True]


# ---------------------------------------------------------------------------------------------
# inputs that change or carry odd names


def test_a_file_replaced_before_the_resume_is_named(finished, tree, ckpt, capsys, photos):
    out, _ = finished
    files = [D.file_name(f) for f in S.open_store(out)["train"]["files"][:]]
    victim = tree / "train" / files[5]
    (out / "train/chunk_done/c/2").unlink()  # as if killed before the last chunk
    victim.write_bytes(victim.read_bytes() + b"\0" * 10)
    capsys.readouterr()
    assert extract_features.main(extract_args(ckpt, tree, out)) == 2
    (line,) = errors(capsys)
    assert f"{files[5]}: size" in line and "--overwrite" in line
    # the same size, a new modification time: still named
    victim.write_bytes(victim.read_bytes()[:-10])
    os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert extract_features.main(extract_args(ckpt, tree, out)) == 2
    (line,) = errors(capsys)
    assert f"{files[5]}: modified in place" in line


@pytest.mark.parametrize("pending", [True, False], ids=["resume", "finished"])
def test_overwrite_extracts_changed_files_again(finished, tree, ckpt, capsys, pending):
    """What the refusal and the warning say to do works: --overwrite makes the store anew from
    the files as they are now (it used to be refused, or kept, again)."""
    out, _ = finished
    files = [D.file_name(f) for f in S.open_store(out)["train"]["files"][:]]
    if pending:
        (out / "train/chunk_done/c/2").unlink()  # as if killed before the last chunk
    victim = tree / "train" / files[5]  # in chunk 1, done
    victim.write_bytes((tree / "train" / files[0]).read_bytes())
    capsys.readouterr()
    assert extract_features.main(extract_args(ckpt, tree, out, "--overwrite")) == 0
    err = capsys.readouterr().err
    assert f"{files[5]}: " in err and "making the store anew" in err
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    err = capsys.readouterr().err
    assert "file(s) changed" not in err and "nothing to do" in err
    x = S.open_store(out)["train"]["features"][:]
    assert_same_image(x[5], x[0])  # file 5 now holds file 0's bytes


def test_a_file_changed_under_a_chunk_not_yet_done_is_simply_extracted(finished, tree, ckpt,
                                                                        capsys, tmp_path):
    out, _ = finished
    files = [D.file_name(f) for f in S.open_store(out)["train"]["files"][:]]
    (out / "train/chunk_done/c/2").unlink()  # as if killed before the last chunk (rows 8..11)
    victim = tree / "train" / files[9]
    victim.write_bytes((tree / "train" / files[0]).read_bytes())
    capsys.readouterr()
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    assert "files changed under 1 chunk(s) not yet done" in capsys.readouterr().err
    # the record now names the file as it is: the next run has nothing to say or do
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    err = capsys.readouterr().err
    assert "file(s) changed" not in err and "files changed" not in err and "nothing to do" in err
    x = S.open_store(out)["train"]["features"][:]
    assert_same_image(x[9], x[0])  # file 9 now holds file 0's bytes


def test_a_changed_file_under_a_finished_store_is_a_warning(finished, tree, ckpt, capsys):
    out, pristine = finished
    victim = next((tree / "val").rglob("*.JPEG"))
    os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
    capsys.readouterr()
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    err = capsys.readouterr().err
    assert "1 file(s) changed" in err and "nothing to do" in err
    assert all_files(out) == all_files(pristine)


def test_names_that_are_not_utf8_are_decoded_and_round_trip(tmp_path, tree, ckpt):
    folder = os.fsencode(tree / "train" / "n01")
    odd = os.path.join(folder, b"caf\xe9 \\x41 %41.JPEG")
    first = sorted(p for p in os.listdir(folder))[0]
    shutil.copyfile(os.path.join(folder, first), odd)
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    g = zarr.open_group(str(out))["train"]
    stored = list(g["files"][:])
    (escaped,) = [s for s in stored if s.startswith("\0")]
    name = D.file_name(escaped)
    assert os.fsencode(tree / "train" / name) == odd
    row = stored.index(escaped)
    twin = stored.index(f"n01/{os.fsdecode(first)}")
    assert g["ok"][row] == 1
    assert_same_image(g["features"][row], g["features"][twin])
    assert D.stored_name("n01/plain é.JPEG") == "n01/plain é.JPEG"


# ---------------------------------------------------------------------------------------------
# the machine fails: a full disk


DISK_FULL = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
    import extract_features
    sys.exit(extract_features.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("limit", [300, 20_000])
def test_a_full_disk_is_one_line_and_the_rerun_finishes(tmp_path, tree, ckpt, limit):
    """A write that fails (here: past a file-size limit, at store creation or in the middle of
    the chunks) ends the run with one line; the same command, with room, finishes the store."""
    out = tmp_path / "f.zarr"
    args = extract_args(ckpt, tree, out)
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(limit), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "too large" in lines[0], lines
    assert not list(tmp_path.glob(".f.zarr.creating-*"))
    assert extract_features.main(args) == 0
    clean = tmp_path / "clean.zarr"
    assert extract_features.main(extract_args(ckpt, tree, clean)) == 0
    a, b = zarr.open_group(str(out)), zarr.open_group(str(clean))
    for split in ("train", "val"):
        assert a[split]["features"][:].tobytes() == b[split]["features"][:].tobytes()


def test_what_a_killed_creation_left_is_cleaned(tmp_path, tree, ckpt):
    for name in (".f.zarr.creating-99999", ".f.zarr.old-99998"):
        (tmp_path / name / "train").mkdir(parents=True)
    (tmp_path / ".f.zarr.lock").write_text("{}")  # a killed run's lock file: not held
    assert extract_features.main(extract_args(ckpt, tree, tmp_path / "f.zarr")) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".f.zarr")) == []


@pytest.mark.parametrize("damage", ["garbage", "deleted"])
def test_a_store_whose_root_metadata_is_lost_is_restored_from_its_splits(
        finished, tree, ckpt, capsys, tmp_path, damage):
    out, pristine = finished
    meta = out / "zarr.json"
    meta.write_bytes(b"\x00\xff\xfe garbage") if damage == "garbage" else meta.unlink()
    (out / "val/features/c/0/0").unlink()  # and a chunk, repaired in the same run
    capsys.readouterr()
    assert train_head.main(["--features", str(out), "--out", str(tmp_path / "h.pt")]) == 2
    (line,) = errors(capsys)
    assert "root metadata (zarr.json) is missing or unreadable" in line
    # other settings cannot claim it: only --overwrite makes it anew
    assert extract_features.main(extract_args(ckpt, tree, out, "--crop", "40")) == 2
    (line,) = errors(capsys)
    assert "root metadata (zarr.json) is missing or unreadable" in line and "--overwrite" in line
    # the same command: its splits record these inputs, so the root is written again
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    assert "lost its root metadata" in capsys.readouterr().err
    got, want = all_files(out), all_files(pristine)
    assert got.keys() == want.keys()
    assert {k: v for k, v in got.items() if k != "zarr.json"} == \
        {k: v for k, v in want.items() if k != "zarr.json"}
    assert S.open_store(out).attrs["fingerprint"] == S.open_store(pristine).attrs["fingerprint"]
    assert train_head.main(["--features", str(out), "--out", str(tmp_path / "h.pt")]) == 0


def test_link_loops_are_followed_once(tmp_path, tree, ckpt, capsys):
    folder = tree / "train" / "n01"
    n = len(list(folder.iterdir()))
    (folder / "a").symlink_to(".")
    (folder / "b").symlink_to(".")
    (tree / "train" / "n02" / "elsewhere").symlink_to(folder)
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    files = list(S.open_store(out)["train"]["files"][:])
    assert sum(f.startswith("n01/") for f in files) == n and len(files) == len(set(files))
    assert "3 linked folder(s) lead to folders already scanned" in capsys.readouterr().err


def test_a_class_order_that_is_not_utf8_is_one_line(tmp_path, tree, ckpt, capsys):
    order = tmp_path / "order.txt"
    order.write_bytes(b"n01\nn0\xff2\nn03\n")
    rc = extract_features.main(extract_args(ckpt, tree, tmp_path / "f.zarr", "--class-order",
                                            str(order)))
    (line,) = errors(capsys)
    assert rc == 2 and "is not UTF-8 text" in line


def test_an_out_below_a_file_is_one_line(tmp_path, tree, ckpt, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out)) == 2
    (line,) = errors(capsys)
    assert "a part of the path is a file, not a folder" in line


def test_a_store_of_another_layout_version_is_refused_then_replaced(finished, tree, ckpt,
                                                                     capsys):
    """A store written by an older version: refused in one line naming --overwrite, which
    replaces it (it used to be refused again: the version was checked before --overwrite)."""
    import json

    out, _ = finished
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 1
    (out / "zarr.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert extract_features.main(extract_args(ckpt, tree, out)) == 2
    (line,) = errors(capsys)
    assert "has layout version 1" in line and "extract_features.py with --overwrite" in line
    assert extract_features.main(extract_args(ckpt, tree, out, "--overwrite")) == 0
    assert "replacing" in capsys.readouterr().err
    assert S.open_store(out).attrs["format_version"] == S.FORMAT_VERSION
    assert not S.check_store(S.open_store(out))
