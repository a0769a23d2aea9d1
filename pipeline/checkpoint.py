"""Load training-script checkpoints safely and find the model weights inside them.

Checkpoints come in many layouts (see DESIGN.md and the README's "Checkpoint layouts
understood"): a raw state dict (torch or safetensors), or a dict holding it under `state_dict`,
`model_state_dict`, `model` or `net`, maybe an EMA copy, optimizer state, `args` (an
argparse.Namespace), numpy scalars, a class mapping. Keys may carry `module.` (DataParallel, DDP,
torch.optim.swa_utils.AveragedModel) or `_orig_mod.` (torch.compile) prefixes, and a PyTorch
Lightning checkpoint prefixes them with the LightningModule's attribute (`model.`, `net.`...).

Every copy of the model inside the file is a `Container`: where it is, the prefix its keys carry,
and the keys that are not the model's (an AveragedModel's `n_averaged`). Stage 1 reads one
container; stage 3 writes the new head into all of them.

Loading is `weights_only=True` with a narrow allowlist (safetensors holds no pickle at all).
Unsafe unpickling happens only when the user passes --trust-checkpoint; it is never a fallback.
A file that does not load is explained from the file itself (not a checkpoint, cut short, a
damaged zip, a global outside the allowlist, named), in one line; head files from
train_head.py go through the same boundary.
"""

from __future__ import annotations

import argparse
import codecs
import errno
import hashlib
import json
import logging
import math
import mmap
import os
import re
import stat
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, first_line, ref

TRAIN = ref("cmd.train")
TRUST = ref("trust_checkpoint")

log = logging.getLogger("quickfix")

# Where training scripts put the weights, in the order we look for them.
MODEL_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "network")
EMA_KEYS = ("model_ema", "state_dict_ema", "ema_state_dict", "ema", "ema_model")
PREFIXES = ("module.", "_orig_mod.")
# Entries of a weights dict that are not the model's: torch.optim.swa_utils.AveragedModel (the
# EMA of torchvision's references) keeps its update count beside the `module.*` weights.
EXTRA_KEYS = ("n_averaged",)
# A LightningModule holding several sub-modules: the attribute that is most likely the
# classifier, in this order.
LIGHTNING_ATTRS = ("model", "net", "network", "classifier", "module", "student")
SAFETENSORS = "safetensors"


def _safe_globals() -> list:
    """The allowlist: argparse.Namespace, numpy scalars, dtypes and arrays (numpy-1 names too).

    All of these rebuild plain data; none of them can run code.
    """
    multiarray = np._core.multiarray
    allowed: list = [
        argparse.Namespace,
        np.dtype,
        np.ndarray,
        multiarray.scalar,
        multiarray._reconstruct,
        # Pickles written under numpy 1.x name the same functions under numpy.core.
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    ]
    allowed += [
        getattr(np.dtypes, name) for name in np.dtypes.__all__ if name.endswith("DType")
    ]
    return allowed


@dataclass
class Container:
    """One copy of the model's weights inside a checkpoint.

    `path` leads from the top of the file to the weights dict (() for a bare state dict);
    every model key there is `prefix + name`; `extra` are the dict's keys that are not the
    model's (kept as they are).
    """

    path: tuple[str, ...]
    prefix: str
    extra: tuple[str, ...] = ()

    def label(self) -> str:
        return "/".join(self.path) or "state dict"


@dataclass
class Checkpoint:
    """What stage 1 needs from a checkpoint, plus where it came from (stage 3 writes it back)."""

    path: Path
    raw: Any
    state_dict: dict[str, torch.Tensor]
    source_key: str | None  # None: the file is a raw state dict
    prefix: str  # the prefix stripped from every key, e.g. "module."
    arch: str | None
    classes: list[str] | None  # the checkpoint's own index -> class mapping, if any
    args: dict[str, Any] = field(default_factory=dict)
    layout: str = "state-dict"  # see LAYOUTS
    format: str = "torch"  # "torch" (torch.save) or "safetensors"
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata
    use_ema: bool = False
    copies: list[Container] = field(default_factory=list)  # every copy of the model
    recorded: tuple[float, str] | None = None  # the top-1 it records reaching, and its key


# What each layout is, for logs and the README.
LAYOUTS = {
    "state-dict": "a bare state dict (torch.save(model.state_dict()))",
    "safetensors": "a bare state dict in a .safetensors file",
    "lightning": "a PyTorch Lightning checkpoint",
    "timm": "a timm train.py checkpoint",
    "training-script": "a training script's checkpoint dict",
}


def load_checkpoint(path: Path, *, trust: bool = False, use_ema: bool | None = False
                    ) -> Checkpoint:
    """Read `path` and pull out a clean state dict, the architecture hint and class mapping.

    `use_ema=None` picks what the checkpoint's own ecosystem loads by default: timm's
    `load_checkpoint` and `create_model(checkpoint_path=...)` take `state_dict_ema` when present;
    everything else, the model.
    """
    metadata: dict[str, str] = {}
    if is_safetensors(path):
        raw, metadata = load_safetensors(path)
        fmt = SAFETENSORS
    else:
        raw, fmt = torch_load(path, trust=trust), "torch"
    if isinstance(raw, torch.nn.Module):
        raw = {"state_dict": raw.state_dict()}
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(raw).__name__}, not a state dict or a dict of training state; "
            "expected what torch.save(model.state_dict()) or a training script writes"
        )
    layout = _layout(raw, fmt)
    if use_ema is None:
        use_ema = layout == "timm" and is_weights(raw.get("state_dict_ema"))
        if use_ema:
            log.info("timm checkpoint with state_dict_ema: using the EMA weights, as timm's "
                     "loader does (%s for the others)", ref("extract.ema", negate=True))
    source_key, weights = _find_weights(raw, use_ema=use_ema, path=path)
    if isinstance(weights, torch.nn.Module):
        weights = weights.state_dict()
    lightning = layout == "lightning"
    state_dict, prefix = strip_prefixes(weights, lightning=lightning, path=path)
    if lightning and prefix:
        log.info("Lightning checkpoint: the model is the LightningModule's `%s`",
                 prefix.split(".", 1)[0])

    args = _args_dict(raw.get("args")) if source_key is not None else {}
    if lightning:
        args = {**_args_dict(raw.get("hyper_parameters")), **args}
    arch = raw.get("arch") if source_key is not None else metadata.get("arch")
    if not isinstance(arch, str) or not arch:
        arch = args.get("arch") or args.get("model") or args.get("model_name")
        arch = arch if isinstance(arch, str) and arch else None
    if layout == "timm" and arch is not None and not arch.startswith("timm:"):
        arch = f"timm:{arch}"  # timm's train.py records timm's own model name
    classes = class_mapping(raw) if source_key is not None else _metadata_classes(metadata)
    return Checkpoint(
        path=path,
        raw=raw,
        state_dict=state_dict,
        source_key=source_key,
        prefix=prefix,
        arch=arch,
        classes=classes,
        args=args,
        layout=layout,
        format=fmt,
        metadata=metadata,
        use_ema=use_ema,
        copies=containers(raw, lightning=lightning, path=path),
        recorded=recorded_accuracy(raw, layout, args),
    )


def _layout(raw: Mapping, fmt: str) -> str:
    if fmt == SAFETENSORS:
        return "safetensors"
    if is_state_dict(raw):
        return "state-dict"
    if "pytorch-lightning_version" in raw:
        return "lightning"
    if "state_dict" in raw and "version" in raw and "arch" in raw:
        return "timm"  # timm.utils.CheckpointSaver: epoch, arch, state_dict, optimizer, version
    return "training-script"


def is_safetensors(path: Path) -> bool:
    """The safetensors format: an 8-byte little-endian header length, then a JSON header."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            head = f.read(9)
            size = path.stat().st_size
    except OSError:
        return False
    named = path.suffix == ".safetensors"
    if len(head) < 9 or head[8:9] != b"{":
        # named so but not a torch file (a zip, or a pickle's 0x80): a damaged safetensors file
        return named and not (head[:2] == b"PK" or head[:1] == b"\x80")
    (n,) = struct.unpack("<Q", head[:8])
    return named or 2 <= n <= size  # a truncated .safetensors file is still reported as one


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the header metadata of a .safetensors file (no pickle involved)."""
    _check_file(path, "checkpoint", "check the path")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except ImportError as exc:
        raise CheckpointError(f"{path} is a safetensors file: pip install safetensors") from exc
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(_explain_safetensors_failure(path, exc)) from exc
    if not tensors:
        raise CheckpointError(f"{path} is a safetensors file with no tensors")
    return tensors, metadata


def _explain_safetensors_failure(path: Path, exc: Exception) -> str:
    """Not a safetensors file at all (a Git LFS pointer, an HTML page), one cut short, or one
    damaged otherwise: safetensors says "header too large" for all of the first."""
    with open(path, "rb") as f:
        head = f.read(512)
    looks = None if head[8:9] == b"{" else _looks_like(head)
    if looks is not None:
        return (f"checkpoint {path} is not a safetensors file: it is {looks}; pass "
                f"{_WANTED['checkpoint']}")
    size = path.stat().st_size
    expected = _safetensors_length(path, size)
    if expected is not None and size < expected:
        return (f"checkpoint {path} is a damaged safetensors file: cut short ({size:,} of "
                f"{expected:,} bytes); re-copy it from its source")
    return f"checkpoint {path} is a damaged safetensors file ({first_line(exc)}); re-copy it"


def _safetensors_length(path: Path, size: int) -> int | None:
    """The length a safetensors file's header says the file has; None when the header cannot
    tell (safetensors refuses headers over 100 MB: a larger length is not a header)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                return None
            if 8 + n > size:
                return 8 + n
            header = json.loads(f.read(n))
        return 8 + n + max((v["data_offsets"][1] for k, v in header.items()
                            if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return None


def _metadata_classes(metadata: Mapping[str, str]) -> list[str] | None:
    """safetensors metadata holds strings only: the class mapping travels as JSON text."""
    text = metadata.get("id_to_class")
    if not text:
        return None
    try:
        return class_mapping({"id_to_class": json.loads(text)})
    except ValueError:
        return None


def torch_load(path: Path, *, trust: bool) -> Any:
    _check_file(path, "checkpoint", "check the path")
    if trust:
        log.warning("loading %s with full unpickling (%s)", path, TRUST)
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        return safe_load(path)
    except Exception as exc:  # torch raises many types; _explain_load_failure sorts them out
        raise CheckpointError(_explain_load_failure(
            path, exc, "checkpoint", lambda name: _checkpoint_global(path, name))) from exc


def safe_load(path: Path) -> Any:
    """`torch.load(weights_only=True)` with this project's allowlist; raises torch's errors.

    Use it to read a fixed checkpoint whose original held numpy scalars or an
    argparse.Namespace (plain `weights_only=True` refuses those).
    """
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


# What a head file written by train_head.py holds (stitch reads all of these).
HEAD_KEYS = ("weight", "bias", "classes", "store", "config", "metrics")
HEAD_STORE_KEYS = ("path", "fingerprint", "backbone_sha256", "arch", "head")


def load_head(path: Path) -> dict:
    """A head file written by train_head.py, through the same error boundary as a checkpoint.

    Safe loading only: a head holds plain types and tensors, so --trust-checkpoint never
    applies to it. A file that loads but is not a head (a checkpoint passed as --head) is
    refused here, not with a KeyError later.
    """
    _check_file(path, "head file", f"run {TRAIN} first, and pass {_WANTED['head file']}")
    try:
        raw = safe_load(path)
    except Exception as exc:  # as in torch_load
        raise CheckpointError(_explain_load_failure(
            path, exc, "head file", lambda name: _head_global(path, name))) from exc
    problem = _head_problem(raw)
    if problem is not None:
        raise CheckpointError(f"head file {path} is not a head written by {TRAIN} "
                              f"({problem}); pass {_WANTED['head file']}")
    return raw


def _head_problem(raw: Any) -> str | None:
    if not isinstance(raw, Mapping):
        return f"it holds a {type(raw).__name__}"
    absent = [k for k in HEAD_KEYS if k not in raw]
    if absent:
        checkpoint = is_state_dict(raw) or any(k in raw for k in MODEL_KEYS + EMA_KEYS)
        return (f"it has no {', '.join(absent)}"
                + (f"; it looks like a checkpoint, which goes to {ref('stitch.checkpoint')}"
                   if checkpoint else ""))
    weight, bias, classes, store = (raw[k] for k in ("weight", "bias", "classes", "store"))
    if not (isinstance(weight, torch.Tensor) and weight.ndim == 2
            and weight.is_floating_point()):
        return "its weight is not a matrix of floats"
    rows = weight.shape[0]
    if not (isinstance(bias, torch.Tensor) and tuple(bias.shape) == (rows,)):
        return f"its bias is not a vector of {rows} values"
    if not (isinstance(classes, (list, tuple)) and len(classes) == rows
            and all(isinstance(c, str) for c in classes)):
        return f"its classes are not {rows} class names"
    if not (isinstance(store, Mapping) and all(k in store for k in HEAD_STORE_KEYS)):
        return "its record of the feature store is incomplete"
    if not (isinstance(raw["config"], Mapping) and isinstance(raw["metrics"], Mapping)):
        return "its config or metrics are not records"
    return None


# --- why a file could not be loaded ------------------------------------------------------------

# torch.save's two formats: a zip archive (torch >= 1.6), or the legacy one, a series of pickles
# whose first is this number.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
# Files that are often passed where a checkpoint is expected, by their first bytes.
_LOOKALIKES = (
    (b"version https://git-lfs", "a Git LFS pointer, not the file (run `git lfs pull` in the "
                                 "repository it came from)"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"\x89HDF", "an HDF5 file (Keras or TensorFlow weights?)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x1f\x8b", "gzip-compressed data (decompress it first)"),
)
# What to pass instead of a file that is not one, by what it was given as.
_WANTED = {"checkpoint": "the checkpoint your training script saved",
           "head file": f"the file {TRAIN}'s {ref('train.out')} wrote"}
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors", ".tar")
# Read errors of the machine, not of the file's content.
_READ_ERRNOS = (errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT, errno.ESTALE)
# Globals that exist to run code or commands: a checkpoint naming one is not a plain mistake.
_CODE_MODULES = {"os", "posix", "nt", "subprocess", "runpy", "pty", "socket", "shutil",
                 "ctypes", "importlib", "code", "sys", "webbrowser"}
_CODE_BUILTINS = {"eval", "exec", "compile", "open", "getattr", "setattr", "__import__",
                  "breakpoint", "apply"}


def _check_file(path: Path, what: str, missing: str) -> None:
    """Refuse a path that is not a non-empty regular file this process can read, each with its
    own line: torch.load reports them as something else (an empty file as a pickle error)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise CheckpointError(f"{what} {path} is a link to {os.readlink(path)}, which does "
                                  f"not exist; {missing}") from None
        raise CheckpointError(f"{what} {path} does not exist; {missing}") from None
    except OSError as exc:  # a folder above it this user may not enter, an I/O error
        raise CheckpointError(_read_failure(path, what, exc)) from exc
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{what} {path} is a directory; pass the file inside it"
                              f"{_files_inside(path)}")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what} {path} is not a regular file (a pipe or a device); "
                              "save it to a file and pass that")
    if st.st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes); re-copy it from its source")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise CheckpointError(_read_failure(path, what, exc)) from exc


def _read_failure(path: Path, what: str, exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"cannot read {what} {path}: permission denied; make it (and the folders above "
                "it) readable by this user, or copy it somewhere you can read")
    return (f"cannot read {what} {path}: {exc.strerror or exc}; check the disk or network file "
            "system it is on, or copy it to a local disk")


def _files_inside(folder: Path) -> str:
    try:
        names = sorted(p.name for p in folder.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)
    except OSError:
        return ""
    if not names:
        return ""
    return f" (it holds {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"


def _explain_load_failure(path: Path, exc: Exception, what: str,
                          on_global: Callable[[str], str]) -> str:
    """One line on why torch.load could not read `path`: judged from the file first, from
    torch's message last.

    torch names the step that failed, not the cause: a cut zip fails with EINVAL, a text file
    as an unknown pickle instruction (or as a GLOBAL when it starts with "c"), a legacy file cut
    inside a GLOBAL as a global with half a name. So a global is named (`on_global`) only in a
    file that torch.save writes, whose container is sound as far as it can be checked, and that
    holds the global whole.
    """
    if isinstance(exc, OSError) and exc.errno in _READ_ERRNOS:
        return _read_failure(path, what, exc)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    reason = _torch_reason(exc)
    legacy = head.startswith(b"\x80") and _LEGACY_MAGIC in head[:32]
    if not legacy:
        if not (head.startswith(_ZIP_MAGIC) or zipfile.is_zipfile(path)):
            return (f"{what} {path} is not a file torch.save wrote: it is "
                    f"{_looks_like(head) or 'data of an unknown format'}; pass {_WANTED[what]}")
        problem = _zip_problem(path, size, what)
        if problem is not None:
            return f"{what} {path} {problem}"
        if "PytorchStreamReader" in reason:  # damage that zipfile tolerates and torch does not
            return f"{what} {path} is a damaged zip archive ({reason}); re-copy it from its source"
    name = _global_name(exc)
    if name is not None and (not legacy or _holds_global(path, name)):
        return on_global(name if "." in name else f"builtins.{name}")  # torch drops builtins.
    if isinstance(exc, (ModuleNotFoundError, AttributeError)):  # --trust-checkpoint only
        return (f"{what} {path} pickles objects of code that is not importable here ({reason}): "
                "run from the code base that wrote it (or add it to PYTHONPATH), or save its "
                "model.state_dict() with torch.save and pass that")
    if reason == "Unsupported operand 149" and (not legacy or head[1] >= 4):  # FRAME
        return (f"{what} {path} was written with pickle protocol 4 or later, which safe loading "
                "does not read: save it again with torch.save's default protocol")
    if legacy:
        cut = (name is not None or isinstance(exc, (EOFError, struct.error))
               or any(s in reason for s in ("unexpected EOF", "truncated", "Ran out of input")))
        if cut:
            return (f"{what} {path} is cut short ({size:,} bytes; its pickled data ends "
                    "early): an interrupted copy or download leaves this; re-copy it from its "
                    "source")
        return f"{what} {path} is damaged or cut short ({reason}); re-copy it from its source"
    return (f"{what} {path} could not be unpickled ({reason}): it is damaged, or was written "
            "by an incompatible torch; re-copy it from its source")


def _zip_problem(path: Path, size: int, what: str) -> str | None:
    """What is wrong with a zip archive as a torch.save file (the rest of the message line),
    or None when torch.save could have written it as it is: every record there and matching
    its CRC. Read only after torch failed, so a checkpoint that loads is never read twice."""
    with open(path, "rb") as f:
        f.seek(max(0, size - (1 << 16) - 22))  # the end record: 22 bytes and a comment
        tail = f.read()
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or len(tail) - end < 22:
        return (f"is cut short ({size:,} bytes, and the zip archive's end record is missing): "
                "an interrupted copy or download leaves this; re-copy it from its source")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(n.rsplit("/", 1)[-1] == "data.pkl" for n in names):
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                return (f"is a zip archive that torch.save did not write (no data.pkl; it holds "
                        f"{shown}); pass {_WANTED[what]}")
            if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in names):
                return ("is a TorchScript archive (torch.jit.save), not a checkpoint: torch.save "
                        "the model's state_dict() and pass that")
            bad = archive.testzip()
    except Exception as exc:  # zipfile raises BadZipFile, OSError, ValueError... on damage
        return f"is a damaged zip archive ({first_line(exc)}); re-copy it from its source"
    if bad is not None:
        return (f"is damaged: its record {bad} fails its CRC or header check; re-copy it from "
                "its source")
    return None


def _looks_like(head: bytes) -> str | None:
    """What a file that is not a checkpoint is, from its first bytes; None when unknown."""
    for magic, name in _LOOKALIKES:
        if head.startswith(magic):
            return name
    if head.startswith(b"\x80"):
        return "a Python pickle that torch.save did not write"
    try:  # a multi-byte character cut at the end of `head` is kept back, not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        return None
    if not all(c.isprintable() or c in "\t\n\r\f" for c in text):
        return None
    text = text.strip()
    if text.startswith("<"):
        return "an HTML or XML page (a download that returned a web page?)"
    return f"text ({text[:40]!r})"


def _torch_reason(exc: Exception) -> str:
    """The line of torch's message that says what failed (not its advice on weights_only)."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation",
              "In PyTorch 2.6", "(1) ", "(2) ")
    lines = [ln.strip() for ln in str(exc).splitlines()]
    found = [ln for ln in lines if ln and not ln.startswith(boiler)]
    line = (found[0] if found else type(exc).__name__).removeprefix("WeightsUnpickler error: ")
    line = re.sub(r"^\[enforce fail at [^\]]*\] \. ", "", line)  # torch's C++ location
    return line.split(". ")[0]  # miniz's and torch's advice follow the first sentence


def _global_name(exc: Exception) -> str | None:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return found.group(1) if found else None


def _holds_global(path: Path, name: str) -> bool:
    """Whether the file holds GLOBAL `name` whole (module, newline, name, newline), not one cut
    at the file's end. For legacy files, which have no checksum to tell a cut."""
    parts = name.split(".")
    needles = [".".join(parts[:i]).encode() + b"\n" + ".".join(parts[i:]).encode() + b"\n"
               for i in range(1, len(parts))] or [b"\n" + name.encode() + b"\n"]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return any(data.find(n) >= 0 for n in needles)


def _runs_code(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    return (module.split(".")[0] in _CODE_MODULES
            or module in ("builtins", "__builtin__") and attr in _CODE_BUILTINS)


def _checkpoint_global(path: Path, name: str) -> str:
    if _runs_code(name):
        return (f"checkpoint {path} refers to {name}, which runs code or commands when the file "
                "is unpickled, and a checkpoint never needs it; nothing was loaded and nothing "
                f"ran. Get the file from its source again; {TRUST} would run it")
    return (f"checkpoint {path} refers to {name}, which is not on the safe-loading allowlist "
            "(tensors, argparse.Namespace, numpy scalars/dtypes/arrays); nothing in it was run. "
            f"If you trust where the file came from, rerun with {TRUST}, which runs any code "
            "the file holds")


def _head_global(path: Path, name: str) -> str:
    return (f"head file {path} refers to {name}, which a head written by {TRAIN} never holds; "
            f"nothing in it was run. Pass {_WANTED['head file']}, or rerun {TRAIN}")


def is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _find_weights(raw: Mapping, *, use_ema: bool, path: Path) -> tuple[str | None, Any]:
    if is_state_dict(raw):
        if use_ema:
            raise CheckpointError(f"{ref('extract.ema')} was given but {path} is a bare state "
                                  "dict with no EMA")
        return None, raw
    keys = EMA_KEYS if use_ema else MODEL_KEYS
    for key in keys:
        value = raw.get(key)
        if isinstance(value, Mapping) and not is_weights(value):
            # Nested: {"model": {"state_dict": {...}}} or timm's {"state_dict_ema": {"module": ...}}
            for inner in MODEL_KEYS:
                candidate = value.get(inner)
                if is_weights(candidate) or isinstance(candidate, torch.nn.Module):
                    return f"{key}.{inner}", value[inner]
        if is_weights(value) or isinstance(value, torch.nn.Module):
            return key, value
    what = "EMA copy" if use_ema else "model weights"
    raise CheckpointError(
        f"found no {what} in {path}: expected a state dict or one of the keys "
        f"{', '.join(keys)}; its top-level keys are {', '.join(map(str, list(raw)[:12]))}"
    )


def is_weights(obj: Any) -> bool:
    """A state dict, allowing an AveragedModel's `n_averaged` beside the tensors."""
    return is_state_dict(obj) and any(k not in EXTRA_KEYS for k in obj)


def containers(raw: Any, *, lightning: bool = False, path: Path | None = None
               ) -> list[Container]:
    """Every copy of the model in `raw` (the model, then EMA copies), with its key prefix."""
    if is_state_dict(raw):
        return [Container((), *_prefix_and_extra(raw, lightning, path))]
    found = []
    for key in MODEL_KEYS + EMA_KEYS:
        value = raw.get(key)
        if is_weights(value):
            found.append(Container((key,), *_prefix_and_extra(value, lightning, path)))
        elif isinstance(value, Mapping):
            for inner in MODEL_KEYS:
                if is_weights(value.get(inner)):
                    found.append(Container((key, inner),
                                           *_prefix_and_extra(value[inner], lightning, path)))
                    break
    return found


def _prefix_and_extra(weights: Mapping, lightning: bool, path: Path | None
                      ) -> tuple[str, tuple[str, ...]]:
    prefix = _prefix(list(weights), lightning, path)
    return prefix, tuple(k for k in weights if not k.startswith(prefix))


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], *, lightning: bool = False,
                   path: Path | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Remove the prefix of the model's keys; return the model's state dict and the prefix.

    The prefix is `module.` / `_orig_mod.` (in any nesting) shared by every key but the
    EXTRA_KEYS, after, for a Lightning checkpoint, the LightningModule attribute that holds the
    model (`model.`): the only one, or the first of LIGHTNING_ATTRS present.
    """
    prefix = _prefix(list(state_dict), lightning, path)
    return {k[len(prefix):]: v for k, v in state_dict.items()
            if k not in EXTRA_KEYS and k.startswith(prefix)}, prefix


def _prefix(keys: list[str], lightning: bool, path: Path | None) -> str:
    keys = [k for k in keys if k not in EXTRA_KEYS]
    prefix = _lightning_attr(keys, path) if lightning else ""
    keys = [k for k in keys if k.startswith(prefix)]
    while True:
        for p in PREFIXES:
            if keys and all(k.startswith(prefix + p) for k in keys):
                prefix += p
                break
        else:
            return prefix


def _lightning_attr(keys: list[str], path: Path | None) -> str:
    attrs = list(dict.fromkeys(k.split(".", 1)[0] for k in keys if "." in k))
    if not attrs:
        return ""
    if len(attrs) == 1:
        return attrs[0] + "."
    for name in LIGHTNING_ATTRS:
        if name in attrs:
            return name + "."
    raise CheckpointError(
        f"{path}: the LightningModule holds several sub-modules ({', '.join(attrs[:8])}) and "
        f"none is called {' or '.join(LIGHTNING_ATTRS[:4])}; which one is the classifier is "
        "unclear, so save that sub-module's state_dict() and pass that file")


def _args_dict(args: Any) -> dict[str, Any]:
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping):
        return dict(args)
    return {}


def class_mapping(raw: Mapping) -> list[str] | None:
    """The checkpoint's own index -> class list, from `id_to_class` or `class_to_idx`."""
    id_to_class = raw.get("id_to_class")
    if isinstance(id_to_class, (list, tuple)):
        return [_class_name(c) for c in id_to_class]
    if isinstance(id_to_class, Mapping):
        try:
            items = sorted((int(k), v) for k, v in id_to_class.items())
        except (TypeError, ValueError):
            items = []
        if items and [i for i, _ in items] == list(range(len(items))):
            return [_class_name(v) for _, v in items]
    class_to_idx = raw.get("class_to_idx")
    if isinstance(class_to_idx, Mapping) and class_to_idx:
        try:
            pairs = sorted((int(i), str(c)) for c, i in class_to_idx.items())
        except (TypeError, ValueError):
            return None
        if [i for i, _ in pairs] == list(range(len(pairs))):
            return [c for _, c in pairs]
    return None


# Where training scripts record the accuracy the model reached, in the order they are tried:
# pytorch/examples' imagenet main.py (best_acc1, a tensor in percent), common variants, and
# timm's train.py (`metric`, the --eval-metric, top1 by default, in percent).
ACCURACY_KEYS = ("best_acc1", "best_top1", "best_acc", "best_accuracy", "best_val_acc",
                 "acc1", "top1", "val_acc1", "val_top1", "val_acc", "val_accuracy", "acc",
                 "accuracy")


def recorded_accuracy(raw: Any, layout: str, args: Mapping[str, Any]
                      ) -> tuple[float, str] | None:
    """The top-1 accuracy the checkpoint says its model reached, as a fraction in [0, 1], and
    the key it came from; None when it records none.

    A value above 1 is read as a percentage (76.1 -> 0.761), one in [0, 1] as a fraction: a
    percentage of at most 1% cannot be told from a fraction and reads as one."""
    if not isinstance(raw, Mapping) or is_state_dict(raw):
        return None
    candidates = [(k, raw.get(k)) for k in ACCURACY_KEYS]
    if layout == "timm" and str(args.get("eval_metric", "top1")) == "top1":
        candidates.append(("metric", raw.get("metric")))
    callbacks = raw.get("callbacks")
    if layout == "lightning" and isinstance(callbacks, Mapping):
        # ModelCheckpoint's best score, when it monitors an accuracy
        for state in callbacks.values():
            if isinstance(state, Mapping) and "best_model_score" in state:
                monitor = str(state.get("monitor") or "")
                if "acc" in monitor.lower() or "top1" in monitor.lower():
                    candidates.append((f"{monitor} (ModelCheckpoint)",
                                       state.get("best_model_score")))
    for key, value in candidates:
        number = _scalar(value)
        if number is not None and 0 <= number <= 100:
            return (number / 100 if number > 1 else number), key
    return None


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not (value.is_floating_point() or value.dtype in
                                      (torch.int32, torch.int64)):
            return None
        value = value.item()
    try:
        number = float(value)  # numpy scalars, ints, floats
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _class_name(value: Any) -> str:
    # imagenet_class_index.json style entries are [wnid, human name]; the id is the class.
    if isinstance(value, (list, tuple)) and value:
        return str(value[0])
    return str(value)


def hash_tensors(state_dict: Mapping[str, torch.Tensor],
                 exclude_prefixes: Iterable[str] = ()) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor not under `exclude_prefixes`.

    Used on the backbone (the head excluded), so a store stays valid for a checkpoint whose head
    was replaced, and is refused for one whose backbone changed.
    """
    exclude = tuple(exclude_prefixes)
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        if exclude and name.startswith(exclude):
            continue
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def backbone_digest(state_dict: Mapping[str, torch.Tensor], head: str,
                    other_heads: Mapping | None = None) -> str:
    """hash_tensors of everything but the heads (the head, tied and auxiliary heads: the
    layers stage 3 changes), so the fixed checkpoint has the same backbone digest."""
    other = other_heads or {}
    names = [head, *other.get("tied", ()), *other.get("auxiliary", ())]
    return hash_tensors(state_dict, exclude_prefixes=tuple(f"{n}." for n in names))
