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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import struct
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
                     "loader does (--no-ema for the others)")
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
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except ImportError as exc:
        raise CheckpointError(f"{path} is a safetensors file: pip install safetensors") from exc
    except Exception as exc:  # safetensors raises its own error types for damaged files
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path} is a damaged safetensors file ({first}); re-copy it") \
            from exc
    if not tensors:
        raise CheckpointError(f"{path} is a safetensors file with no tensors")
    return tensors, metadata


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
