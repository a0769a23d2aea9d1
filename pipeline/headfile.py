"""head.pt: what stage 2 hands stage 3 and `quickfix-labels`, as one record.

On disk a plain dict of tensors and plain types (`torch.save`; it loads with
`weights_only=True`):

    weight [C, D], bias [C]   the chosen head, for the raw features
    classes, class_names      the correct order (the store's) and the classes' human names
    store                     what the features were made from (`Source`): the store's path and
                              fingerprint, the backbone's digest, arch, head layer and other
                              heads, the EMA choice, the feature size, and the eval transform,
                              decoder and precision the images were read with
    config, metrics, grid     the training settings, the chosen candidate's scores, every
                              candidate's scores
    diagnosis                 the old head's permutation and the backbone's verdict
    record                    provenance (command line, versions, commit, host, time)

Stage 3 needs nothing from the store: the head record says how to read images as stage 1 did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_head
from .files import atomic_write
from .models import Preprocess
from .store import FeatureStore

# stage 2's name for the candidate that is the old head, its rows permuted (no training)
OLD_HEAD = "old head (permuted)"

@dataclass(frozen=True)
class Source:
    """What a head's features were made from (head.pt's `store`)."""

    path: str
    fingerprint: str
    backbone_sha256: str
    arch: str
    head_layer: str
    other_heads: dict = field(default_factory=dict)
    ema: bool = False
    feature_dim: int = 0
    # how stage 1 read the images (None in head files of earlier versions, and for a store
    # that records none)
    preprocessing: Preprocess | None = None
    decoder: str | None = None  # pil, dali-cpu or dali-mixed
    precision: str | None = None

    @classmethod
    def of(cls, store: FeatureStore) -> Source:
        c = store.components
        return cls(path=str(store.path.resolve()), fingerprint=store.digest,
                   backbone_sha256=c["backbone_sha256"], arch=c["arch"], head_layer=c["head"],
                   other_heads=c.get("other_heads", {}), ema=store.ema,
                   feature_dim=store.feature_dim, preprocessing=store.preprocessing,
                   decoder=store.decoder, precision=store.precision)

    def as_dict(self) -> dict:
        pre = self.preprocessing
        return {"path": self.path, "fingerprint": self.fingerprint,
                "backbone_sha256": self.backbone_sha256, "arch": self.arch,
                "head": self.head_layer, "other_heads": self.other_heads, "ema": self.ema,
                "feature_dim": self.feature_dim,
                "preprocessing": pre.as_dict() if pre is not None else None,
                "decoder": self.decoder, "precision": self.precision}

    @classmethod
    def from_dict(cls, d: dict) -> Source:
        p = d.get("preprocessing")
        pre = Preprocess.from_dict(p) if p is not None else None
        return cls(path=d["path"], fingerprint=d["fingerprint"],
                   backbone_sha256=d["backbone_sha256"], arch=d["arch"], head_layer=d["head"],
                   other_heads=dict(d.get("other_heads") or {}), ema=bool(d.get("ema", False)),
                   feature_dim=int(d.get("feature_dim", 0)), preprocessing=pre,
                   decoder=d.get("decoder"), precision=d.get("precision"))


@dataclass(frozen=True)
class HeadRecord:
    """A trained head and everything stage 3 and `quickfix-labels` need to know about it."""

    weight: torch.Tensor
    bias: torch.Tensor
    classes: list[str]
    source: Source
    class_names: list[str] | None = None
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # the chosen candidate's scores
    grid: list[dict] = field(default_factory=list)  # every candidate's
    diagnosis: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str] | None:
        """The classes' human names, when there is one for each class."""
        names = self.class_names
        return list(names) if names is not None and len(names) == len(self.classes) else None

    @property
    def val_top1(self) -> float | None:
        return self.metrics.get("val_top1")

    @property
    def mapping(self) -> list[int] | None:
        """Stage 2's permutation of the old head (new row t = old row mapping[t]), if any."""
        return self.diagnosis.get("mapping")

    @property
    def relabel(self) -> dict | None:
        """When this head is the old one relabelled (its rows re-ordered or picked, nothing
        trained): the triage's decision, or stage 2's permuted old head chosen over the trained
        ones. Stage 3 then re-orders every copy's own rows."""
        found = self.diagnosis.get("relabel")
        if found is None and self.metrics.get("candidate") == OLD_HEAD and \
                self.mapping is not None and self.diagnosis.get("is_permutation"):
            found = {"kind": "permutation", "by": "stage 2 (the permuted old head chosen)"}
        return found

    def as_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "bias": self.bias, "classes": list(self.classes),
                "class_names": self.class_names, "store": self.source.as_dict(),
                "config": self.config, "metrics": self.metrics, "grid": self.grid,
                "diagnosis": self.diagnosis, "record": self.record}

    def save(self, path: Path) -> None:
        payload = self.as_dict()
        atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path: Path) -> HeadRecord:
        """A head file, through the checkpoint loader's error boundary (one line for a file
        that is not one)."""
        raw = load_head(path)
        return cls(weight=raw["weight"], bias=raw["bias"], classes=list(raw["classes"]),
                   source=Source.from_dict(raw["store"]), class_names=raw.get("class_names"),
                   config=dict(raw["config"]), metrics=dict(raw["metrics"]),
                   grid=list(raw.get("grid") or []), diagnosis=dict(raw.get("diagnosis") or {}),
                   record=dict(raw.get("record") or {}))
