"""Stage 2 orchestration: check the store, diagnose the old head, train the grid, save the head.

    python train_head.py --features features.zarr --checkpoint checkpoint_best.pth --out head.pt
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import head as H
from . import store as S
from .checkpoint import backbone_digest, load_checkpoint
from .cli import run_record
from .errors import DataError, StoreError
from .report import plot_curves, write_jsonl

log = logging.getLogger("quickfix")


@dataclass
class TrainSummary:
    out: Path
    chosen: dict
    seconds: float
    epochs: int
    grid_points: int
    ms_per_epoch: float

    def line(self) -> str:
        c = self.chosen
        val = (f", val top-1 {c['val_top1']:.2%} top-5 {c['val_top5']:.2%}"
               if "val_top1" in c else "")
        hold = f", holdout top-1 {c['holdout_top1']:.2%}" if "holdout_top1" in c else ""
        return (f"train_head: lr={c['lr']:g} wd={c['weight_decay']:g} chosen of "
                f"{self.grid_points}{hold}{val}; {self.epochs} epochs in {self.seconds:.2f} s "
                f"({self.ms_per_epoch:.1f} ms/epoch) -> {self.out}")


def load_split(group, split: str, masks: Sequence[np.ndarray | None] = (None,)
               ) -> list[H.Features]:
    """The usable rows of `split`, one Features per mask (None: all), reading the arrays once."""
    g = group[split]
    ok = g["ok"][:].astype(bool)
    x = g["features"][:]
    y = g["labels"][:].astype(np.int64)
    out = []
    for rows in masks:
        keep = ok if rows is None else ok & rows
        out.append(H.Features(torch.from_numpy(np.ascontiguousarray(x[keep])),
                              torch.from_numpy(y[keep])))
    return out


def run_train(
    *,
    features: Path,
    out: Path,
    epochs: int = 5,
    lr: str = "0.01,0.03,0.1,0.3",
    weight_decay: str = "0,0.001,0.01",
    batch_size: int = 256,
    label_smoothing: float = 0.0,
    warmup_epochs: float = 1.0,
    device: str = "auto",
    seed: int = 0,
    holdout_fraction: float = 0.1,
    checkpoint: Path | None = None,
    init: str = "auto",
    stream: bool | None = None,
    trust_checkpoint: bool = False,
    argv: Sequence[str] | None = None,
) -> TrainSummary:
    # --- validate every input before any work ------------------------------------------------
    lrs = H.parse_grid(lr, "lr", allow_zero=False)
    wds = H.parse_grid(weight_decay, "weight-decay", allow_zero=True)
    if epochs < 0:
        raise DataError(f"--epochs {epochs}: must be 0 or more")
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: must be at least 1")
    if not 0 <= holdout_fraction < 1:
        raise DataError(f"--holdout-fraction {holdout_fraction}: must be in [0, 1)")
    if not 0 <= label_smoothing < 1:
        raise DataError(f"--label-smoothing {label_smoothing}: must be in [0, 1)")
    grid_size = len(lrs) * len(wds)
    if grid_size > 1 and holdout_fraction == 0 and epochs > 0:
        raise DataError("a grid of several LR/WD values is chosen on a holdout: "
                        "give --holdout-fraction > 0, or a single --lr and --weight-decay")
    if init in ("old-head",) and checkpoint is None:
        raise DataError("--init old-head needs --checkpoint (the original model)")
    if epochs == 0 and (init == "zeros" or checkpoint is None):
        raise DataError("--epochs 0 trains nothing: it needs --checkpoint and --init auto or "
                        "old-head, so that the permuted old head is the fix")
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda was given but no CUDA device is available")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       device if device != "auto" else "cpu")
    if dev.type == "cuda":
        # cuBLAS needs this for bit-identical reruns (set before its first use)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    group = S.open_store(features)
    splits = group.attrs["splits"]
    if "train" not in splits:
        raise StoreError(f"{features} has no train split (splits: {', '.join(splits)})")
    for split in splits:
        S.verify_complete(group, split)
    classes = list(group.attrs["classes"])
    components = group.attrs["fingerprint"]["components"]
    num_classes, dim = len(classes), int(components["feature_dim"])

    labels_all = group["train"]["labels"][:]
    ok_all = group["train"]["ok"][:].astype(bool)
    if not ok_all.any():
        raise DataError(f"the train split of {features} has no usable rows (all quarantined)")
    present = np.unique(labels_all[ok_all])
    if present.size < 2:
        raise DataError(f"the train split of {features} holds only one class "
                        f"({classes[int(present[0])]}); a classifier needs at least two")
    holdout_mask = H.holdout_split(np.where(ok_all, labels_all, -1), holdout_fraction, seed)
    holdout_mask &= ok_all

    old_head = None
    if checkpoint is not None:
        old_head = _old_head(checkpoint, components, classes, dim, group.attrs.get("checkpoint"),
                             trust_checkpoint)

    # --- load features ----------------------------------------------------------------------
    train, holdout = load_split(group, "train", (~holdout_mask, holdout_mask))
    evals: dict[str, H.Features] = {}
    if len(holdout):
        evals["holdout"] = holdout
    if "val" in splits:
        (val,) = load_split(group, "val")
        if len(val):
            evals["val"] = val
    resident = _fits(train, dev) if stream is None else not stream
    if resident:
        train = H.Features(train.x.to(dev), train.y.to(dev))
    elif dev.type == "cuda":
        train = H.Features(train.x.pin_memory(), train.y.pin_memory())
    log.info("train: %d rows (%s), holdout %d, val %d; %d classes, %d-d features on %s",
             len(train), "resident" if resident else "streamed", int(holdout_mask.sum()),
             len(evals["val"]) if "val" in evals else 0, num_classes, dim, dev)

    # --- diagnosis and initialisation --------------------------------------------------------
    diagnosis = None
    init_tensors = None
    if old_head is not None:
        diagnosis = H.diagnose(train, *old_head, device=dev)  # holdout rows stay unseen
        log.info(diagnosis.line())
        permuted = (old_head[0][diagnosis.mapping], old_head[1][diagnosis.mapping])
        if init == "old-head" or (init == "auto" and diagnosis.is_permutation):
            init_tensors = permuted
            log.info("starting from the old head with its rows permuted")
        elif init == "auto":
            log.info("starting from zeros (the old head is not a clean permutation)")
    if epochs == 0 and init_tensors is None:
        raise DataError("--epochs 0: the old head is not a permutation of the right one, so "
                        "there is nothing to reuse; train with --epochs N")

    # --- train --------------------------------------------------------------------------------
    config = H.TrainConfig(lrs=lrs, wds=wds, epochs=epochs, batch_size=batch_size,
                           label_smoothing=label_smoothing, warmup_epochs=warmup_epochs,
                           seed=seed)
    torch.manual_seed(seed)

    def progress(epoch: int, records: list[dict]) -> None:
        best = records[H.choose(records, "holdout")] if "holdout" in evals else records[0]
        key = "holdout" if "holdout" in evals else "val" if "val" in evals else None
        extra = f", best {key} top-1 {best[f'{key}_top1']:.2%}" if key else ""
        log.info("epoch %d/%d: train loss %.4f%s", epoch, epochs, best["train_loss"], extra)

    if epochs > 0:
        result = H.train_heads(train, config, num_classes=num_classes, device=dev,
                               init=init_tensors, evals=evals, on_epoch=progress)
        final = result.history[-grid_size:]
    else:
        weight = init_tensors[0][None].expand(grid_size, -1, -1).float().clone()
        bias = init_tensors[1][None].expand(grid_size, -1).float().clone()
        result = H.TrainResult(weight, bias)
        final = [{"epoch": 0, "lr": lr_, "weight_decay": wd_} for lr_, wd_ in config.grid()]
        for name, feats in evals.items():
            for rec, m in zip(final, H.evaluate(feats, weight.to(dev), bias.to(dev), device=dev),
                              strict=True):
                rec.update({f"{name}_{k}": v for k, v in m.items()})
        result.history = final
    best = H.choose(final, "holdout") if "holdout" in evals else 0
    chosen = final[best]
    for rec in final:
        log.info("  lr=%-8g wd=%-8g %s", rec["lr"], rec["weight_decay"], "  ".join(
            f"{k} {rec[k]:.2%}" for k in ("holdout_top1", "val_top1", "val_top5") if k in rec)
            + ("   <- chosen" if rec is chosen else ""))

    # --- outputs ------------------------------------------------------------------------------
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "weight": result.weight[best].clone(),
        "bias": result.bias[best].clone(),
        "classes": classes,
        "store": {"path": str(features.resolve()),
                  "fingerprint": group.attrs["fingerprint"]["digest"],
                  "backbone_sha256": components["backbone_sha256"],
                  "arch": components["arch"], "head": components["head"],
                  "other_heads": components.get("other_heads", {}),
                  "ema": bool(group.attrs.get("checkpoint", {}).get("ema", False)),
                  "feature_dim": dim},
        "config": {**asdict(config), "init": "old-head (permuted)" if init_tensors is not None
                   else "zeros", "resident": resident, "device": dev.type,
                   "holdout_fraction": holdout_fraction},
        "metrics": chosen,
        "grid": final,
        "diagnosis": diagnosis.as_dict() if diagnosis else None,
        "record": run_record(argv, {"features": str(features), "out": str(out),
                                    "checkpoint": str(checkpoint) if checkpoint else None}),
    }
    _save_atomic(payload, out)
    write_jsonl(out.with_suffix(".metrics.jsonl"), result.history)
    if result.history and epochs > 0:
        plot_curves(out.with_suffix(".curves.png"), result.history,
                    (chosen["lr"], chosen["weight_decay"]))
    ms = 1000 * float(np.median(result.epoch_seconds)) if result.epoch_seconds else 0.0
    return TrainSummary(out, chosen, result.seconds, epochs, grid_size, ms)


def _fits(train: H.Features, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    need = train.x.numel() * train.x.element_size() + train.y.numel() * 8
    return need < 0.7 * free


def _old_head(path: Path, components: dict, classes: list[str], dim: int, stored: dict | None,
              trust: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The original head, after checking that the store was made from this checkpoint."""
    use_ema = bool((stored or {}).get("ema", False))
    ckpt = load_checkpoint(path, trust=trust, use_ema=use_ema)
    head = components["head"]
    digest = backbone_digest(ckpt.state_dict, head, components.get("other_heads"))
    if digest != components["backbone_sha256"]:
        which = f"the {ckpt.source_key} weights of " if use_ema else ""
        raise StoreError(
            f"the feature store was not made from {which}{path}: its backbone weights differ "
            "(rerun extract_features.py with this checkpoint)")
    weight = ckpt.state_dict.get(f"{head}.weight")
    bias = ckpt.state_dict.get(f"{head}.bias")
    if weight is None or weight.shape != (len(classes), dim):
        shape = None if weight is None else tuple(weight.shape)
        raise StoreError(f"{path}: head {head}.weight has shape {shape}, the store needs "
                         f"({len(classes)}, {dim})")
    if ckpt.classes is not None and sorted(ckpt.classes) != sorted(classes):
        raise StoreError(f"{path} names other classes than the feature store "
                         "(compare its id_to_class/class_to_idx with the store's classes)")
    if bias is None:
        bias = torch.zeros(len(classes))
    return weight.detach().float(), bias.detach().float()


def _save_atomic(payload: dict, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)


def load_head(path: Path) -> dict:
    """A head file written by train_head.py (safe to load: plain types and tensors only)."""
    if not path.is_file():
        raise DataError(f"head file {path} does not exist; run train_head.py first")
    return torch.load(path, map_location="cpu", weights_only=True)

