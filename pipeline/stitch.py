"""Stage 3: write the new head and the correct class mapping into a copy of the checkpoint.

    python stitch_checkpoint.py --checkpoint checkpoint_best.pth --head head.pt \
        --out fixed/checkpoint_best.pth

Every key of the original is kept; only the head tensors change, in every copy of the model
(EMA included), with the same key names, prefixes and dtype, and in the file's own format (a
safetensors input gives a safetensors output, a Lightning `.ckpt` stays one). Heads tied to the
head (timm's distilled models) receive the new head too; auxiliary heads over the same classes
have their rows re-ordered with the permutation stage 2 found. The class mapping is set to the
correct order, optimizer state that belonged to the changed layers is dropped, and a provenance
record is added. The file is written atomically and verified before it is moved into place.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .checkpoint import (
    EXTRA_KEYS,
    SAFETENSORS,
    Checkpoint,
    Container,
    backbone_digest,
    is_state_dict,
    load_checkpoint,
    load_safetensors,
    torch_load,
)
from .errors import CheckpointError, DataError, ref, render
from .files import atomic_write, resolve_device
from .headfile import HeadRecord
from .models import Preprocess, build_model, head_out_features
from .report import warn_backbone
from .settings import StitchSettings

log = logging.getLogger("quickfix")

St = StitchSettings  # its settings, named in messages: St.ref("out")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "opt", "optim",
                  "optimizer_states")  # the last: Lightning's list, one per optimizer


@dataclass
class StitchSummary:
    out: Path
    copies: list[str]
    notices: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"stitch: head replaced in {len(self.copies)} cop"
                f"{'y' if len(self.copies) == 1 else 'ies'} ({', '.join(self.copies)}), backbone "
                f"verified bit-identical -> {self.out}")


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
        raise DataError(f"{St.ref('out')} {out} is the input checkpoint (same path, link or "
                        "hardlink); the original is never overwritten: choose another "
                        f"{St.ref('out')}")
    if out.exists() and not overwrite:
        raise DataError(f"{St.ref('out')} {out} exists; pass {St.ref('overwrite')} to replace it")
    if out.is_dir():
        raise DataError(f"{St.ref('out')} {out} is a directory; give a file path")


def run_stitch(settings: StitchSettings) -> None:
    """Stage 3 and its end-to-end check on images, each with its summary line (the first as
    soon as the file is in place)."""
    device = None
    if settings.verify_data is not None:  # checked before anything is written
        device = resolve_device(settings.device)
        if not settings.verify_data.is_dir():
            raise DataError(f"{St.ref('verify_data')} {settings.verify_data} is not a directory")
    check_output(settings.checkpoint, settings.out, settings.overwrite)
    head = HeadRecord.load(settings.head_file)
    log.info(stitch(settings, head).line())
    if device is not None:
        result = verify_on_images(settings.out, settings.verify_data, head, device=device,
                                  batch_size=settings.verify_batch_size,
                                  trust=settings.trust_checkpoint,
                                  progress_every=settings.progress_every)
        log.info(result.line(settings.verify_data, head.val_top1))


def stitch(settings: StitchSettings, head: HeadRecord) -> StitchSummary:
    """Write `head` into a copy of the checkpoint (its output checked by `check_output`).

    `settings.aux_heads`: auto re-orders auxiliary heads when the old head was a clean
    permutation of the right one (else refuses), permute always uses stage 2's best
    permutation, keep leaves them in the old order (said in a notice)."""
    ckpt = _matching_checkpoint(settings, head)
    own = _own_heads(settings, head, ckpt)  # copies with a head trained on their features
    warn_backbone(head.diagnosis, "stitch")  # the user decides: the file is written
    notices: list[str] = []  # also the provenance record's, which shows them all
    changes = PerCopy(_changes(head, ckpt, settings.aux_heads, notices), {})
    for c, _, record in own.values():
        changes.own[c.path] = _changes(record, ckpt, settings.aux_heads, [])
    if own:
        rest = [c.label() for c in ckpt.copies if c.path not in own]
        notices.append("each copy got its own fix, found on its own features: "
                       + ", ".join([f"{', '.join(rest)} {settings.head_file.name}"]
                                   + [f"{c.label()} {path.name}" for c, path, _ in own.values()]))
    elif head.relabel is not None and len(ckpt.copies) > 1:
        notices.append(f"the relabel was applied to every copy of the model "
                       f"({', '.join(c.label() for c in ckpt.copies)}), each from its own rows")
    elif head.source.ema:
        notices.append(f"the head was trained on the features of the EMA weights "
                       f"({ckpt.source_key}); it was written into every copy of the model")
    if not ckpt.copies:
        raise CheckpointError(
            f"{settings.checkpoint} holds its model as a pickled object, not a state dict, so "
            "there is no state dict to write the head into: save model.state_dict() in its "
            "place and rerun")
    new = dict(ckpt.raw)
    for c in ckpt.copies:
        sd = dict(_get(new, c.path))
        sd.update(changes.tensors(sd, c, settings.checkpoint))
        new = _set(new, c.path, sd)
    new, metadata = _with_class_order(new, ckpt, head, changes, settings.out, notices)
    record = _provenance(settings, head, ckpt, notices, own)  # with every notice
    if metadata is not None:
        metadata["quickfix"] = json.dumps(record, default=str)
    elif not is_state_dict(ckpt.raw):
        new["quickfix"] = record
    for note in notices:
        log.warning("stitch: %s", note)
    _save_verified(new, settings.out, ckpt, changes, settings.trust_checkpoint, metadata)
    return StitchSummary(settings.out, [c.label() for c in ckpt.copies], notices)


def _matching_checkpoint(settings: StitchSettings, head: HeadRecord) -> Checkpoint:
    """The checkpoint (the copy of the model the head's features came from), refused unless
    the head was trained on its backbone, for its head's shape and classes."""
    checkpoint, head_file, src = settings.checkpoint, settings.head_file, head.source
    ckpt = load_checkpoint(checkpoint, trust=settings.trust_checkpoint, use_ema=src.ema)
    digest = backbone_digest(ckpt.state_dict, src.head_layer, src.other_heads)
    if digest != src.backbone_sha256:
        raise CheckpointError(f"the head {head_file} was trained on features of another backbone "
                              f"than {checkpoint}'s (backbone sha256 differs)")
    old_w = ckpt.state_dict.get(f"{src.head_layer}.weight")
    if old_w is None or old_w.dim() != 2 or old_w.shape[1] != head.weight.shape[1] or (
            head.relabel is not None and max(head.mapping) >= old_w.shape[0]):
        raise CheckpointError(
            f"the head {head_file} has shape {tuple(head.weight.shape)} but {checkpoint}'s "
            f"{src.head_layer}.weight is {None if old_w is None else tuple(old_w.shape)}")
    if ckpt.classes is not None and len(ckpt.classes) == len(head.classes) and \
            sorted(ckpt.classes) != sorted(head.classes):
        raise CheckpointError(f"{checkpoint} names other classes than the head {head_file}")
    return ckpt


def copy_weights(ckpt: Checkpoint, copy: Container) -> dict[str, torch.Tensor]:
    """One copy's tensors, by the model's names (its prefix stripped)."""
    return {k[len(copy.prefix):]: v for k, v in _get(ckpt.raw, copy.path).items()
            if isinstance(v, torch.Tensor) and k.startswith(copy.prefix) and k not in EXTRA_KEYS}


def differing_copies(ckpt: Checkpoint, head_layer: str, other_heads: Mapping
                     ) -> list[Container]:
    """The copies of the model whose backbone (everything but the heads) is not the one
    `ckpt` was loaded from: an EMA copy that differs from the model, say. The same weights kept
    in another dtype (a float16 copy) are the same backbone."""
    heads = tuple(f"{n}." for n in (head_layer, *other_heads.get("tied", ()),
                                    *other_heads.get("auxiliary", ())))
    mine = {k: v for k, v in ckpt.state_dict.items() if not k.startswith(heads)}
    other = []
    for c in ckpt.copies:
        sd = copy_weights(ckpt, c)
        same = all(isinstance(sd.get(k), torch.Tensor) and sd[k].shape == v.shape and
                   torch.equal(sd[k], v.to(sd[k].dtype)) for k, v in mine.items())
        if not same:
            other.append(c)
    return other


def _own_heads(settings: StitchSettings, head: HeadRecord, ckpt: Checkpoint
               ) -> dict[tuple[str, ...], tuple[Container, Path, HeadRecord]]:
    """The copies whose backbone differs from the one `head` was found on, each with the head of
    `settings.copy_heads` found on its own features (matched by the backbone digest): a trained
    head, or a relabel of that copy's own rows. A trained head is never written into a copy
    whose backbone differs (its features are others, and the head would score below that
    copy's own), unless --head-for-every-copy; a relabel re-orders each copy's own rows and
    needs no head of its own."""
    src, checkpoint = head.source, settings.checkpoint
    records = []
    for path in settings.copy_heads or []:
        rec = HeadRecord.load(path)
        if rec.classes != head.classes or rec.weight.shape != head.weight.shape or \
                rec.source.head_layer != src.head_layer:
            raise CheckpointError(f"{St.ref('copy_heads')} {path} is not a head of the same "
                                  f"kind as {settings.head_file} (the same classes, shape and "
                                  "layer)")
        records.append((path, rec))
    differ = differing_copies(ckpt, src.head_layer, src.other_heads) \
        if len(ckpt.copies) > 1 else []
    own, unmatched, used = {}, [], set()
    for c in differ:
        digest = backbone_digest(copy_weights(ckpt, c), src.head_layer, src.other_heads)
        match = [(p, r) for p, r in records if r.source.backbone_sha256 == digest]
        if match:
            own[c.path] = (c, *match[0])
            used.add(match[0][0])
        else:
            unmatched.append(c.label())
    for path, _ in records:
        if path not in used:
            raise CheckpointError(f"{St.ref('copy_heads')} {path} was trained on the features "
                                  f"of no other copy of {checkpoint} (its backbone sha256 "
                                  "matches none)")
    if unmatched and head.relabel is None and not settings.head_for_every_copy:
        trained = "its EMA weights" if src.ema else "the model's weights"
        raise CheckpointError(
            f"the head was trained on the features of {trained} ({ckpt.source_key}), and "
            f"{checkpoint} holds other copies whose backbones differ ({', '.join(unmatched)}): "
            "their features are not those the head learned. Fix each copy from its own "
            f"features (run stages 1 and 2 once more with {ref('extract.ema', negate=src.ema)} "
            f"and pass that head as {St.ref('copy_heads')}; quickfix-labels does this itself "
            "when one copy differs), "
            f"or pass {St.ref('head_for_every_copy')} to write this head into every copy anyway")
    return own


def _changes(head: HeadRecord, ckpt: Checkpoint, aux_heads: str, notices: list[str]) -> Changes:
    """What changes in every copy: the head and the heads tied to it replaced by the new head,
    the auxiliary heads' rows re-ordered in place."""
    src = head.source
    heads = (src.head_layer, *src.other_heads.get("tied", ()))
    auxiliary = list(src.other_heads.get("auxiliary", ()))
    if head.relabel is not None:  # every copy's own rows, re-ordered (or picked): no training
        mapping = torch.as_tensor(head.mapping, dtype=torch.long)
        if aux_heads == "keep":
            auxiliary = []
        reorder = {f"{name}.{p}": mapping for name in (*heads, *auxiliary)
                   for p in ("weight", "bias") if f"{name}.{p}" in ckpt.state_dict}
        if auxiliary:
            notices.append(f"the auxiliary heads {', '.join(auxiliary)} were re-ordered with "
                           "the relabel, each copy's own rows")
        return Changes({}, reorder)
    replace = {f"{name}.{p}": t for name in heads
               for p, t in (("weight", head.weight), ("bias", head.bias))}
    reorder = (_reordered_aux(auxiliary, ckpt.state_dict, head, aux_heads, notices)
               if auxiliary else {})
    return Changes(replace, reorder)


def _provenance(settings: StitchSettings, head: HeadRecord, ckpt: Checkpoint,
                notices: list[str], own: dict) -> dict:
    src = head.source
    return {
        "copy_heads": [{"copy": c.label(), "path": str(path.resolve()),
                        "metrics": rec.metrics, "backbone_sha256": rec.source.backbone_sha256,
                        "ema": rec.source.ema} for c, path, rec in own.values()] or None,
        "tool": "quickfix-labels", "version": __version__,
        "input": {"path": str(settings.checkpoint.resolve()),
                  "sha256": sha256_file(settings.checkpoint), "layout": ckpt.layout},
        "head": {"path": str(settings.head_file.resolve()), "config": head.config,
                 "metrics": head.metrics, "diagnosis": head.diagnosis or None},
        "store": {"path": src.path, "fingerprint": src.fingerprint,
                  "backbone_sha256": src.backbone_sha256, "ema": src.ema},
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "notices": [render(n) for n in notices],  # the file keeps plain text
    }


def _with_class_order(new: dict, ckpt: Checkpoint, head: HeadRecord, changes: Changes | PerCopy,
                      out: Path, notices: list[str]) -> tuple[dict, dict[str, str] | None]:
    """The correct class order where the file's format keeps it: a safetensors file's metadata
    (returned, for the writer), a training-script checkpoint's `id_to_class`/`class_to_idx`
    (with the old head's optimizer state dropped); a bare state dict has no place for it."""
    classes, names = head.classes, head.names
    if ckpt.format == SAFETENSORS:
        if out.suffix != ".safetensors":
            notices.append(f"the input is a safetensors file, so {out.name} is one too")
        return new, {**ckpt.metadata, "id_to_class": json.dumps(_ordered_entries(
            _metadata_mapping(ckpt.metadata), classes, names))}
    if is_state_dict(ckpt.raw):
        notices.append("the checkpoint is a bare state dict, so the class order cannot go "
                       "inside it: it is in the head file's `classes`")
        return new, None
    new = _set_mapping(new, classes, names)
    new, dropped = _drop_head_optimizer_state(new, ckpt, head.source.head_layer, changes.names(),
                                              head.source.arch)
    notices += dropped
    return new, None


@dataclass
class PerCopy:
    """What stage 3 changes, copy by copy: `default` for every copy but those in `own` (by
    their path), which got a head trained on their own features."""

    default: Changes
    own: dict[tuple[str, ...], Changes]

    def names(self) -> set[str]:
        return set().union(self.default.names(), *(c.names() for c in self.own.values()))

    def tensors(self, sd: Mapping[str, torch.Tensor], copy: Container, checkpoint: Path
                ) -> dict[str, torch.Tensor]:
        return self.own.get(copy.path, self.default).tensors(sd, copy, checkpoint)


@dataclass
class Changes:
    """What stage 3 changes in each copy of the model (names without the copy's prefix):
    tensors replaced by the new head, and tensors whose rows are re-ordered (new row t = old
    row mapping[t]), each copy's own rows."""

    replace: dict[str, torch.Tensor]
    reorder: dict[str, torch.Tensor]

    def names(self) -> set[str]:
        return set(self.replace) | set(self.reorder)

    def tensors(self, sd: Mapping[str, torch.Tensor], copy: Container, checkpoint: Path
                ) -> dict[str, torch.Tensor]:
        """The new tensors of one copy, computed from its original tensors `sd`."""
        out = {}
        for name, tensor in self.replace.items():
            key = f"{copy.prefix}{name}"
            if key not in sd:
                if name.endswith(".bias"):  # a head without bias keeps none
                    continue
                raise CheckpointError(f"{checkpoint}: {copy.label()} has no {key}")
            out[key] = tensor.to(dtype=sd[key].dtype).clone()
        for name, mapping in self.reorder.items():
            key = f"{copy.prefix}{name}"
            if key not in sd:
                raise CheckpointError(f"{checkpoint}: {copy.label()} has no {key}")
            out[key] = sd[key][mapping].clone()
        return out


def _reordered_aux(auxiliary: list[str], state_dict: Mapping[str, torch.Tensor],
                   head: HeadRecord, mode: str, notices: list[str]) -> dict[str, torch.Tensor]:
    """The auxiliary heads' tensors to re-order, each with stage 2's permutation (new row t =
    old row mapping[t]), or {} when they are kept as they are."""
    names = ", ".join(auxiliary)
    if mode == "keep":
        notices.append(f"the auxiliary heads {names} were left in the old class order "
                       f"({St.ref('aux_heads', 'keep')}): do not use their outputs without "
                       "re-training them")
        return {}
    diagnosis = head.diagnosis
    if head.mapping is None:
        raise CheckpointError(
            f"the model has auxiliary heads over the same classes ({names}) and the head file "
            f"holds no class permutation to re-order them ({ref('cmd.train')} ran without "
            f"{ref('train.checkpoint')}): rerun it with {ref('train.checkpoint')}, or pass "
            f"{St.ref('aux_heads', 'keep')}")
    if mode == "auto" and not diagnosis["is_permutation"]:
        raise CheckpointError(
            f"the model has auxiliary heads over the same classes ({names}), and the old head is "
            f"not a clean permutation of the right one (only {diagnosis['clean_share']:.0%} of "
            f"classes map one-to-one), so re-ordering them is a guess: pass "
            f"{St.ref('aux_heads', 'permute')} to apply stage 2's best permutation anyway, or "
            f"{St.ref('aux_heads', 'keep')} to leave them")
    mapping = torch.as_tensor(head.mapping, dtype=torch.long)
    out = {}
    for name in auxiliary:
        for part in ("weight", "bias"):
            if f"{name}.{part}" in state_dict:
                out[f"{name}.{part}"] = mapping
    notices.append(f"the auxiliary heads {names} were re-ordered with stage 2's permutation")
    return out


def _metadata_mapping(metadata: Mapping[str, str]) -> Any:
    try:
        return json.loads(metadata.get("id_to_class") or "null")
    except ValueError:
        return None


def _ordered_entries(old: Any, classes: list[str], names: list[str] | None = None) -> list:
    """The classes in the correct order, as [id, name] pairs (imagenet_class_index.json's
    entries) when their names are known (`names`: from --dataset or the class-order file), else
    keeping the names of the old mapping's [id, name] entries."""
    if names is not None:
        return [[c, n] for c, n in zip(classes, names, strict=True)]
    if isinstance(old, Mapping):
        entries = list(old.values())
    elif isinstance(old, (list, tuple)):
        entries = list(old)
    else:
        entries = []
    by_id = {e[0]: list(e) for e in entries if isinstance(e, (list, tuple)) and e}
    return [by_id.get(c, c) for c in classes]


def _set_mapping(new: dict, classes: list[str], names: list[str] | None = None) -> dict:
    """`id_to_class` (keeping its form) and `class_to_idx`, in the correct order."""
    old = new.get("id_to_class")
    ordered = _ordered_entries(old, classes, names)
    if isinstance(old, Mapping):
        keys = list(old)
        as_str = bool(keys) and isinstance(keys[0], str)
        new["id_to_class"] = {(str(i) if as_str else i): v for i, v in enumerate(ordered)}
    else:
        new["id_to_class"] = ordered
    if "class_to_idx" in new:
        new["class_to_idx"] = {c: i for i, c in enumerate(classes)}
    return new


def _drop_head_optimizer_state(new: dict, ckpt: Checkpoint, head_name: str, changed: set[str],
                               arch: str) -> tuple[dict, list[str]]:
    """Drop the optimizer state (momentum, Adam moments) of the changed layers' parameters.

    `optimizer` and the like hold one optimizer's state dict; Lightning's `optimizer_states` a
    list of them.
    """
    notices = []
    for key in OPTIMIZER_KEYS:
        value = new.get(key)
        states = value if isinstance(value, list) else [value]
        if not states or not all(isinstance(o, Mapping) and "state" in o and "param_groups" in o
                                 for o in states):
            continue
        kept = []
        for i, opt in enumerate(states):
            label = f"{key}[{i}]" if isinstance(value, list) else key
            index = (_head_param_indices(ckpt, head_name, changed, arch, opt["param_groups"])
                     if len(states) == 1 else None)
            if index is None:
                kept.append({**opt, "state": {}})
                notices.append(f"{label}: could not tell which entries belong to the head "
                               "(several parameter groups or optimizers), so all its state was "
                               "dropped; its hyper-parameters are kept")
            else:
                kept.append({**opt, "state": {k: v for k, v in opt["state"].items()
                                              if k not in index}})
                notices.append(f"{label}: the old head's optimizer state (momentum etc.) was "
                               "dropped")
        new = {**new, key: kept if isinstance(value, list) else kept[0]}
    return new, notices


def _head_param_indices(ckpt: Checkpoint, head_name: str, changed: set[str], arch: str,
                        groups) -> set[int] | None:
    """The changed parameters' ids, when the optimizer held one group in model order."""
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
    return {ids[i] for i, n in enumerate(params) if n in changed}


def _save_verified(new: Any, out: Path, ckpt: Checkpoint, changes: Changes | PerCopy, trust: bool,
                   metadata: dict[str, str] | None) -> None:
    """Written atomically, and reloaded and verified before it is moved into place.

    `metadata` is not None for a safetensors output (the input was one)."""
    errors: tuple[type[BaseException], ...] = ()
    if metadata is not None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        errors = (SafetensorError,)

        def write(f):  # safetensors writes by name; the fsync of `f` covers the same file
            save_file(new, f.name, metadata=metadata)
    else:
        def write(f):
            torch.save(new, f)

    atomic_write(out, write, check=lambda tmp: _verify(tmp, ckpt, changes, trust, metadata),
                 what="; the original is untouched", errors=errors)


def _verify(path: Path, ckpt: Checkpoint, changes: Changes | PerCopy, trust: bool,
            metadata: dict[str, str] | None) -> None:
    """Reload the written file from disk and compare it with the original as loaded (stitching
    builds new dicts and never mutates it): every tensor but the changed ones bit-identical,
    the changed ones as intended, no key lost."""
    original = ckpt.raw
    if metadata is not None:
        written, meta = load_safetensors(path)
        if meta != metadata:
            raise CheckpointError("verification failed: the safetensors metadata differs")
    else:
        written = torch_load(path, trust=trust)
    if not is_state_dict(original):
        missing = set(original) - set(written)
        if missing:
            raise CheckpointError(f"verification failed: keys {sorted(missing)} were lost")
    for c in ckpt.copies:
        a, b = _get(original, c.path), _get(written, c.path)
        if set(a) != set(b):
            raise CheckpointError(f"verification failed: the keys of {c.label()} changed")
        expected = changes.tensors(a, c, ckpt.path)
        for key, tensor in a.items():
            other = b[key]
            want = expected.get(key, tensor)  # a superset head's picked rows: fewer rows
            if other.dtype != want.dtype or other.shape != want.shape:
                raise CheckpointError(f"verification failed: {key} changed dtype or shape")
            if key in expected:
                if not _same_bits(other, expected[key]):
                    raise CheckpointError(f"verification failed: {key} is not as stitched")
            elif not _same_bits(other, tensor):
                raise CheckpointError(f"verification failed: backbone tensor {key} changed")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaNs included), for tensors of the same dtype and shape."""
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


@dataclass
class VerifySummary:
    top1: float
    images: int
    skipped: int
    seconds: float
    decoder: str

    def line(self, data_dir: Path, cached: float | None) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        beside = f" (stage 2 on cached features: {cached:.2%})" if cached is not None else ""
        skipped = f", {self.skipped} unreadable skipped" if self.skipped else ""
        return (f"verify: the fixed model end to end on {self.images} images of {data_dir}: "
                f"top-1 {100 * self.top1:.2f}%{beside}; {self.decoder} decoder, "
                f"{self.seconds:.1f} s, {rate:.0f} img/s{skipped}")


@torch.inference_mode()
def verify_on_images(fixed: Path, data_dir: Path, head: HeadRecord, *, device: torch.device,
                     batch_size: int = 128, trust: bool = False,
                     progress_every: float = 30.0) -> VerifySummary:
    """Top-1 of the stitched model end to end on an image folder, decoded as stage 1 decoded
    the store (DALI's decoder where the store used it and DALI is installed, else PIL), in
    batches read ahead in the background, with progress.

    `data_dir` is a split folder of class folders, or a root holding `val/`. Files that stage 1
    quarantines are skipped, as stage 2 skipped them.
    """
    from . import readers as R
    from .progress import Progress

    split = _verify_split(data_dir, head.classes, batch_size)
    decoder, pre, precision = _as_stage1_read(head, device)
    n = len(split.files)
    reader = R.open_reader(decoder, [split.root], [split.files],
                           R.plan_batches([(0, 0, n)], n, batch_size), pre, device=device,
                           precision=precision, batch_size=batch_size)
    start = time.perf_counter()
    try:
        reader.start()  # before the model touches CUDA: DALI's workers are forked
        model = _fixed_model(fixed, head, trust, device)
        labels = torch.from_numpy(split.labels.astype(np.int64)).to(device)
        with Progress(n, "verify", interval=progress_every) as progress:
            correct, total = _count_correct(model, reader, labels, device, precision, progress)
    finally:
        reader.close()
    top1 = correct / total if total else 0.0
    return VerifySummary(top1, total, n - total, time.perf_counter() - start,
                         decoder)


def _verify_split(data_dir: Path, classes: list[str], batch_size: int):
    from . import data as D

    split_dir = data_dir / "val" if (data_dir / "val").is_dir() else data_dir
    if not split_dir.is_dir():
        raise DataError(f"{St.ref('verify_data')} {data_dir} is not a directory")
    if batch_size < 1:
        raise DataError(f"verify batch size {batch_size}: must be at least 1")
    split = D.scan_split(split_dir.name, split_dir, classes)
    if not split.files:
        raise DataError(f"{St.ref('verify_data')} {data_dir}: no images in class folders of "
                        f"{split_dir}")
    return split


def _as_stage1_read(head: HeadRecord, device: torch.device
                    ) -> tuple[str, Preprocess, str]:
    """The decoder, eval transform and precision stage 1 read the images with, as the head
    records them (a head file of an earlier version: as its store records them)."""
    from . import readers as R

    src = head.source
    if src.preprocessing is None and Path(src.path).exists():
        from .store import FeatureStore

        store = FeatureStore.open(Path(src.path))
        src = dataclasses.replace(src, preprocessing=store.preprocessing,
                                  decoder=store.decoder, precision=store.precision)
    if src.preprocessing is None:
        raise DataError(f"the head file records no eval transform to read the images with (its "
                        f"store {src.path} is gone, or was not made by {ref('cmd.extract')}): "
                        f"rerun {ref('cmd.train')} on the store, or leave out "
                        f"{St.ref('verify_data')}")
    decoder = "dali" if str(src.decoder or "pil").startswith("dali") else "pil"
    if decoder == "dali" and not R.dali_available():
        log.warning("verify: stage 1 decoded with DALI, which is not installed here: decoding "
                    "with PIL (top-1 may differ slightly from stage 2's)")
        decoder = "pil"
    precision = (src.precision or "fp32") if device.type == "cuda" else "fp32"
    return decoder, src.preprocessing, precision


def _fixed_model(fixed: Path, head: HeadRecord, trust: bool, device: torch.device
                 ) -> torch.nn.Module:
    """The whole fixed model, the copy the head was trained for (the EMA one after --ema)."""
    ckpt = load_checkpoint(fixed, trust=trust, use_ema=head.source.ema)
    model = build_model(head.source.arch, len(head.classes), ckpt.state_dict)
    model.load_state_dict(ckpt.state_dict)
    model.eval().to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def _count_correct(model: torch.nn.Module, reader, labels: torch.Tensor, device: torch.device,
                   precision: str, progress) -> tuple[int, int]:
    """(right predictions, usable images) over the reader's batches, counted on the device."""
    from .extract import forward_context

    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    pending: deque = deque()  # DALI's buffers stay alive until the GPU has read them
    for batch in reader:
        x = batch.images.to(device, non_blocking=True)
        with forward_context(device, precision):
            pred = model(x).argmax(1)
        ok = torch.from_numpy(batch.ok).to(device, non_blocking=True)
        correct += ((pred == labels[batch.lo:batch.lo + batch.n]) & ok).sum()
        total += int(batch.ok.sum())
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            pending.append((event, batch.keep))
            while len(pending) > 2:
                pending.popleft()[0].synchronize()
        progress.update(batch.n)
    return int(correct), total  # the one read of the result
