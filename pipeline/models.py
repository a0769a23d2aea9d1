"""Architectures: build a torchvision, timm or custom classifier, find its heads, cut them off.

The head is the final `nn.Linear` (`fc` for ResNet, `classifier[-1]` for MobileNet, EfficientNet,
ConvNeXt, VGG, `heads.head` for ViT), what timm's `get_classifier()` returns for a timm model, or
the layer named by --head. The backbone is the same model with the head replaced by
`nn.Identity`, so its output is exactly the head's input.

Other layers that map features to the same classes are found too, so that no copy of the old
class order is left behind:
- tied heads: timm's distilled models return two heads (`head`, `head_dist`) and average their
  logits at eval time; both are cut off (the backbone then gives the average of their inputs)
  and both receive the new head, which reproduces a single linear head on those features.
- auxiliary heads (GoogLeNet's `aux1.fc2`/`aux2.fc2`, Inception v3's `AuxLogits.fc`): every
  other `nn.Linear` with as many outputs as the head that the model does not use at eval time
  (settle_auxiliary); stage 3 re-orders their rows with the permutation stage 2 found.
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

from .errors import ArchitectureError, ref

ARCH, HEAD = ref("extract.arch"), ref("extract.head_layer")

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

    @classmethod
    def from_dict(cls, d: Mapping) -> Preprocess:
        """The inverse of `as_dict` (as a store's fingerprint and a head file keep it)."""
        return cls(d["resize"], d["crop"], d["interpolation"], tuple(d["mean"]),
                   tuple(d["std"]))


TIMM = "timm:"


@dataclass(frozen=True)
class Heads:
    """Where a model's class outputs are: the head, tied heads, auxiliary heads (module names)."""

    head: str
    tied: tuple[str, ...] = ()
    auxiliary: tuple[str, ...] = ()

    @property
    def replaced(self) -> tuple[str, ...]:
        """The layers that receive the new head."""
        return (self.head, *self.tied)


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
    if arch.startswith(TIMM):
        return _build_timm(arch[len(TIMM):], num_classes)
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


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise ArchitectureError(
            "this is a timm model, and timm is not installed: pip install 'quickfix-labels[timm]'"
            " (or pip install timm)") from exc
    return timm


def _build_timm(name: str, num_classes: int) -> nn.Module:
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"{name.split('_')[0]}*")[:6]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ArchitectureError(f"timm has no model {name!r}{hint}; pass {ARCH} timm:NAME")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and hasattr(model, "get_classifier")


def _build_custom(spec: str, num_classes: int) -> nn.Module:
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArchitectureError(f"cannot import {module_name!r} for {ARCH} {spec}: {exc}") from exc
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ArchitectureError(f"{ARCH} {spec}: {module_name} has no callable {func_name!r}")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    model = factory(num_classes=num_classes) if "num_classes" in params else factory()
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"{ARCH} {spec} returned {type(model).__name__}, not an "
                                "nn.Module")
    return model


def find_head(model: nn.Module, state_dict: Mapping | None = None) -> tuple[str, nn.Linear]:
    """The final nn.Linear, by registration order (aux heads of Inception come earlier).

    `state_dict` (the checkpoint's) only makes the error about a convolutional head exact."""
    last: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise ArchitectureError(f"{type(model).__name__} has no nn.Linear layer to use as the "
                                f"classification head{_conv_head_reason(model, state_dict)}")
    return last


def _conv_head_reason(model: nn.Module, state_dict: Mapping | None) -> str:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs and convs[-1][1].kernel_size == (1, 1):
        name, conv = convs[-1]
        weight = (state_dict or {}).get(f"{name}.weight")
        out = conv.out_channels if weight is None else int(weight.shape[0])
        return (f": its classifier is a 1x1 convolution ({name}, {out} outputs) "
                "applied before the pooling (and, in SqueezeNet, a ReLU), so its logits are not "
                "a linear function of pooled features and it cannot be retrained from a "
                "feature cache; fine-tune that layer on images instead")
    return ""


def find_heads(model: nn.Module, head_layer: str | None = None,
               state_dict: Mapping | None = None) -> Heads:
    """The head (`head_layer`, from --head NAME; timm's get_classifier(); else the last
    nn.Linear), the heads tied to it, and the auxiliary heads over the same classes."""
    modules = dict(model.named_modules())
    linears = {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}
    named = _timm_heads(model, modules) if is_timm(model) else []
    tied: tuple[str, ...] = ()
    head = head_layer  # the head's layer name, from here on
    if head is not None:
        if not isinstance(modules.get(head), nn.Linear):
            what = ("is not a layer of" if head not in modules else
                    f"is a {type(modules[head]).__name__}, not an nn.Linear, in")
            raise ArchitectureError(
                f"{HEAD} {head} {what} {type(model).__name__}; its linear layers are "
                f"{', '.join(list(linears)[-6:]) or 'none'}")
    elif named:
        if not all(isinstance(modules.get(n), nn.Linear) for n in named):
            raise ArchitectureError(
                f"timm's get_classifier() of {type(model).__name__} is not an nn.Linear "
                f"({', '.join(type(modules.get(n)).__name__ for n in named)}); name the "
                f"head with {HEAD}")
        head, tied = named[0], tuple(named[1:])
    else:
        head = find_head(model, state_dict)[0]
    if not tied and head in named and len(named) > 1:
        # timm's distilled models average two heads: naming one of them names both
        tied = tuple(n for n in named if n != head)
    out = linears[head].out_features
    for name in tied:
        if linears[name].weight.shape != linears[head].weight.shape:
            raise ArchitectureError(f"the heads {head} and {name} differ in shape; name the head "
                                    f"to retrain with {HEAD}")
    auxiliary = tuple(n for n, m in linears.items()
                      if m.out_features == out and n != head and n not in tied)
    return Heads(head, tied, auxiliary)


def find_head_of(arch: str, state_dict: Mapping[str, torch.Tensor],
                 head_layer: str | None = None) -> tuple[str, int]:
    """The head's name and number of classes for a checkpoint of `arch`, found by the one head
    finder (`find_heads`) on the architecture built without weights (on the meta device where
    it can be), before the real model is built with that many classes."""
    try:
        with torch.device("meta"):
            probe = build_model(arch, 1000, state_dict)
    except ArchitectureError:
        raise
    except Exception:  # a factory that cannot build on the meta device
        probe = build_model(arch, 1000, state_dict)
    name = find_heads(probe, head_layer, state_dict).head
    return name, head_out_features(state_dict, name)


@torch.no_grad()
def settle_auxiliary(model: nn.Module, heads: Heads, size: int) -> tuple[Heads, list[str]]:
    """Keep as auxiliary heads only the candidates the model does not use at eval time.

    A layer with as many outputs as the head is either a second head over the same classes
    (GoogLeNet's and Inception's auxiliary classifiers run in training only) or an internal
    layer whose width happens to equal the number of classes (Swin V2's `cpb_mlp` has one
    output per attention head: 3, 6, 12, 24). Re-ordering the rows of the latter would break
    the model, so each candidate's rows are permuted once on a probe image: the eval output
    unchanged means the layer is unused at eval time, an auxiliary head. Returns the settled
    heads and the candidates that are used (left as they are, and named in a warning).
    """
    if not heads.auxiliary:
        return heads, []
    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        reference = _flat(model(x))
    except Exception as exc:  # the model rejects this input size
        raise ArchitectureError(
            f"cannot run {type(model).__name__} on a {size}x{size} image ({exc}) to tell whether "
            f"{', '.join(heads.auxiliary)} (as many outputs as the head) are auxiliary heads; "
            f"check {ref('extract.crop')}") from exc
    auxiliary, used = [], []
    for name in heads.auxiliary:
        layer = model.get_submodule(name)
        saved = [t.detach().clone() for t in (layer.weight, layer.bias) if t is not None]
        perm = torch.roll(torch.arange(layer.out_features), 1)
        for t in (layer.weight, layer.bias):
            if t is not None:
                t.copy_(t[perm])
        try:
            same = torch.allclose(_flat(model(x)), reference, rtol=0, atol=0)
        finally:
            for t, old in zip([t for t in (layer.weight, layer.bias) if t is not None], saved,
                              strict=True):
                t.copy_(old)
        (auxiliary if same else used).append(name)
    model.train(was_training)
    return Heads(heads.head, heads.tied, tuple(auxiliary)), used


def _flat(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.reshape(-1)
    parts = out.values() if isinstance(out, Mapping) else out
    return torch.cat([_flat(p) for p in parts if isinstance(p, torch.Tensor | tuple | list)])


def _timm_heads(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    found = model.get_classifier()
    found = found if isinstance(found, tuple) else (found,)
    names = {id(m): n for n, m in modules.items()}
    return [names.get(id(m), "?") for m in found]


def split_backbone(model: nn.Module, heads: Heads | None = None
                   ) -> tuple[nn.Module, Heads, int]:
    """A copy of `model` whose head (and tied heads) are nn.Identity; returns (backbone, heads,
    feature dim)."""
    heads = heads or find_heads(model)
    dim = model.get_submodule(heads.head).in_features
    backbone = copy.deepcopy(model)
    for name in heads.replaced:
        parent_name, _, attr = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        setattr(parent, attr, nn.Identity())
    return backbone, heads, dim


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
            f"pass the right {ARCH}"
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
    """Every key's shape, but the head's (its number of classes is free)."""
    try:
        head_name = find_heads(model).head
    except ArchitectureError:  # a convolutional head (SqueezeNet): its last convolution
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        head_name = convs[-1] if convs else ""
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
            f"shapes; pass {ARCH} NAME (a torchvision name or package.module:function)"
        )
    raise ArchitectureError(
        f"the checkpoint's weights fit several architectures ({', '.join(matches)}); "
        f"pass {ARCH} NAME"
    )


def default_preprocess(arch: str, ckpt_args: Mapping | None = None,
                       model: nn.Module | None = None) -> tuple[Preprocess, str]:
    """The eval transform the model was validated with, and where that came from.

    A timm model: what timm's own train.py validates with (`resolve_data_config` over the
    checkpoint's args and the model's pretrained config: input size, crop_pct, interpolation,
    mean, std). Otherwise the training script's own `--val-resize-size/--val-crop-size` win;
    then the architecture's first published torchvision weights (the original recipe, e.g.
    256/224 for ResNet-50 V1); then the ImageNet convention 256/224.
    """
    ckpt_args = ckpt_args or {}
    if arch.startswith(TIMM) and model is not None:
        return _timm_preprocess(arch, ckpt_args, model)
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


def _timm_preprocess(arch: str, ckpt_args: Mapping, model: nn.Module) -> tuple[Preprocess, str]:
    import math

    from timm.data import resolve_data_config

    args = {k: v for k, v in ckpt_args.items() if isinstance(k, str)}
    try:
        cfg = resolve_data_config(args, model=model)
    except (AssertionError, TypeError, ValueError) as exc:
        log.warning("timm could not read the checkpoint's data args (%s); using the model's "
                    "own config", exc)
        cfg = resolve_data_config({}, model=model)
    _, height, width = cfg["input_size"]
    if height != width:
        log.warning("%s validates at %dx%d; stage 1 crops squares: using %d (or pass %s and %s)",
                    arch, height, width, height, ref("extract.resize"), ref("extract.crop"))
    mode = cfg.get("crop_mode") or "center"
    if mode != "center":
        log.warning("%s validates with timm's crop_mode %r; stage 1 uses a center crop",
                    arch, mode)
    interp = cfg.get("interpolation") or "bilinear"
    if interp not in ("bilinear", "bicubic", "nearest"):
        interp = "bicubic" if interp == "random" else "bilinear"
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    return (Preprocess(math.floor(height / crop_pct), int(height), interp,
                       tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])),
            f"timm's eval transform for {arch[len(TIMM):]} (crop_pct {crop_pct:g})")
