"""Loader and environment failures through the real scripts: one line that names the path, the
cause and what to do, exit code 2, nothing half-written, and a hostile pickle never run.

Every file here is made by the test: a real checkpoint, store and head from stages 1 and 2 (the
inputs that must load), and files torch.save wrote and the test then cut, flipped, replaced or
filled with a pickled payload that would leave a marker file if it ever ran.
"""

import argparse
import os
import pathlib
import pickle
import shutil
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import extract_features
import stitch_checkpoint
import train_head
from pipeline.files import _write_failure

from .conftest import jpeg_bytes, make_tree
from .test_stitch import run_stages

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stages(tmp_path_factory, photos):
    """A checkpoint, its feature store and its head, made once for the module."""
    root = tmp_path_factory.mktemp("stages")
    tree = make_tree(root / "data", photos)
    _, ckpt, store, head = run_stages(root, tree, epochs="1")
    return argparse.Namespace(tree=tree, ckpt=ckpt, store=store, head=head)


class _System:
    """Unpickling it calls os.system (pickled as posix.system), which creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _small() -> dict:
    return {"state_dict": {"fc.weight": torch.randn(64, 64)}, "epoch": 3,
            "args": argparse.Namespace(arch="resnet18")}


def _record_offset(path: Path, name: str) -> int:
    """Where the data of the zip record ending in `name` starts."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(name))
    data = path.read_bytes()
    n, m = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + n + m


def _make(path: Path, kind: str) -> None:
    """A file of `kind` at `path` that torch.load cannot read (or a directory, or nothing)."""
    if kind == "missing":
        return
    if kind == "broken link":
        path.symlink_to(path.parent / "gone.pth")
        return
    if kind == "directory":
        path.mkdir()
        torch.save(_small(), path / "last.pth")
        return
    contents = {
        "empty": b"",
        "text": b"checkpoint saved at epoch 90\n",  # starts with "c": a pickle GLOBAL to torch
        "html": b"<!DOCTYPE html>\n<html><head><title>Google Drive</title></head></html>\n",
        "lfs pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\n"
                       b"size 46830571\n",
        "random bytes": np.random.default_rng(0).bytes(4096),
        "plain pickle": pickle.dumps({"fc.weight": [0.0] * 8}),
    }
    if kind in contents:
        path.write_bytes(contents[kind])
        return
    if kind == "jpeg":
        path.write_bytes(jpeg_bytes(np.full((16, 16, 3), 128, np.uint8)))
        return
    if kind == "zip not torch":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("weights/readme.txt", "the weights are elsewhere")
        return
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
        return
    if kind == "protocol 4":
        torch.save(_small(), path, pickle_protocol=4)
        return
    if kind == "global":
        torch.save({**_small(), "log_dir": pathlib.PurePosixPath("/runs/1")}, path)
        return
    legacy = kind.startswith("legacy")
    torch.save(_small(), path, _use_new_zipfile_serialization=not legacy)
    data = bytearray(path.read_bytes())
    if kind in ("zip cut in half", "legacy cut in half"):
        del data[len(data) // 2:]
    elif kind == "zip cut at the end":
        del data[-10:]
    elif kind == "zip directory damaged":
        start = data.rfind(b"PK\x01\x02")
        data[start:start + 4] = b"XXXX"
    elif kind == "zip record damaged":
        data[_record_offset(path, "data.pkl") + 2] ^= 0xFF
    else:
        raise AssertionError(kind)
    path.write_bytes(bytes(data))


# kind -> what the error line must say about it
CHECKPOINT_CASES = {
    "missing": "does not exist; check the path",
    "broken link": "is a link to",
    "directory": "is a directory; pass the file inside it (it holds last.pth)",
    "empty": "is empty (0 bytes); re-copy it from its source",
    "text": "is not a file torch.save wrote: it is text ('checkpoint saved at epoch 90')",
    "html": "is not a file torch.save wrote: it is an HTML or XML page",
    "lfs pointer": "is not a file torch.save wrote: it is a Git LFS pointer",
    "jpeg": "is not a file torch.save wrote: it is a JPEG image",
    "random bytes": "is not a file torch.save wrote: it is data of an unknown format",
    "plain pickle": "is not a file torch.save wrote: it is a Python pickle",
    "zip not torch": "is a zip archive that torch.save did not write (no data.pkl; it holds "
                     "weights/readme.txt)",
    "torchscript": "is a TorchScript archive (torch.jit.save)",
    "zip cut in half": "is cut short (",
    "zip cut at the end": "is cut short (",
    "legacy cut in half": "is cut short (",
    "zip directory damaged": "is a damaged zip archive (Bad magic number for central directory)",
    "zip record damaged": "is damaged: its record",
    "protocol 4": "was written with pickle protocol 4 or later",
    "global": "refers to pathlib.PurePosixPath, which is not on the safe-loading allowlist",
}


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("kind", list(CHECKPOINT_CASES))
def test_a_checkpoint_that_does_not_load_says_why(stages, tmp_path, capsys, kind):
    path = tmp_path / "checkpoint.pth"
    _make(path, kind)
    out = tmp_path / "fixed.pth"
    rc = stitch_checkpoint.main(["--checkpoint", str(path), "--head", str(stages.head),
                                 "--out", str(out)])
    line = _error_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"error: checkpoint {path} ") or \
        line.startswith(f"error: cannot read checkpoint {path}"), line
    assert CHECKPOINT_CASES[kind] in line, line
    # only a global outside the allowlist points at --trust-checkpoint, and says what it does
    if kind == "global":
        assert "--trust-checkpoint, which runs any code the file holds" in line
    else:
        assert "--trust-checkpoint" not in line, line
    assert not out.exists() and not list(tmp_path.glob(".*tmp-*"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_os_system_is_named_and_never_runs_in_any_script(stages, tmp_path, capsys, legacy):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({**_small(), "payload": _System(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    runs = {
        "extract": lambda: extract_features.main(["--checkpoint", str(path), "--data-root",
                                                  str(stages.tree), "--out",
                                                  str(tmp_path / "f.zarr")]),
        "train": lambda: train_head.main(["--features", str(stages.store), "--checkpoint",
                                          str(path), "--out", str(tmp_path / "head.pt")]),
        "stitch": lambda: stitch_checkpoint.main(["--checkpoint", str(path), "--head",
                                                  str(stages.head), "--out",
                                                  str(tmp_path / "fixed.pth")]),
    }
    for name, run in runs.items():
        rc = run()
        line = _error_line(capsys.readouterr().err)
        assert rc == 2, name
        assert f"checkpoint {path} refers to {os.system.__module__}.system, which runs code or " \
               "commands" in line, line
        assert "nothing ran" in line and "--trust-checkpoint would run it" in line, line
        assert not marker.exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pth"]


HEAD_CASES = {
    "missing": "does not exist; run train_head.py first, and pass the file train_head.py's "
               "--out wrote",
    "empty": "is empty (0 bytes)",
    "directory": "is a directory",
    "text": "is not a file torch.save wrote: it is text",
    "cut in half": "is cut short (",
    "callable": "refers to builtins.print, which a head written by train_head.py never holds; "
                "nothing in it was run",
    "os.system": f"refers to {os.system.__module__}.system, which a head written by "
                 "train_head.py never holds",
    "a checkpoint": "is not a head written by train_head.py (it has no weight, bias, classes, "
                    "store, config, metrics; it looks like a checkpoint, which goes to "
                    "--checkpoint)",
    "no store": "is not a head written by train_head.py (it has no store)",
    "wrong bias": "is not a head written by train_head.py (its bias is not a vector of 3 "
                  "values)",
}


@pytest.mark.parametrize("kind", list(HEAD_CASES))
def test_a_head_file_that_is_not_a_head_says_why(stages, tmp_path, capsys, kind):
    path = tmp_path / "head.pt"
    marker = tmp_path / "marker"
    payload = torch.load(stages.head, weights_only=True)
    if kind in ("missing", "empty", "directory", "text"):
        _make(path, kind)
    elif kind == "cut in half":
        data = stages.head.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "callable":
        torch.save({**payload, "hook": print}, path)
    elif kind == "os.system":
        torch.save({**payload, "hook": _System(marker)}, path)
    elif kind == "a checkpoint":
        shutil.copy(stages.ckpt, path)
    elif kind == "no store":
        torch.save({k: v for k, v in payload.items() if k != "store"}, path)
    else:
        torch.save({**payload, "bias": torch.zeros(2)}, path)
    out = tmp_path / "fixed.pth"
    rc = stitch_checkpoint.main(["--checkpoint", str(stages.ckpt), "--head", str(path),
                                 "--out", str(out)])
    line = _error_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"error: head file {path} "), line
    assert HEAD_CASES[kind] in line, line
    assert "--trust-checkpoint" not in line, line  # it never applies to a head file
    assert not marker.exists()
    assert not out.exists() and not list(tmp_path.glob(".*tmp-*"))


STITCH = "import sys, stitch_checkpoint; sys.exit(stitch_checkpoint.main(sys.argv[1:]))"


def test_a_full_disk_is_named_as_such(tmp_path):
    """torch.save's write error on a full device (/dev/full) is a RuntimeError raised while the
    OSError is handled: the line gives the system's reason, not the RuntimeError's."""
    if not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)):
        pytest.skip("no /dev/full device on this system")  # never create a file in its place
    with pytest.raises((OSError, RuntimeError)) as info, open("/dev/full", "wb") as f:
        torch.save(_small(), f)
    out = tmp_path / "fixed.pth"
    assert str(_write_failure(out, info.value, "; the original is untouched")) == (
        f"cannot write {out}: No space left on device; free space on that file system, or "
        "write it elsewhere; the original is untouched")


def _private_tmpfs(options: str, mount: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Run stitch with a tmpfs of `options` at `mount`, in a mount namespace of its own (gone
    with the process), then list what the mount holds (on stdout)."""
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; shift 2; "$@"; rc=$?; ls -A "$0"; ' \
             'exit $rc'
    return subprocess.run(["unshare", "--mount", "sh", "-c", script, str(mount), options,
                           str(mount), sys.executable, "-c", STITCH, *argv],
                          cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.parametrize("options,reason", [
    ("size=1m", "No space left on device; free space on that file system, or write it "
                "elsewhere"),
    ("ro,size=1m", "Read-only file system; write it to a writable file system"),
], ids=["disk full", "read-only"])
def test_a_full_or_read_only_file_system_is_one_line(stages, tmp_path, options, reason):
    mount = tmp_path / "mnt"
    mount.mkdir()
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{mount}'"],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a private tmpfs here (needs unshare and CAP_SYS_ADMIN)")
    out = mount / "fixed.pth"
    proc = _private_tmpfs(options, mount, ["--checkpoint", str(stages.ckpt), "--head",
                                           str(stages.head), "--out", str(out)])
    assert proc.returncode == 2, proc.stderr
    line = _error_line(proc.stderr)
    assert line == f"error: cannot write {out}: {reason}; the original is untouched", line
    assert proc.stdout == ""  # the tmpfs held nothing afterwards: no temp file, no output


def test_permission_denied_on_read_and_on_write(stages, tmp_path):
    """A checkpoint this user may not read, an output folder it may not write. Root reads and
    writes anything, so as root the run drops the capabilities that let it (setpriv); skipped
    only where neither works."""
    drop = (["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
            if os.geteuid() == 0 and shutil.which("setpriv") else [])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    probe = subprocess.run([*drop, sys.executable, "-c", f"open('{locked}/probe', 'w')"],
                           capture_output=True)
    if probe.returncode == 0:
        (locked / "probe").unlink()
        locked.chmod(0o755)
        pytest.skip("this user writes in a read-only folder (root, and no setpriv to drop that)")
    secret = tmp_path / "secret.pth"
    shutil.copy(stages.ckpt, secret)
    secret.chmod(0o000)

    def stitch(checkpoint: Path, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([*drop, sys.executable, "-c", STITCH, "--checkpoint",
                               str(checkpoint), "--head", str(stages.head), "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))

    proc = stitch(secret, tmp_path / "fixed.pth")
    assert proc.returncode == 2, proc.stderr
    assert _error_line(proc.stderr) == (
        f"error: cannot read checkpoint {secret}: permission denied; make it (and the folders "
        "above it) readable by this user, or copy it somewhere you can read")
    out = locked / "fixed.pth"
    proc = stitch(stages.ckpt, out)
    assert proc.returncode == 2, proc.stderr
    assert _error_line(proc.stderr) == (
        f"error: cannot write {out}: Permission denied; this user may not write in {locked}: "
        "write it elsewhere, or change the folder's permissions; the original is untouched")
    assert list(locked.iterdir()) == [] and not (tmp_path / "fixed.pth").exists()
    locked.chmod(0o755)  # so that pytest can remove it
