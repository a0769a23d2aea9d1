"""Stage 3: write the new head and the correct class mapping into a copy of the checkpoint.

    python stitch_checkpoint.py --checkpoint checkpoint_best.pth --head head.pt \
        --out fixed/checkpoint_best.pth

Every key of the original is kept; only the head tensors change, in every copy of the model
(EMA included), with the same key names, prefixes and dtype. The class mapping is set to the
correct order, optimizer state that belonged to the old head is dropped, and a provenance record
is added. The file is written atomically and verified before it is moved into place.
"""

from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import (
    EMA_KEYS,
    MODEL_KEYS,
    hash_tensors,
    is_state_dict,
    load_checkpoint,
    strip_prefixes,
    torch_load,
)
from .errors import CheckpointError, DataError
from .models import build_model, head_out_features
from .train import load_head

log = logging.getLogger("quickfix")

OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "opt", "optim")


@dataclass
class Container:
    """One copy of the model's weights inside the checkpoint: where it is and its key prefix."""

    path: tuple[str, ...]
    state_dict: Mapping[str, torch.Tensor]
    prefix: str


@dataclass
class StitchSummary:
    out: Path
    copies: list[str]
    notices: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"stitch: head replaced in {len(self.copies)} cop"
                f"{'y' if len(self.copies) == 1 else 'ies'} ({', '.join(self.copies)}), backbone "
                f"verified bit-identical -> {self.out}")


def containers(raw: Any) -> list[Container]:
    if is_state_dict(raw):
        return [Container((), raw, strip_prefixes(raw)[1])]
    found = []
    for key in MODEL_KEYS + EMA_KEYS:
        value = raw.get(key)
        if is_state_dict(value):
            found.append(Container((key,), value, strip_prefixes(value)[1]))
        elif isinstance(value, Mapping):
            for inner in MODEL_KEYS:
                if is_state_dict(value.get(inner)):
                    found.append(Container((key, inner), value[inner],
                                           strip_prefixes(value[inner])[1]))
                    break
    return found


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _set(raw: dict, path: tuple[str, ...], value: Any) -> dict:
    """A copy of `raw` with the dict at `path` replaced; the other entries are shared."""
    if not path:
        return value
    out = dict(raw)
    out[path[0]] = _set(raw[path[0]], path[1:], value) if len(path) > 1 else value
    return out


def _get(raw: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        raw = raw[key]
    return raw


def check_output(checkpoint: Path, out: Path, overwrite: bool) -> None:
    same = out.resolve() == checkpoint.resolve()
    if not same and out.exists():
        try:
            same = os.path.samefile(out, checkpoint)
        except OSError:
            same = False
    if same:
        raise DataError(f"--out {out} is the input checkpoint (same path, link or hardlink); "
                        "the original is never overwritten: choose another --out")
    if out.exists() and not overwrite:
        raise DataError(f"--out {out} exists; pass --overwrite to replace it")
    if out.is_dir():
        raise DataError(f"--out {out} is a directory; give a file path")


def stitch(*, checkpoint: Path, head_path: Path, out: Path, overwrite: bool = False,
           trust_checkpoint: bool = False) -> StitchSummary:
    check_output(checkpoint, out, overwrite)
    head = load_head(head_path)
    ckpt = load_checkpoint(checkpoint, trust=trust_checkpoint)
    store = head["store"]
    head_name = store["head"]
    weight, bias = head["weight"], head["bias"]
    classes = list(head["classes"])
    digest = hash_tensors(ckpt.state_dict, exclude_prefixes=(f"{head_name}.",))
    if digest != store["backbone_sha256"]:
        raise CheckpointError(f"the head {head_path} was trained on features of another backbone "
                              f"than {checkpoint}'s (backbone sha256 differs)")
    old_w = ckpt.state_dict.get(f"{head_name}.weight")
    if old_w is None or tuple(old_w.shape) != tuple(weight.shape):
        raise CheckpointError(
            f"the head {head_path} has shape {tuple(weight.shape)} but {checkpoint}'s "
            f"{head_name}.weight is {None if old_w is None else tuple(old_w.shape)}")
    if ckpt.classes is not None and sorted(ckpt.classes) != sorted(classes):
        raise CheckpointError(f"{checkpoint} names other classes than the head {head_path}")

    raw = ckpt.raw
    copies = containers(raw)
    new = dict(raw) if isinstance(raw, Mapping) else raw
    notices: list[str] = []
    for c in copies:
        sd = dict(_get(new, c.path))
        for name, tensor in (("weight", weight), ("bias", bias)):
            key = f"{c.prefix}{head_name}.{name}"
            if key not in sd:
                if name == "bias":
                    continue
                raise CheckpointError(f"{checkpoint}: {'/'.join(c.path) or 'state dict'} has no "
                                      f"{key}")
            sd[key] = tensor.to(dtype=sd[key].dtype).clone()
        new = _set(new, c.path, sd)

    if isinstance(raw, Mapping) and not is_state_dict(raw):
        new = _set_mapping(new, classes)
        new, dropped = _drop_head_optimizer_state(new, ckpt, head_name, store["arch"])
        notices += dropped
        new["quickfix"] = {
            "tool": "quickfix-labels", "version": __version__,
            "input": {"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint)},
            "head": {"path": str(head_path.resolve()), "config": head["config"],
                     "metrics": head["metrics"], "diagnosis": head.get("diagnosis")},
            "store": {"path": store["path"], "fingerprint": store["fingerprint"],
                      "backbone_sha256": store["backbone_sha256"]},
            "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "notices": notices,
        }
    else:
        notices.append("the checkpoint is a bare state dict, so the class order cannot go "
                       "inside it: it is in the head file's `classes`")
    for note in notices:
        log.warning("stitch: %s", note)
    _save_verified(new, out, raw, copies, head_name, weight, bias, trust_checkpoint)
    return StitchSummary(out, ["/".join(c.path) or "state dict" for c in copies], notices)


def _set_mapping(new: dict, classes: list[str]) -> dict:
    """`id_to_class` (keeping its form) and `class_to_idx`, in the correct order."""
    old = new.get("id_to_class")
    if isinstance(old, Mapping):
        entries = list(old.values())
    elif isinstance(old, (list, tuple)):
        entries = list(old)
    else:
        entries = []
    # imagenet_class_index-style entries [wnid, name] keep their names
    by_id = {e[0]: e for e in entries if isinstance(e, (list, tuple)) and e}
    ordered = [by_id.get(c, c) for c in classes]
    if isinstance(old, Mapping):
        keys = list(old)
        as_str = bool(keys) and isinstance(keys[0], str)
        new["id_to_class"] = {(str(i) if as_str else i): v for i, v in enumerate(ordered)}
    else:
        new["id_to_class"] = ordered
    if "class_to_idx" in new:
        new["class_to_idx"] = {c: i for i, c in enumerate(classes)}
    return new


def _drop_head_optimizer_state(new: dict, ckpt, head_name: str, arch: str
                               ) -> tuple[dict, list[str]]:
    """Drop the optimizer state (momentum, Adam moments) of the old head's parameters."""
    notices = []
    for key in OPTIMIZER_KEYS:
        opt = new.get(key)
        if not (isinstance(opt, Mapping) and "state" in opt and "param_groups" in opt):
            continue
        index = _head_param_indices(ckpt, head_name, arch, opt["param_groups"])
        new = dict(new)
        if index is None:
            new[key] = {**opt, "state": {}}
            notices.append(f"{key}: could not tell which entries belong to the head (several "
                           "parameter groups), so all optimizer state was dropped; its "
                           "hyper-parameters are kept")
        else:
            new[key] = {**opt, "state": {k: v for k, v in opt["state"].items()
                                         if k not in index}}
            notices.append(f"{key}: the old head's optimizer state (momentum etc.) was dropped")
    return new, notices


def _head_param_indices(ckpt, head_name: str, arch: str, groups) -> set[int] | None:
    """The head's parameter ids, when the optimizer held one group in model order."""
    if len(groups) != 1:
        return None
    try:
        num = head_out_features(ckpt.state_dict, head_name)
        params = [n for n, _ in build_model(arch, num, ckpt.state_dict).named_parameters()]
    except Exception:  # an architecture we cannot rebuild: play safe, the caller drops all
        return None
    ids = groups[0]["params"]
    if len(params) != len(ids):
        return None
    return {ids[i] for i, n in enumerate(params)
            if n in (f"{head_name}.weight", f"{head_name}.bias")}


def _save_verified(new: Any, out: Path, original: Any, copies: list[Container],
                   head_name: str, weight: torch.Tensor, bias: torch.Tensor,
                   trust: bool) -> None:
    """Temp file beside `out`, fsync, reload and verify, os.replace, fsync the folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(str(out.parent / f".{out.name}.tmp-*")):
        pid = stale.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            os.unlink(stale)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(new, f)
            f.flush()
            os.fsync(f.fileno())
        _verify(tmp, original, copies, head_name, weight, bias, trust)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _verify(path: Path, original: Any, copies: list[Container], head_name: str,
            weight: torch.Tensor, bias: torch.Tensor, trust: bool) -> None:
    """Reload the written file from disk and compare it with the original as loaded (stitching
    builds new dicts and never mutates it): every non-head tensor bit-identical, the head as
    trained, no key lost."""
    written = torch_load(path, trust=trust)
    if isinstance(original, Mapping) and not is_state_dict(original):
        missing = set(original) - set(written)
        if missing:
            raise CheckpointError(f"verification failed: keys {sorted(missing)} were lost")
    for c in copies:
        a, b = _get(original, c.path), _get(written, c.path)
        if set(a) != set(b):
            raise CheckpointError(f"verification failed: the keys of {c.path} changed")
        head_keys = {f"{c.prefix}{head_name}.weight": weight, f"{c.prefix}{head_name}.bias": bias}
        for key, tensor in a.items():
            other = b[key]
            if other.dtype != tensor.dtype or other.shape != tensor.shape:
                raise CheckpointError(f"verification failed: {key} changed dtype or shape")
            if key in head_keys:
                if not torch.equal(other, head_keys[key].to(tensor.dtype)):
                    raise CheckpointError(f"verification failed: {key} is not the new head")
            elif not torch.equal(other.reshape(-1).view(torch.uint8),
                                 tensor.reshape(-1).view(torch.uint8)):
                raise CheckpointError(f"verification failed: backbone tensor {key} changed")


@torch.inference_mode()
def verify_on_images(fixed: Path, data_dir: Path, head: dict, *, device: torch.device,
                     batch_size: int = 64) -> tuple[float, int]:
    """Top-1 of the stitched model end to end on an image folder (the torchvision/PIL path).

    `data_dir` is a split folder of class folders, or a root holding `val/`. Files that stage 1
    would quarantine are skipped, as stage 2 skipped them.
    """
    from . import data as D
    from .models import Preprocess
    from .store import open_store

    split_dir = data_dir / "val" if (data_dir / "val").is_dir() else data_dir
    if not split_dir.is_dir():
        raise DataError(f"--verify-data {data_dir} is not a directory")
    classes = list(head["classes"])
    split = D.scan_split(split_dir.name, split_dir, classes)
    components = open_store(Path(head["store"]["path"])).attrs["fingerprint"]["components"]
    p = components["preprocessing"]
    pre = Preprocess(p["resize"], p["crop"], p["interpolation"], tuple(p["mean"]),
                     tuple(p["std"]))
    ckpt = load_checkpoint(fixed)
    model = build_model(head["store"]["arch"], len(classes), ckpt.state_dict)
    model.load_state_dict(ckpt.state_dict)
    model.eval().to(device)
    correct = total = 0
    for lo in range(0, len(split.files), batch_size):
        images, labels = [], []
        for f, label in zip(split.files[lo:lo + batch_size],
                            split.labels[lo:lo + batch_size].tolist(), strict=True):
            data, err = D.read_bytes(split_dir / f)
            if err is not None or D.sniff(data)[1] is not None:
                continue
            try:
                images.append(D.pil_transform(D.pil_decode(data), pre))
            except Exception:  # undecodable: quarantined in stage 1 too
                continue
            labels.append(label)
        if not images:
            continue
        pred = model(torch.stack(images).to(device)).argmax(1).cpu()
        correct += int((pred == torch.tensor(labels)).sum())
        total += len(labels)
    return (correct / total if total else 0.0), total
