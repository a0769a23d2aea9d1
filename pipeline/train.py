"""Stage 2 orchestration: check the store, diagnose the old head, train the grid, save the head.

    python train_head.py --features features.zarr --checkpoint checkpoint_best.pth --out head.pt
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import dist as Dist
from . import head as H
from . import store as S
from .checkpoint import backbone_digest, load_checkpoint
from .cli import run_record
from .errors import DataError, StoreError
from .files import atomic_write, resolve_device
from .report import plot_curves, warn_backbone, write_jsonl
from .streaming import StoreRows, WindowBatches, available_memory

log = logging.getLogger("quickfix")

# the default grid, calibrated on real-image features (BENCHMARKS.md, "Stage 2 defaults")
DEFAULT_LR = "0.03,0.1,0.3,1"
DEFAULT_WD = "0,0.0001"


OLD_HEAD = "old head (permuted)"

# The "don't use when" check (README, "Is the backbone worth fixing?"). A linear probe whose
# holdout top-1 stays within UNTRAINED_MARGIN of the way from chance (the most common class's
# share) to 100% finds features that barely separate the classes: the backbone is "untrained".
# A fix whose top-1 lands below WEAK_RATIO of the accuracy the checkpoint records, and at least
# WEAK_POINTS below it, is "weak": the features are not those of the model that reached it.
UNTRAINED_MARGIN = 0.10
WEAK_RATIO = 0.85
WEAK_POINTS = 0.05
WEAK_CAUSES = ("usually other weights (another checkpoint, or the EMA instead of the model: "
               "--ema/--no-ema), another eval transform (--resize/--crop, the interpolation or "
               "the normalization), or other data than the recorded figure's")


@dataclass
class Verdict:
    """Is the backbone worth fixing? "ok", "weak", "untrained", or "unknown" (no holdout and
    no val to judge on)."""

    backbone: str
    recorded_top1: float | None
    recorded_key: str | None = None
    message: str | None = None  # why, for a verdict other than "ok"

    def as_dict(self) -> dict:
        return {"backbone": self.backbone, "recorded_top1": self.recorded_top1,
                "recorded_key": self.recorded_key, "backbone_message": self.message}


def judge_backbone(chosen: dict, rows: dict[str, np.ndarray],
                   recorded: tuple[float, str] | None, num_classes: int) -> Verdict:
    """The verdict on the backbone from the chosen head's scores. The probe is judged on the
    holdout and val rows together (`rows`: each one's labels), so a small holdout is not luck."""
    rec, key = recorded if recorded is not None else (None, None)
    parts = [k for k in ("holdout", "val") if f"{k}_top1" in chosen and rows.get(k) is not None
             and rows[k].size]
    if parts:
        labels = np.concatenate([rows[k] for k in parts])
        probe = sum(chosen[f"{k}_top1"] * rows[k].size for k in parts) / labels.size
        floor = float(np.bincount(labels).max() / labels.size)  # the most common class's share
    else:
        probe, floor = None, 1 / max(num_classes, 1)
    bar = floor + UNTRAINED_MARGIN * (1 - floor)
    where = " and ".join(parts)
    if probe is not None and probe < bar:
        return Verdict("untrained", rec, key, (
            f"a linear probe on the cached features reaches {probe:.1%} top-1 on the {where} "
            f"rows, barely above chance ({floor:.1%}, the most common class's share; "
            f"'untrained' below {bar:.1%}): the backbone's features do not separate these "
            "classes, so the model never learned them. A head fix cannot help; it needs full "
            "training (or check that the data is the one it was trained on)"))
    if probe is None and rec is not None and rec < bar:  # a probe that passes outweighs it
        return Verdict("untrained", rec, key, (
            f"the checkpoint records top-1 {rec:.1%} ({key}), barely above chance "
            f"({floor:.1%}): the model never converged. A head fix cannot make it better than "
            "it was; it needs full training"))
    fix = "val" if "val_top1" in chosen else "holdout" if "holdout_top1" in chosen else None
    if fix is None:
        return Verdict("unknown", rec, key, "no holdout and no val split to judge the "
                       "backbone on (--holdout-fraction 0 and no val/ in the store)")
    top1 = chosen[f"{fix}_top1"]
    if rec is not None and top1 < WEAK_RATIO * rec and rec - top1 >= WEAK_POINTS:
        return Verdict("weak", rec, key, (
            f"the fix reaches {top1:.1%} {fix} top-1, far below the {rec:.1%} the checkpoint "
            f"records ({key}): the cached features are not those of the model that reached "
            f"it; {WEAK_CAUSES}"))
    return Verdict("ok", rec, key)


@dataclass
class TrainSummary:
    out: Path
    chosen: dict
    seconds: float
    epochs: int
    candidates: int
    ms_per_epoch: float
    ranks: int = 1
    verdict: Verdict | None = None

    def line(self) -> str:
        c = self.chosen
        val = (f", val top-1 {c['val_top1']:.2%} top-5 {c['val_top5']:.2%}"
               if "val_top1" in c else "")
        hold = f", holdout top-1 {c['holdout_top1']:.2%}" if "holdout_top1" in c else ""
        v = self.verdict
        judged = "" if v is None else (
            (f"; recorded top-1 {v.recorded_top1:.2%}" if v.recorded_top1 is not None else "")
            + f"; backbone {v.backbone}")
        return (f"train_head: {describe(c)} chosen of {self.candidates}{hold}{val}{judged}; "
                f"{self.epochs} epochs in {self.seconds:.2f} s ({self.ms_per_epoch:.1f} "
                f"ms/epoch{f' on {self.ranks} ranks' if self.ranks > 1 else ''}) -> {self.out}")


def describe(record: dict) -> str:
    """A candidate's name: its grid point, or the permuted old head."""
    if record.get("candidate") == OLD_HEAD:
        return f"the {OLD_HEAD}"
    return f"lr={record['lr']:g} wd={record['weight_decay']:g}"


@dataclass
class Settings:
    """The validated command line."""

    config: H.TrainConfig
    device: torch.device
    holdout_fraction: float
    init: str
    stream: bool | None
    from_store: bool | None = None  # out of core: None decides by the host memory available
    buffer_bytes: int = 64 << 20
    group: Dist.Group = field(default_factory=Dist.Group.single)


@dataclass
class Inputs:
    """What stage 2 reads: the store's usable rows (train without its holdout, and the splits
    to evaluate on), its identity, and the original head when a checkpoint was given."""

    group: object
    classes: list[str]
    components: dict
    train: H.Features | StoreRows
    evals: dict[str, H.Features | StoreRows]
    old_head: tuple[torch.Tensor, torch.Tensor] | None
    resident: bool
    batches: WindowBatches | None = None  # out of core: batches read from the store
    shard: H.Shard | None = None  # under torchrun: this rank's rows
    recorded: tuple[float, str] | None = None  # the top-1 the checkpoint records, and its key
    judged: dict[str, np.ndarray] = field(default_factory=dict)  # holdout/val -> their labels


@dataclass
class Outcome:
    weight: torch.Tensor
    bias: torch.Tensor
    chosen: dict
    candidates: list[dict]  # every grid point's final epoch, then the permuted old head
    history: list[dict]  # one record per (epoch, grid point)
    init: str
    diagnosis: H.Diagnosis | None
    seconds: float = 0.0
    ms_per_epoch: float = 0.0
    verdict: Verdict | None = None


def run_train(
    *,
    features: Path,
    out: Path,
    epochs: int = 5,
    lr: str = DEFAULT_LR,
    weight_decay: str = DEFAULT_WD,
    batch_size: int = 256,
    label_smoothing: float = 0.0,
    warmup_epochs: float = 1.0,
    device: str = "auto",
    seed: int = 0,
    holdout_fraction: float = 0.1,
    checkpoint: Path | None = None,
    init: str = "auto",
    stream: bool | None = None,
    stream_from_store: bool | None = None,
    stream_buffer_mb: float = 64,
    trust_checkpoint: bool = False,
    group: Dist.Group | None = None,
    argv: Sequence[str] | None = None,
) -> TrainSummary:
    """validate -> load -> fit (diagnose, train the grid, choose) -> write.

    Under torchrun (`group` joined) every rank holds a share of the rows, the gradients are
    summed over the ranks, every rank ends with the same head, and rank 0 writes it."""
    grp = group or Dist.Group.single()
    # a user error on any rank stops every rank, with one line (rank 0's)
    settings = grp.agree(lambda: validate(
        epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
        label_smoothing=label_smoothing, warmup_epochs=warmup_epochs, device=device, seed=seed,
        holdout_fraction=holdout_fraction, checkpoint=checkpoint, init=init, stream=stream,
        from_store=stream_from_store, buffer_mb=stream_buffer_mb, group=grp))
    inputs = grp.agree(lambda: load(features, checkpoint, settings, trust_checkpoint))
    outcome = grp.agree(lambda: fit(inputs, settings))
    if grp.collective:
        _check_same_head(grp, outcome)
    if grp.main:
        warn_backbone(outcome.verdict.as_dict(), "train_head")
        write(out, features, checkpoint, inputs, settings, outcome, argv)
    return TrainSummary(out, outcome.chosen, outcome.seconds, epochs, len(outcome.candidates),
                        outcome.ms_per_epoch, grp.world if grp.collective else 1,
                        outcome.verdict)


def _grid_text(config) -> str:
    return ",".join(f"{lr:g}" for lr in sorted({lr for lr, _ in config.grid()}))


def _check_same_head(grp: Dist.Group, outcome: Outcome) -> None:
    """Every rank took the same steps from the same summed gradients: say so, or stop."""
    digest = hashlib.sha256(outcome.weight.numpy().tobytes() + outcome.bias.numpy().tobytes())
    digests = [None] * grp.world
    torch.distributed.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks ended with different heads: {digests}")
    log.info("the %d ranks hold the same head (sha256 %s)", grp.world, digests[0][:12])


def validate(*, epochs: int, lr: str, weight_decay: str, batch_size: int,
             label_smoothing: float, warmup_epochs: float, device: str, seed: int,
             holdout_fraction: float, checkpoint: Path | None, init: str,
             stream: bool | None, from_store: bool | None = None, buffer_mb: float = 64,
             group: Dist.Group | None = None) -> Settings:
    """Every value checked, before anything is read."""
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
    if not (math.isfinite(warmup_epochs) and warmup_epochs >= 0):
        raise DataError(f"--warmup-epochs {warmup_epochs}: must be 0 or more")
    if len(lrs) * len(wds) > 1 and holdout_fraction == 0 and epochs > 0:
        raise DataError("a grid of several LR/WD values is chosen on a holdout: "
                        "give --holdout-fraction > 0, or a single --lr and --weight-decay")
    if init == "old-head" and checkpoint is None:
        raise DataError("--init old-head needs --checkpoint (the original model)")
    if epochs == 0 and (init == "zeros" or checkpoint is None):
        raise DataError("--epochs 0 trains nothing: it needs --checkpoint and --init auto or "
                        "old-head, so that the permuted old head is the fix")
    if not (math.isfinite(buffer_mb) and buffer_mb > 0):
        raise DataError(f"--stream-buffer {buffer_mb}: must be a positive number of MB")
    group = group or Dist.Group.single()
    if from_store and group.collective:
        raise DataError("--stream-from-store runs in one process; under torchrun each rank "
                        "holds its share of the rows in memory: add ranks until it fits")
    dev = resolve_device(device)
    if dev.type == "cuda":
        # cuBLAS needs this for bit-identical reruns (set before its first use)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    config = H.TrainConfig(lrs=lrs, wds=wds, epochs=epochs, batch_size=batch_size,
                           label_smoothing=label_smoothing, warmup_epochs=warmup_epochs,
                           seed=seed)
    return Settings(config, dev, holdout_fraction, init, stream, from_store,
                    int(buffer_mb * 2**20), group)


def load(features: Path, checkpoint: Path | None, settings: Settings, trust: bool) -> Inputs:
    """The store checked complete and usable, its rows split into train and holdout and placed
    on the device (or left on the host to stream), and the original head."""
    group = S.open_store(features)
    splits = group.attrs["splits"]
    if "train" not in splits:
        raise StoreError(f"{features} has no train split (splits: {', '.join(splits)})")
    writer = S.writer_of(features)
    if writer is not None:
        raise StoreError(f"{features} is being written by a stage 1 run ({writer}); wait for it "
                         "to end")
    damage = S.check_store(group)  # by listing: nothing is ever trained on a fill value
    if damage:
        raise StoreError(f"the feature store {features} is damaged ({damage.describe()}): rerun "
                         "extract_features.py with the same arguments to repair it")
    for split in splits:
        S.verify_complete(group, split)
        S.check_digests(group, split, ("labels", "ok"))  # the features: as they are read
    classes = list(group.attrs["classes"])
    components = group.attrs["fingerprint"]["components"]
    dim = int(components["feature_dim"])

    labels_all = S.read_rows(group, "train", "labels")
    ok_all = S.read_rows(group, "train", "ok").astype(bool)
    if not ok_all.any():
        raise DataError(f"the train split of {features} has no usable rows (all quarantined)")
    present = np.unique(labels_all[ok_all])
    if present.size < 2:
        raise DataError(f"the train split of {features} holds only one class "
                        f"({classes[int(present[0])]}); a classifier needs at least two")
    holdout_mask = H.holdout_split(np.where(ok_all, labels_all, -1), settings.holdout_fraction,
                                   settings.config.seed) & ok_all
    old_head, recorded = None, None
    if checkpoint is not None:
        *old_head, recorded = _old_head(checkpoint, components, classes, dim,
                                        group.attrs.get("checkpoint"), trust)
        old_head = tuple(old_head)
    judged = {"holdout": labels_all[holdout_mask]}

    masks = {"train": ("train", ok_all & ~holdout_mask)}
    if holdout_mask.any():
        masks["holdout"] = ("train", holdout_mask)
    if "val" in splits:
        val_ok = S.read_rows(group, "val", "ok").astype(bool)
        if val_ok.any():
            masks["val"] = ("val", val_ok)
            judged["val"] = S.read_rows(group, "val", "labels")[val_ok]
    grp, dev = settings.group, settings.device
    counts = {k: int(mask.sum()) for k, (_, mask) in masks.items()}
    shard = None
    if grp.collective:  # this rank's share of each split's usable rows
        total = int(masks["train"][1].sum())
        bounds = np.array_split(np.arange(total), grp.world)[grp.rank]
        shard = H.Shard(int(bounds[0]) if bounds.size else 0,
                        int(bounds[-1]) + 1 if bounds.size else 0, total)
        masks = {k: (split, _share(mask, grp)) for k, (split, mask) in masks.items()}
    need = sum(int(mask.sum()) for _, mask in masks.values()) * dim * \
        group["train"]["features"].dtype.itemsize

    def rows(key: str, side: np.ndarray | None = None) -> StoreRows:
        split, mask = masks[key]
        return StoreRows(group, split, mask, side=side,
                         labels=labels_all if split == "train" else None)

    # train with the holdout rows flagged: they share the chunks, so one read serves both
    hold = masks["holdout"][1] if "holdout" in masks else None
    out_of_core = settings.from_store
    if out_of_core is None:
        out_of_core = need > 0.6 * available_memory()
        if out_of_core and grp.collective:
            raise DataError(f"this rank's share of the features ({need / 2**30:.1f} GiB) does "
                            "not fit in its host memory: run more ranks (torchrun "
                            "--nproc-per-node, --nnodes)")
        if out_of_core:
            log.info("the features (%.1f GiB) do not fit in host memory (%.1f GiB available): "
                     "reading them from the store", need / 2**30, available_memory() / 2**30)
    batches, where = None, None
    if out_of_core:
        train = rows("train")
        evals: dict = {k: rows(k) for k in masks if k != "train"}
        # the holdout is scored in the training pass, as its chunks pass
        batches = WindowBatches(rows("train", hold), settings.config.batch_size, dev,
                                buffer_bytes=settings.buffer_bytes, seed=settings.config.seed,
                                side_name="holdout")
        resident = False
        if components.get("row_order") is None:
            log.warning("this store keeps its rows in folder order (made before row_order "
                        "%s): out of core, a window of chunks holds few classes and the "
                        "batches mix badly; rebuild it with extract_features.py --overwrite, "
                        "or train in memory (--no-stream-from-store)", "permuted-v1")
        where = (f"out of core: a window of {batches.window} chunks "
                 f"({batches.window * train.chunk_rows} rows)")
    else:
        train, held = rows("train", hold).load()
        evals = {"holdout": held} if held is not None else {}
        if "val" in masks:
            evals["val"] = rows("val").load()[0]
        resident = _fits([train, *evals.values()], dev) if settings.stream is None \
            else not settings.stream
        if resident:
            train = H.Features(train.x.to(dev), train.y.to(dev))
            evals = {k: H.Features(v.x.to(dev), v.y.to(dev)) for k, v in evals.items()}
        # streamed: the rows stay where they are; each batch is gathered into a pinned buffer
        where = "resident" if resident else "streamed"
    ranks = f"; rank {grp.rank} of {grp.world} holds {len(train)}" if shard else ""
    log.info("train: %d rows (%s%s), holdout %d, val %d; %d classes, %d-d features on %s",
             counts["train"], where, ranks, counts.get("holdout", 0), counts.get("val", 0),
             len(classes), dim, dev)
    return Inputs(group, classes, components, train, evals, old_head, resident, batches, shard,
                  recorded, judged)


def _share(mask: np.ndarray, grp: Dist.Group) -> np.ndarray:
    """This rank's contiguous share of the rows `mask` selects."""
    rows = np.array_split(np.flatnonzero(mask), grp.world)[grp.rank]
    mine = np.zeros_like(mask)
    mine[rows] = True
    return mine


def fit(inputs: Inputs, settings: Settings) -> Outcome:
    """Diagnose the old head, train the grid, and choose among the grid's final points and the
    permuted old head (epoch 0) on the holdout."""
    config, dev, evals = settings.config, settings.device, inputs.evals
    diagnosis, permuted, init_tensors = None, None, None
    if inputs.old_head is not None:
        diagnosis = H.diagnose(inputs.train, *inputs.old_head, device=dev)  # holdout unseen
        log.info(diagnosis.line())
        permuted = (inputs.old_head[0][diagnosis.mapping],
                    inputs.old_head[1][diagnosis.mapping])
        if settings.init == "old-head" or (settings.init == "auto" and diagnosis.is_permutation):
            init_tensors = permuted
            log.info("starting from the old head with its rows permuted")
        elif settings.init == "auto" and config.epochs > 0:
            log.info("starting from zeros (the old head is not a clean permutation)")
    if config.epochs == 0 and init_tensors is None:
        raise DataError("--epochs 0: the old head is not a permutation of the right one, so "
                        "there is nothing to reuse; train with --epochs N")

    candidates: list[dict] = []
    heads: list[tuple[torch.Tensor, torch.Tensor]] = []
    history: list[dict] = []
    result = None
    if config.epochs > 0:
        torch.manual_seed(config.seed)

        def progress(epoch: int, records: list[dict]) -> None:
            key = "holdout" if "holdout" in evals else "val" if "val" in evals else None
            best = records[H.choose(records, key)] if key else records[0]
            extra = f", best {key} top-1 {best[f'{key}_top1']:.2%}" if key else ""
            log.info("epoch %d/%d: train loss %.4f%s", epoch, config.epochs, best["train_loss"],
                     extra)

        result = H.train_heads(inputs.train, config, num_classes=len(inputs.classes),
                               device=dev, init=init_tensors, evals=evals, on_epoch=progress,
                               stream=not inputs.resident, batches=inputs.batches,
                               shard=inputs.shard)
        history = result.history
        candidates = [{**rec, "candidate": "grid"} for rec in history[-len(config.grid()):]]
        heads = list(zip(result.weight, result.bias, strict=True))
    if permuted is not None:
        old = {"candidate": OLD_HEAD, "epoch": 0, "lr": None, "weight_decay": None}
        w, b = permuted[0][None].float(), permuted[1][None].float()
        for name, feats in evals.items():
            (m,) = H.evaluate(feats, w.to(dev), b.to(dev), device=dev)
            old.update({f"{name}_{k}": v for k, v in m.items()})
        candidates.append(old)
        heads.append((w[0], b[0]))
    # A point whose loss or weights went non-finite diverged: it is reported, never chosen.
    for rec, (w, b) in zip(candidates, heads, strict=True):
        rec["diverged"] = not (math.isfinite(rec.get("train_loss", 0.0))
                               and bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all()))
    live = [i for i, rec in enumerate(candidates) if not rec["diverged"]]
    if not live:
        raise DataError(f"training diverged at every grid point (--lr {_grid_text(config)}): "
                        "lower --lr, and check the store with extract_features.py --verify")
    # Chosen on the holdout; without one (a single grid point, by validation) the trained head
    # unless there is none.
    best = live[H.choose([candidates[i] for i in live], "holdout")] if "holdout" in evals \
        else live[0]
    chosen = candidates[best]
    for rec in candidates:
        scores = "diverged (not a candidate)" if rec["diverged"] else "  ".join(
            f"{k} {rec[k]:.2%}" for k in ("holdout_top1", "val_top1", "val_top5") if k in rec)
        log.info("  %-24s %s", describe(rec).removeprefix("the "),
                 scores + ("   <- chosen" if rec is chosen else ""))
    if len(live) < len(candidates):
        log.warning("%d of %d grid points diverged (their loss or weights became NaN/inf): "
                    "the highest learning rates are too high for these features",
                    len(candidates) - len(live), len(candidates))
    outcome = Outcome(heads[best][0].clone(), heads[best][1].clone(), chosen, candidates,
                      history, "old-head (permuted)" if init_tensors is not None else "zeros",
                      diagnosis)
    if result is not None:
        outcome.seconds = result.seconds
        outcome.ms_per_epoch = 1000 * float(np.median(result.epoch_seconds))
    outcome.verdict = judge_backbone(chosen, inputs.judged, inputs.recorded,
                                     len(inputs.classes))
    return outcome


def write(out: Path, features: Path, checkpoint: Path | None, inputs: Inputs,
          settings: Settings, outcome: Outcome, argv: Sequence[str] | None) -> None:
    """head.pt, then the metrics and the curves beside it, each written atomically."""
    components, group = inputs.components, inputs.group
    payload = {
        "weight": outcome.weight,
        "bias": outcome.bias,
        "classes": inputs.classes,
        "class_names": inputs.group.attrs.get("class_names"),
        "store": {"path": str(features.resolve()),
                  "fingerprint": group.attrs["fingerprint"]["digest"],
                  "backbone_sha256": components["backbone_sha256"],
                  "arch": components["arch"], "head": components["head"],
                  "other_heads": components.get("other_heads", {}),
                  "ema": bool(group.attrs.get("checkpoint", {}).get("ema", False)),
                  "feature_dim": int(components["feature_dim"])},
        "config": {**asdict(settings.config), "init": outcome.init,
                   "resident": inputs.resident, "device": settings.device.type,
                   "out_of_core": inputs.batches is not None,
                   "ranks": settings.group.world if inputs.shard else 1,
                   "holdout_fraction": settings.holdout_fraction},
        "metrics": outcome.chosen,
        "grid": outcome.candidates,
        "diagnosis": {**(outcome.diagnosis.as_dict() if outcome.diagnosis else {}),
                      **outcome.verdict.as_dict()},
        "record": run_record(argv, {"features": str(features), "out": str(out),
                                    "checkpoint": str(checkpoint) if checkpoint else None}),
    }
    atomic_write(out, lambda f: torch.save(payload, f))
    old = [c for c in outcome.candidates if c["candidate"] == OLD_HEAD]
    write_jsonl(out.with_suffix(".metrics.jsonl"), outcome.history + old)
    if outcome.history:
        chosen = outcome.chosen
        plot_curves(out.with_suffix(".curves.png"), outcome.history,
                    None if chosen["candidate"] == OLD_HEAD
                    else (chosen["lr"], chosen["weight_decay"]))


def _fits(parts: Sequence[H.Features], device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    need = sum(p.x.numel() * p.x.element_size() + p.y.numel() * 8 for p in parts)
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
    if ckpt.recorded is not None:
        log.info("the checkpoint records top-1 %.2f%% (%s)", 100 * ckpt.recorded[0],
                 ckpt.recorded[1])
    return weight.detach().float(), bias.detach().float(), ckpt.recorded
