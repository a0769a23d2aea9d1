"""Architectures: build a torchvision (or custom) classifier, find its head, cut it off.

The head is the final `nn.Linear`: `fc` (ResNet), `classifier[-1]` (MobileNet, EfficientNet,
ConvNeXt, VGG), `heads.head` (ViT). The backbone is the same model with that layer replaced by
`nn.Identity`, so its output is exactly the head's input.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torchvision
from torch import nn

from .errors import ArchitectureError

log = logging.getLogger("quickfix")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """The eval transform: resize the short side, center-crop, normalize."""

    resize: int
    crop: int
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def torchvision_archs() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _quiet_build(fn, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        # googlenet / inception warn about their init scheme on every build
        warnings.simplefilter("ignore", FutureWarning)
        return fn(**kwargs)


def build_model(arch: str, num_classes: int, state_dict: Mapping | None = None) -> nn.Module:
    """A randomly initialised `arch` with `num_classes` outputs.

    `arch` is a torchvision name (`resnet50`) or `package.module:function` for a custom factory,
    called with `num_classes=` when it accepts it.
    """
    if ":" in arch:
        return _build_custom(arch, num_classes)
    if arch not in torchvision_archs():
        close = [a for a in torchvision_archs() if a.startswith(arch[:4])][:6]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ArchitectureError(
            f"unknown architecture {arch!r}: expected a torchvision classification model name"
            f"{hint} or package.module:function for a custom factory"
        )
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if arch in ("inception_v3", "googlenet") and state_dict is not None:
        aux = ("AuxLogits.", "aux1.")
        kwargs["aux_logits"] = any(k.startswith(aux) for k in state_dict)
        kwargs["init_weights"] = False
    return _quiet_build(torchvision.models.get_model, name=arch, **kwargs)


def _build_custom(spec: str, num_classes: int) -> nn.Module:
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArchitectureError(f"cannot import {module_name!r} for --arch {spec}: {exc}") from exc
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ArchitectureError(f"--arch {spec}: {module_name} has no callable {func_name!r}")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    model = factory(num_classes=num_classes) if "num_classes" in params else factory()
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"--arch {spec} returned {type(model).__name__}, not an nn.Module")
    return model


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The final nn.Linear, by registration order (aux heads of Inception come earlier)."""
    last: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise ArchitectureError(
            f"{type(model).__name__} has no nn.Linear layer to use as the classification head"
        )
    return last


def split_backbone(model: nn.Module) -> tuple[nn.Module, str, int]:
    """A copy of `model` whose head is nn.Identity; returns (backbone, head name, feature dim)."""
    head_name, head = find_head(model)
    backbone = copy.deepcopy(model)
    parent_name, _, attr = head_name.rpartition(".")
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    setattr(parent, attr, nn.Identity())
    return backbone, head_name, head.in_features


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], arch: str) -> None:
    missing, unexpected = _mismatch(model, state_dict)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ArchitectureError(
            f"the checkpoint's weights do not fit {arch}: {'; '.join(parts)}; "
            "pass the right --arch"
        )
    model.load_state_dict(state_dict, strict=True)


def _mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[list, list]:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    missing += [
        f"{k} (shape {tuple(state_dict[k].shape)} vs {tuple(v.shape)})"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    unexpected = [k for k in state_dict if k not in own]
    return missing, unexpected


def head_out_features(state_dict: Mapping[str, torch.Tensor], head_name: str) -> int:
    weight = state_dict.get(f"{head_name}.weight")
    if weight is None or weight.ndim != 2:
        raise ArchitectureError(f"the checkpoint has no 2-d {head_name}.weight for the head")
    return int(weight.shape[0])


def _signature(model: nn.Module) -> dict[str, tuple[int, ...]]:
    head_name, _ = find_head(model)
    head_keys = (f"{head_name}.weight", f"{head_name}.bias")
    return {k: (() if k in head_keys else tuple(v.shape)) for k, v in model.state_dict().items()}


def _meta_build(arch: str) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return _quiet_build(torchvision.models.get_model, name=arch, weights=None)
    except Exception:
        try:  # a few (RegNet) cannot initialise on the meta device
            return _quiet_build(torchvision.models.get_model, name=arch, weights=None)
        except Exception:
            return None


def _structure(keys) -> set[str]:
    """Key names with indices blanked: `layer1.0.conv1.weight` -> `layer#.#.conv#.weight`."""
    return {re.sub(r"\d+", "#", k) for k in keys}


def infer_arch(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The torchvision architecture whose state dict has exactly these keys and shapes.

    One small representative per family is compared first by key structure, so only the
    matching families are built in full.
    """
    families: dict[str, list[str]] = {}
    for name in torchvision_archs():
        families.setdefault(re.match(r"[a-z]+(_v\d)?", name).group(0), []).append(name)
    wanted = _structure(state_dict)
    candidates: list[str] = []
    for members in families.values():
        # the smallest RegNet stands for its family (they cannot be built on the meta device)
        rep = _meta_build(next((m for m in members if m.endswith("400mf")), members[0]))
        if rep is None:
            continue
        have = _structure(rep.state_dict())
        if len(wanted & have) / len(wanted | have) >= 0.5:
            candidates += members
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    matches = []
    for name in dict.fromkeys(candidates):
        model = _meta_build(name)
        if model is None:
            continue
        sig = _signature(model)
        if set(sig) == set(shapes) and all(s == () or shapes[k] == s for k, s in sig.items()):
            matches.append(name)
    if len(matches) == 1:
        log.info("architecture inferred from the state dict: %s", matches[0])
        return matches[0]
    if not matches:
        raise ArchitectureError(
            "cannot infer the architecture: no torchvision model has this checkpoint's keys and "
            "shapes; pass --arch NAME (a torchvision name or package.module:function)"
        )
    raise ArchitectureError(
        f"the checkpoint's weights fit several architectures ({', '.join(matches)}); "
        "pass --arch NAME"
    )


def default_preprocess(arch: str, ckpt_args: Mapping | None = None) -> tuple[Preprocess, str]:
    """The eval transform the model was validated with, and where that came from.

    The training script's own `--val-resize-size/--val-crop-size` win; then the architecture's
    first published torchvision weights (the original recipe, e.g. 256/224 for ResNet-50 V1);
    then the ImageNet convention 256/224.
    """
    ckpt_args = ckpt_args or {}
    resize, crop = ckpt_args.get("val_resize_size"), ckpt_args.get("val_crop_size")
    interp = ckpt_args.get("interpolation")
    interp = interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear"
    if isinstance(resize, int) and isinstance(crop, int):
        return Preprocess(resize, crop, interp), "the checkpoint's training args"
    if ":" not in arch:
        try:
            weights = list(torchvision.models.get_model_weights(arch))
        except (ValueError, KeyError):
            weights = []
        if weights:
            t = weights[0].transforms()
            mode = str(getattr(t, "interpolation", "bilinear")).split(".")[-1].lower()
            return (
                Preprocess(int(t.resize_size[0]), int(t.crop_size[0]), mode,
                           tuple(t.mean), tuple(t.std)),
                f"torchvision's {weights[0]} eval transform",
            )
    return Preprocess(256, 224), "the ImageNet default (resize 256, crop 224)"
