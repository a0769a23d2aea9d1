"""pipeline/files.py: the one atomic-write helper and the one device resolver."""

import pytest
import torch

from pipeline.errors import DataError
from pipeline.files import WriteError, atomic_write, resolve_device


def test_atomic_write_keeps_the_old_file_and_no_temp_on_any_failure(tmp_path):
    out = tmp_path / "head.pt"
    out.write_bytes(b"old")

    def broken(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=f"cannot write {out}: .*No space left"):
        atomic_write(out, broken)
    with pytest.raises(ValueError):  # a failed check keeps the old file too
        atomic_write(out, lambda f: f.write(b"new"), check=lambda p: (_ for _ in ()).throw(
            ValueError("not as written")))
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "head.pt"]
    with pytest.raises(WriteError, match="is a directory"):
        atomic_write(tmp_path, lambda f: f.write(b"x"))
    stale = tmp_path / ".head.pt.tmp-999999999"  # left by a killed writer (no such process)
    stale.write_bytes(b"x")
    atomic_write(out, lambda f: f.write(b"new"))
    assert out.read_bytes() == b"new" and not stale.exists()


def test_device_resolution_is_the_same_everywhere(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(DataError, match="no CUDA device is available"):
            resolve_device("cuda")
    elif torch.cuda.device_count() <= 3:
        with pytest.raises(DataError, match="LOCAL_RANK=3"):
            resolve_device("cuda")
    with pytest.raises(DataError, match="expected auto, cpu or cuda"):
        resolve_device("tpu")
