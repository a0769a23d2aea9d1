"""Writing outputs so that nothing is ever half-written, and choosing the device.

`atomic_write` is the one place that writes a file: a temp file beside the target, fsync,
an optional check of the written file, `os.replace`, fsync of the folder. A reader sees the old
file or the new one, never a part; a kill leaves at most a temp file, which the next write to
the same target removes (when its writer is gone). A full disk, a quota, a file-size limit, a
read-only file system or a folder this user may not write is one line naming the file, the
system's reason and what to do, not a traceback.
"""

from __future__ import annotations

import errno
import glob
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import DataError, QuickFixError, first_line, ref


class WriteError(QuickFixError):
    """An output could not be written (full disk, quota, permissions)."""


def atomic_write(path: Path, write: Callable[[BinaryIO], None], *,
                 check: Callable[[Path], None] | None = None, what: str = "",
                 errors: tuple[type[BaseException], ...] = ()) -> None:
    """Write `path` with `write(file)`; `check(temp_path)` may raise to keep the old file.

    OSError, torch.save's RuntimeError and `errors` (a writer's own I/O error type) become one
    WriteError line; whatever happens, no temp file is left."""
    failures = (OSError, RuntimeError, *errors)  # torch.save reports ENOSPC as RuntimeError
    if path.is_dir():
        raise WriteError(f"cannot write {path}: it is a directory; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
    except OSError as exc:
        raise _write_failure(path, exc, what) from exc
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except failures as exc:
            raise _write_failure(path, exc, what) from exc
        if check is not None:
            check(tmp)
        try:
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            raise _write_failure(path, exc, what) from exc
    except BaseException:
        if tmp.exists():  # a read-only file system refuses even to unlink a missing file
            tmp.unlink()
        raise


# What to do when a write fails, by errno (the system's own words come first in the line).
_WRITE_ADVICE = {
    errno.ENOSPC: "free space on that file system, or write it elsewhere",
    errno.EDQUOT: "free space within your quota, or write it elsewhere",
    errno.EFBIG: "the file system or this process's file-size limit (ulimit -f) does not allow "
                 "a file this large: write it elsewhere, or raise the limit",
    errno.EROFS: "write it to a writable file system",
    errno.EACCES: "this user may not write in {folder}: write it elsewhere, or change the "
                  "folder's permissions",
    errno.EPERM: "this user may not write in {folder}: write it elsewhere, or change the "
                 "folder's permissions",
    errno.EIO: "the disk or network file system failed: check it, then rerun",
    errno.EEXIST: "a part of the path is a file, not a folder: choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
}


def _write_failure(path: Path, exc: BaseException, what: str) -> WriteError:
    cause = _os_error(exc)
    if cause is None:
        return WriteError(f"cannot write {path}: {first_line(exc)}{what}")
    return WriteError(f"cannot write {path}: {explain(cause, path.parent)}{what}")


def explain(exc: OSError, folder: Path | str | None = None) -> str:
    """The system's words for a failed write and what to do ("No space left on device; free
    space on that file system, or write it elsewhere")."""
    advice = _WRITE_ADVICE.get(exc.errno)
    if advice and "{folder}" in advice:
        advice = advice.format(folder=folder or "that folder")
    return f"{exc.strerror or exc}{f'; {advice}' if advice else ''}"


def _os_error(exc: BaseException | None) -> OSError | None:
    """The system's error behind `exc`. torch.save reports a failed write as a RuntimeError
    ("[enforce fail at inline_container.cc] unexpected pos") raised while the file object's
    OSError is being handled; safetensors (Rust) puts the errno in its message."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc
        code = re.search(r"\b(?:os error |code: )(\d+)", str(exc))  # Display, Debug
        if code:
            number = int(code.group(1))
            return OSError(number, os.strerror(number))
        exc = exc.__cause__ or exc.__context__
    return None


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(path: Path) -> None:
    """Temp files of `path` left by writers that were killed (their process is gone)."""
    for stale in glob.glob(glob.escape(str(path.parent / f".{path.name}.tmp-")) + "*"):
        pid = stale.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            Path(stale).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve_device(name: str) -> torch.device:
    """--device auto|cpu|cuda as a torch.device; under torchrun, the GPU of this LOCAL_RANK.

    `cuda` without a usable GPU is refused (never a silent fall-back to the CPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise DataError(f"{ref('device', name)}: expected auto, cpu or cuda")
    if not torch.cuda.is_available():
        raise DataError(f"{ref('device', 'cuda')} was given but no CUDA device is available; "
                        f"use {ref('device', 'cpu')}")
    local = os.environ.get("LOCAL_RANK", "0")
    index = int(local) if local.isdigit() else 0
    # cuBLAS needs this for bit-identical reruns of stage 2, set before its first use, which in
    # quickfix-labels can be stage 1's
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    count = torch.cuda.device_count()
    if index >= count:
        raise DataError(f"LOCAL_RANK={index} but this machine has {count} CUDA device(s): "
                        "start at most that many processes per node")
    return torch.device("cuda", index)
