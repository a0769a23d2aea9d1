"""Each stage's settings, declared once: `ExtractSettings`, `TrainSettings`, `StitchSettings`.

A stage's settings are one frozen dataclass, and each field an `option`: its default, its help,
its flag (`--name-with-dashes` unless it names its own), and whether it changes what the stage
makes (`output=True`: `quickfix-labels` reruns the stage when it changes) or only how the stage
runs. The stage scripts and `quickfix-labels` make their flags from these declarations
(`add_options`), build the settings from the parsed flags (`from_args`), and hand them whole to
the stage's run function. Values are checked once, when the settings are made; an error names
the setting by reference (`errors.ref`), so each command shows it as its own flag.

Adding a flag to a stage is its field here plus its use in the stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from .errors import SCRIPT_NAMES, DataError, ref
from .presets import PRESETS

AUX_MODES = ("auto", "permute", "keep")


def option(default: Any = MISSING, *, help: str, output: bool = True, flags: Sequence[str] = (),
           shared: bool = False, cli: bool = True, **argparse_kwargs: Any):
    """A setting. `output`: it changes what the stage makes (else only how it runs); `flags`:
    its flag and aliases (default: from its name); `shared`: one flag and one value for every
    stage a command runs (--device); `cli=False`: set by the program, never a flag. The flag's
    type comes from the field's annotation (bool: a --x/--no-x switch; a list: one or more
    values); `argparse_kwargs` adds what the annotation cannot say (choices, metavar)."""
    meta = {"help": help, "output": output, "flags": tuple(flags), "shared": shared, "cli": cli,
            "argparse": argparse_kwargs}
    return field(default=default, metadata=meta)


def _declared(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]


def flags_of(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)


def _device():
    return option("auto", shared=True, choices=("auto", "cpu", "cuda"),
                  help="where to compute; auto picks cuda when available")


def _trust():
    return option(False, shared=True, output=False,
                  help="allow full (unsafe) unpickling of the checkpoint; only for files you "
                  "trust")


def _progress():
    return option(30.0, shared=True, output=False, metavar="SECONDS",
                  help="when stderr is not a terminal (a SLURM or nohup log), log a progress "
                  "line this often")


class StageSettings:
    """What the three settings classes share: declarations, building, checking, keys."""

    stage: ClassVar[str]

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Every value checked (raise DataError naming the setting by reference)."""

    @classmethod
    def key(cls, name: str) -> str:
        """The reference key of a setting: "stage.name", or "name" for a shared one."""
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        return name if f.metadata.get("shared") else f"{cls.stage}.{name}"

    @classmethod
    def ref(cls, name: str, value: Any = None, **kw) -> str:
        """The setting named in a message (see errors.ref)."""
        return ref(cls.key(name), value, **kw)

    def _at_least(self, name: str, low: int) -> None:
        value = getattr(self, name)
        if value is not None and value < low:
            need = "0 or more" if low == 0 else f"at least {low}"
            raise DataError(f"{self.ref(name, value)}: must be {need}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **given: Any):
        """The settings from a parsed command line (either command's), with `given` (what the
        command sets itself: paths it derives, the torchrun share) on top."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in given:
                values[f.name] = given[f.name]
            elif hasattr(args, dest_of(cls, f)):
                values[f.name] = getattr(args, dest_of(cls, f))
        return cls(**values)

    def output_key(self) -> dict[str, Any]:
        """The settings that change the stage's output, as plain JSON types (paths resolved):
        what `quickfix-labels` compares to tell whether the stage must run again."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("output", True):
                value = getattr(self, f.name)
                out[f.name] = str(value.resolve()) if isinstance(value, Path) else (
                    list(value) if isinstance(value, tuple | list) else value)
        return out

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


def stage_settings(cls: type) -> type:
    """A stage's settings class: a frozen, keyword-only dataclass whose settings' flags are the
    scripts' names for them (for messages rendered outside any command)."""
    cls = dataclass(frozen=True, kw_only=True)(cls)
    for f in _declared(cls):
        SCRIPT_NAMES.setdefault(cls.key(f.name), flags_of(f)[0])
    return cls


# ---------------------------------------------------------------------------------------------
# stage 1


@stage_settings
class ExtractSettings(StageSettings):
    """Stage 1: run the frozen backbone once and cache pooled features in a Zarr store."""

    stage: ClassVar[str] = "extract"

    checkpoint: Path = option(flags=("--checkpoint", "--resume"),
                              help="the trained model (training-script checkpoint or state dict)")
    data_root: Path = option(help="ImageFolder tree: DATA_ROOT/<split>/<class>/<image>")
    out: Path = option(help="the feature store to write")
    overwrite: bool = option(False, output=False,
                             help="replace a store made from other inputs, from files that "
                             "changed since, or by another version of this tool")
    splits: list[str] | None = option(None, metavar="SPLIT",
                                            help="split folders to extract (default: those "
                                            "present of train, val, validation, test)")
    class_order: Path | None = option(None, help="the correct class order: one class id per "
                                      "line, or imagenet_class_index.json form (default: sorted "
                                      "folder names)")
    dataset: str | None = option(None, metavar="NAME", help=(
        "a dataset whose standard order is built in, instead of --class-order: "
        f"{', '.join(sorted(PRESETS))} (the class folders are checked against it, and "
        "id_to_class gets its human names)"))
    arch: str | None = option(None, help="torchvision model name, timm:NAME (pip install "
                              "'quickfix-labels[timm]') or package.module:function (default: "
                              "the checkpoint's arch, else inferred from its weights)")
    resize: int | None = option(None, help="short-side resize (default: the architecture's "
                                "eval transform)")
    crop: int | None = option(None, help="center crop (default: the architecture's)")
    batch_size: int = option(128, output=False, metavar="N",
                             help="images per forward pass of the backbone")
    device: str = _device()
    decoder: str = option("auto", choices=("auto", "dali", "pil"),
                          help="auto: DALI when installed, else PIL")
    precision: str = option("auto", choices=("auto", "fp32", "bf16", "fp16"),
                            help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    float32: bool = option(False, help="store features as float32 instead of float16")
    chunk_rows: int = option(1024, help="rows per storage chunk (the unit of resume and of "
                             "writers)")
    num_threads: int | None = option(None, output=False, help="DALI decoder threads and torch "
                                     "CPU threads (default: cores, max 16)")
    read_workers: int | None = option(None, output=False, help=(
        "DALI worker processes that read, check and measure the files (default: a quarter of "
        "--num-threads, at least 1, at most 8)"))
    progress_every: float = _progress()
    ema: bool | None = option(None, help="use the checkpoint's EMA weights; stages 2 and 3 "
                              "follow the store's choice (default: the EMA for a timm checkpoint "
                              "that has one, as timm loads it, else the model)")
    head_layer: str | None = option(None, flags=("--head",), metavar="NAME", help=(
        "the classification layer to retrain, e.g. fc or head (default: timm's "
        "get_classifier(), else the last linear layer)"))
    verify: bool = option(False, output=False, help=(
        "read every chunk of an existing store and check its checksum (every run checks by "
        "listing that no chunk is missing); damaged chunks are recomputed"))
    per_class: str | None = option(None, metavar="K", help=(
        "extract only a class-stratified sample: K images of each class (fixed by the files' "
        "names, so a larger K holds the smaller sample), or SPLIT=K,... per split "
        "(train=2,val=2; a split not named is left out). For a triage by hand: "
        "train_head.py --relabel decides from it"))
    trust_checkpoint: bool = _trust()
    # independent jobs that share one store, by hand: RANK/WORLD_SIZE without torchrun
    rank: int = option(0, cli=False, output=False, help="this job's share of the chunks")
    world_size: int = option(1, cli=False, output=False, help="the number of shares")

    def check(self) -> None:
        for name in ("batch_size", "chunk_rows", "num_threads", "read_workers", "resize",
                     "crop"):
            self._at_least(name, 1)
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.dataset is not None and self.class_order is not None:
            raise DataError(f"give {self.ref('dataset')} or {self.ref('class_order')}, not both")
        self.sample_sizes()  # checked

    def sample_sizes(self) -> dict[str, int] | None:
        """--per-class as split -> K (None: every image; the key "*": every split)."""
        text = self.per_class
        if text is None:
            return None
        sizes: dict[str, int] = {}
        for part in str(text).split(","):
            split, _, k = part.strip().rpartition("=")
            try:
                value = int(k)
            except ValueError:
                value = 0
            if value < 1 or (split == "" and "=" in part):
                raise DataError(f"{self.ref('per_class', text)}: expected a count of images "
                                "per class (at least 1), or SPLIT=K,... (train=2,val=2)")
            sizes[split or "*"] = value
        if "*" in sizes and len(sizes) > 1:
            raise DataError(f"{self.ref('per_class', text)}: give one K for every split, or "
                            "SPLIT=K for each split, not both")
        return sizes

    @staticmethod
    def hand_share(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
        """RANK/WORLD_SIZE set by hand (independent jobs each taking a share of a store)."""
        return {"rank": int(environ.get("RANK", 0)),
                "world_size": int(environ.get("WORLD_SIZE", 1))}


# ---------------------------------------------------------------------------------------------
# stage 2

# the default grid, calibrated on real-image features (BENCHMARKS.md, "Stage 2 defaults")
DEFAULT_LR = "0.03,0.1,0.3,1"
DEFAULT_WD = "0,0.0001"


@stage_settings
class TrainSettings(StageSettings):
    """Stage 2: train only the classification head on the cached features (seconds)."""

    stage: ClassVar[str] = "train"

    features: Path = option(help="the feature store written by extract_features.py")
    out: Path = option(help="the head file to write")
    checkpoint: Path | None = option(None, flags=("--checkpoint", "--resume"), help=(
        "the original model: checked against the store, diagnosed, judged against the "
        "accuracy it records, and used for a warm start"))
    epochs: int = option(5, flags=("--epochs", "--fix-epochs"),
                         help="passes over the features")
    lr: str = option(DEFAULT_LR, help="learning rate(s), comma-separated: a grid in one pass")
    weight_decay: str = option(DEFAULT_WD, help=(
        "weight decay value(s), comma-separated: the L2 penalty wd/2*||W||^2 on the raw "
        "head's weight, as torch.optim.SGD(weight_decay=wd) on an nn.Linear's weight"))
    batch_size: int = option(256, help="the head's training batch")
    label_smoothing: float = option(0.0, help="label smoothing of the cross-entropy")
    warmup_epochs: float = option(1.0, help="linear warmup before the cosine decay")
    seed: int = option(0, help="the seed of the shuffles and the holdout")
    holdout_fraction: float = option(0.1, help="share of train held out to choose the grid "
                                     "point (never val)")
    init: str = option("auto", choices=("auto", "zeros", "old-head"), help=(
        "auto: the permuted old head when it is a permutation, else zeros"))
    # resident or streamed, the batches (and so the head) are the same
    stream: bool | None = option(None, output=False, help=(
        "stream batches from host memory instead of keeping the features on the device "
        "(default: resident when they fit)"))
    stream_from_store: bool | None = option(None, help=(
        "out of core: read the features from the store in chunks, with a bounded buffer, "
        "instead of loading them into host memory (default: when they do not fit in the host "
        "memory available)"))
    stream_buffer: float = option(64.0, metavar="MB", help=(
        "host memory for the out-of-core shuffle window and read-ahead (a larger window reads "
        "less in step with the training: on 2 CPU cores 64 MB gave the shortest epochs, "
        "BENCHMARKS.md)"))
    relabel: bool = option(False, help=(
        "triage instead of training: decide whether the old head is a relabel of the right one "
        "(a permutation, an offset, a superset's rows, or only its mapping) from a sample store "
        "(extract_features.py --per-class K), verify it on other images, and write it; an "
        "error, in one line, when it is not one"))
    relabel_confidence: float = option(0.99, metavar="P", help=(
        "the confidence of the relabel's verification: its test and its bound"))
    relabel_tolerance: float = option(0.05, metavar="T", help=(
        "a relabel is accepted when its verified top-1 is, with that confidence, at most T "
        "below each reference (the accuracy the checkpoint records, the same head trained "
        "further on the sample)"))
    device: str = _device()
    trust_checkpoint: bool = _trust()

    def check(self) -> None:
        lrs, wds = self.lrs, self.wds  # parsed, so checked
        if not 0.5 <= self.relabel_confidence < 1:
            raise DataError(f"{self.ref('relabel_confidence', self.relabel_confidence)}: must be "
                            "in [0.5, 1)")
        if not 0 <= self.relabel_tolerance < 1:
            raise DataError(f"{self.ref('relabel_tolerance', self.relabel_tolerance)}: must be "
                            "in [0, 1)")
        if self.relabel and self.checkpoint is None:
            raise DataError(f"{self.ref('relabel')} needs {self.ref('checkpoint')}: the old head "
                            "is what it judges")
        self._at_least("epochs", 0)
        self._at_least("batch_size", 1)
        for name in ("holdout_fraction", "label_smoothing"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise DataError(f"{self.ref(name, value)}: must be in [0, 1)")
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise DataError(f"{self.ref('warmup_epochs', self.warmup_epochs)}: must be 0 or "
                            "more")
        if len(lrs) * len(wds) > 1 and self.holdout_fraction == 0 and self.epochs > 0:
            raise DataError(f"a grid of several LR/WD values is chosen on a holdout: give "
                            f"{self.ref('holdout_fraction')} > 0, or a single "
                            f"{self.ref('lr')} and {self.ref('weight_decay')}")
        if self.init == "old-head" and self.checkpoint is None:
            raise DataError(f"{self.ref('init', 'old-head')} needs {self.ref('checkpoint')} "
                            "(the original model)")
        if self.epochs == 0 and (self.init == "zeros" or self.checkpoint is None):
            raise DataError(f"{self.ref('epochs', 0)} trains nothing: it needs "
                            f"{self.ref('checkpoint')} and {self.ref('init', 'auto')} or "
                            "old-head, so that the permuted old head is the fix")
        if not (math.isfinite(self.stream_buffer) and self.stream_buffer > 0):
            raise DataError(f"{self.ref('stream_buffer', self.stream_buffer)}: must be a "
                            "positive number of MB")

    @cached_property
    def lrs(self) -> list[float]:
        return parse_grid(self.lr, self.ref("lr"), allow_zero=False)

    @cached_property
    def wds(self) -> list[float]:
        return parse_grid(self.weight_decay, self.ref("weight_decay"), allow_zero=True)

    @property
    def buffer_bytes(self) -> int:
        return int(self.stream_buffer * 2**20)


def parse_grid(text: str, name: str, *, allow_zero: bool) -> list[float]:
    """Comma-separated values of the setting `name` (a reference or a flag)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise DataError(f"{name} {text!r}: expected numbers separated by commas") from exc
    if not values:
        raise DataError(f"{name} is empty: give at least one value")
    bad = [v for v in values if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero)]
    if bad:
        need = "non-negative" if allow_zero else "positive"
        raise DataError(f"{name}: {bad[0]} is not a valid value; every value must be {need}")
    return values


# ---------------------------------------------------------------------------------------------
# stage 3


@stage_settings
class StitchSettings(StageSettings):
    """Stage 3: write the new head and the correct class order into a copy of the model."""

    stage: ClassVar[str] = "stitch"

    checkpoint: Path = option(flags=("--checkpoint", "--resume"),
                              help="the original checkpoint (read only)")
    head_file: Path = option(flags=("--head",), help="written by train_head.py")
    out: Path = option(help="the fixed checkpoint to write")
    overwrite: bool = option(False, output=False,
                             help="replace an existing --out (never the input)")
    verify_data: Path | None = option(None, metavar="DIR", help=(
        "run the fixed model end to end on these val images (a split folder, or a root with "
        "val/) and report its top-1"))
    aux_heads: str = option("auto", choices=AUX_MODES, help=(
        "auxiliary heads over the same classes (GoogLeNet, Inception v3): auto re-orders them "
        "with stage 2's permutation when the old head was a clean permutation of the right one "
        "and refuses otherwise; permute always applies stage 2's best permutation; keep leaves "
        "them as they are"))
    copy_heads: list[Path] | None = option(None, metavar="HEAD", help=(
        "heads trained on the features of the model's other copies (stages 1 and 2 run once "
        "more with --ema, or --no-ema): each is written into the copy whose backbone it was "
        "trained on, --head into the others"))
    head_for_every_copy: bool = option(False, help=(
        "write a trained head into every copy of the model (EMA included) even when their "
        "backbones differ from the copy whose features trained it (default: refused, since "
        "each copy's features differ)"))
    verify_batch_size: int = option(128, output=False, metavar="N",
                                    help="images per batch of --verify-data")
    progress_every: float = _progress()
    device: str = _device()
    trust_checkpoint: bool = _trust()

    def check(self) -> None:
        if self.aux_heads not in AUX_MODES:
            raise DataError(f"{self.ref('aux_heads', self.aux_heads)}: expected one of "
                            f"{', '.join(AUX_MODES)}")
        self._at_least("verify_batch_size", 1)


# ---------------------------------------------------------------------------------------------
# flags from the declarations


def dest_of(cls: type, f: dataclasses.Field) -> str:
    """Where argparse keeps a setting: its name when shared by the stages, else stage.name (a
    command running several stages holds each stage's own --batch-size)."""
    return f.name if f.metadata.get("shared") else f"{cls.stage}.{f.name}"


def add_options(parser: argparse.ArgumentParser, cls: type, names: dict[str, str], *,
                skip: Sequence[str] = (), rename: Mapping[str, Sequence[str]] | None = None
                ) -> None:
    """Add `cls`'s settings as flags of `parser`, but those in `skip` (the command sets them
    itself); `rename`: setting -> this command's flags for it. Each setting's flag is recorded
    in `names` (reference key -> flag), the command's names for its messages. A shared setting
    that an earlier stage added is not added again."""
    hints = typing.get_type_hints(cls)
    have = {a.dest for a in parser._actions}
    for f in _declared(cls):
        if f.name in skip:
            continue
        flags = tuple((rename or {}).get(f.name, flags_of(f)))
        names[cls.key(f.name)] = flags[0]
        dest = dest_of(cls, f)
        if dest in have:
            continue
        kind = _kind(hints[f.name])
        if "action" not in kind and "choices" not in f.metadata["argparse"]:
            kind["metavar"] = f.name.upper()
        kwargs = {"dest": dest, "help": f.metadata["help"], **kind, **f.metadata["argparse"]}
        if f.default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        parser.add_argument(*flags, **kwargs)


def _kind(annotation: Any) -> dict[str, Any]:
    """argparse's type/action/nargs for a field's annotation (`X | None` as X)."""
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is list:
        return {"nargs": "+", "type": typing.get_args(annotation)[0]}
    return {"type": annotation} if annotation is not str else {}
