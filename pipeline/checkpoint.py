"""Load training-script checkpoints safely and find the model weights inside them.

Checkpoints come in many layouts (see DESIGN.md): a raw state dict, or a dict holding it under
`state_dict`, `model_state_dict`, `model` or `net`, maybe an EMA copy, optimizer state, `args`
(an argparse.Namespace), numpy scalars, a class mapping. Keys may carry `module.` (DataParallel,
DDP) or `_orig_mod.` (torch.compile) prefixes.

Loading is `weights_only=True` with a narrow allowlist. Unsafe unpickling happens only when the
user passes --trust-checkpoint; it is never a fallback.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

log = logging.getLogger("quickfix")

# Where training scripts put the weights, in the order we look for them.
MODEL_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "network")
EMA_KEYS = ("model_ema", "state_dict_ema", "ema_state_dict", "ema", "ema_model")
PREFIXES = ("module.", "_orig_mod.")


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


def load_checkpoint(path: Path, *, trust: bool = False, use_ema: bool = False) -> Checkpoint:
    """Read `path` and pull out a clean state dict, the architecture hint and class mapping."""
    raw = torch_load(path, trust=trust)
    if isinstance(raw, torch.nn.Module):
        raw = {"state_dict": raw.state_dict()}
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(raw).__name__}, not a state dict or a dict of training state; "
            "expected what torch.save(model.state_dict()) or a training script writes"
        )

    source_key, weights = _find_weights(raw, use_ema=use_ema, path=path)
    if isinstance(weights, torch.nn.Module):
        weights = weights.state_dict()
    state_dict, prefix = strip_prefixes(weights)

    args = _args_dict(raw.get("args")) if source_key is not None else {}
    arch = raw.get("arch") if source_key is not None else None
    if not isinstance(arch, str):
        arch = args.get("arch") or args.get("model")
        arch = arch if isinstance(arch, str) else None
    classes = class_mapping(raw) if source_key is not None else None
    return Checkpoint(
        path=path,
        raw=raw,
        state_dict=state_dict,
        source_key=source_key,
        prefix=prefix,
        arch=arch,
        classes=classes,
        args=args,
    )


def torch_load(path: Path, *, trust: bool) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); re-copy it from its source")
    if trust:
        log.warning("loading %s with full unpickling (--trust-checkpoint)", path)
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        return safe_load(path)
    except Exception as exc:  # torch raises many types; every one is "unreadable" to the user
        raise CheckpointError(_explain_load_failure(path, exc, trust)) from exc


def safe_load(path: Path) -> Any:
    """`torch.load(weights_only=True)` with this project's allowlist; raises torch's errors.

    Use it to read a fixed checkpoint whose original held numpy scalars or an
    argparse.Namespace (plain `weights_only=True` refuses those).
    """
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _explain_load_failure(path: Path, exc: Exception, trust: bool) -> str:
    text = str(exc)
    if "Unsupported global" in text or "Unsupported operand" in text:
        import re

        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = found.group(1) if found else "an object outside the allowlist"
        return (
            f"checkpoint {path} refers to {what}, which is not on the safe-loading allowlist "
            "(tensors, argparse.Namespace, numpy scalars/dtypes/arrays); if you trust this file, "
            "rerun with --trust-checkpoint"
        )
    if zipfile.is_zipfile(path) or "central directory" in text or "zip archive" in text:
        return f"checkpoint {path} is damaged or truncated ({text.splitlines()[0]}); re-copy it"
    if isinstance(exc, EOFError) or "Ran out of input" in text:
        return f"checkpoint {path} ends early (truncated); re-copy it from its source"
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"{path} is not a readable PyTorch checkpoint ({first})"


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
            raise CheckpointError(f"--ema was given but {path} is a bare state dict with no EMA")
        return None, raw
    keys = EMA_KEYS if use_ema else MODEL_KEYS
    for key in keys:
        value = raw.get(key)
        if isinstance(value, Mapping) and not is_state_dict(value):
            # Nested: {"model": {"state_dict": {...}}} or timm's {"state_dict_ema": {"module": ...}}
            for inner in MODEL_KEYS:
                candidate = value.get(inner)
                if is_state_dict(candidate) or isinstance(candidate, torch.nn.Module):
                    return f"{key}.{inner}", value[inner]
        if is_state_dict(value) or isinstance(value, torch.nn.Module):
            return key, value
    what = "an EMA copy" if use_ema else "model weights"
    raise CheckpointError(
        f"found no {what} in {path}: expected a state dict or one of the keys "
        f"{', '.join(keys)}; its top-level keys are {', '.join(map(str, list(raw)[:12]))}"
    )


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove `module.` / `_orig_mod.` (in any nesting) shared by every key; return the prefix."""
    prefix = ""
    keys = list(state_dict)
    while True:
        for p in PREFIXES:
            if keys and all(k.startswith(prefix + p) for k in keys):
                prefix += p
                break
        else:
            break
    return {k[len(prefix):]: v for k, v in state_dict.items()}, prefix


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
