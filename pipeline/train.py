"""Stage 2: check the store, diagnose the old head, train the grid, save the head.

    python train_head.py --features features.zarr --checkpoint checkpoint_best.pth --out head.pt
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import dist as Dist
from . import head as H
from . import store as S
from . import triage as T_
from .checkpoint import backbone_digest, load_checkpoint
from .errors import DataError, StoreDamaged, StoreError, ref, render
from .files import resolve_device
from .headfile import OLD_HEAD, HeadRecord, Source
from .provenance import run_record
from .report import plot_curves, warn_backbone, write_jsonl
from .settings import TrainSettings
from .streaming import StoreRows, WindowBatches, available_memory

log = logging.getLogger("quickfix")
T = TrainSettings  # its settings, named in messages: T.ref("lr")
EXTRACT = ref("cmd.extract")


# The "don't use when" check (README, "Is the backbone worth fixing?"). A linear probe whose
# holdout top-1 stays within UNTRAINED_MARGIN of the way from chance (the most common class's
# share) to 100% finds features that barely separate the classes: the backbone is "untrained".
# A fix whose top-1 lands below WEAK_RATIO of the accuracy the checkpoint records, and at least
# WEAK_POINTS below it, is "weak": the features are not those of the model that reached it.
UNTRAINED_MARGIN = 0.10
WEAK_RATIO = 0.85
WEAK_POINTS = 0.05
WEAK_CAUSES = ("usually other weights (another checkpoint, or the EMA instead of the model: "
               f"{ref('extract.ema')}/{ref('extract.ema', negate=True)}), another eval "
               f"transform ({ref('extract.resize')}/{ref('extract.crop')}, the interpolation "
               "or the normalization), or other data than the recorded figure's")


@dataclass
class Verdict:
    """Is the backbone worth fixing? "ok", "weak", "untrained", or "unknown" (no holdout and
    no val to judge on)."""

    backbone: str
    recorded_top1: float | None
    recorded_key: str | None = None
    message: str | None = None  # why, for a verdict other than "ok"

    def as_dict(self) -> dict:
        """As head.pt keeps it (and the fixed checkpoint's record): plain text."""
        return {"backbone": self.backbone, "recorded_top1": self.recorded_top1,
                "recorded_key": self.recorded_key,
                "backbone_message": render(self.message) if self.message else None}


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
                       f"backbone on ({T.ref('holdout_fraction', 0)} and no val/ in the store)")
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


@dataclass(frozen=True)
class Runtime:
    """How this process runs the stage: the settings resolved on this machine and job."""

    config: H.TrainConfig
    device: torch.device
    group: Dist.Group


@dataclass
class Inputs:
    """What stage 2 reads: the store's usable rows (train without its holdout, and the splits
    to evaluate on) and where they are held, and the original head when a checkpoint was
    given."""

    store: S.FeatureStore
    train: H.Features | StoreRows
    evals: dict[str, H.Features | StoreRows]
    batches: H.BatchSource  # the training batches, from wherever the rows are held
    resident: bool  # the rows on the training device
    out_of_core: bool  # the rows read from the store as they are needed
    old_head: tuple[torch.Tensor, torch.Tensor] | None = None
    shard: H.Shard | None = None  # under torchrun: this rank's rows
    recorded: tuple[float, str] | None = None  # the top-1 the checkpoint records, and its key
    judged: dict[str, np.ndarray] = field(default_factory=dict)  # holdout/val -> their labels

    @property
    def classes(self) -> list[str]:
        return self.store.classes


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


def run_train(settings: TrainSettings, *, group: Dist.Group | None = None,
              argv: Sequence[str] | None = None) -> TrainSummary:
    """resolve -> load -> fit (diagnose, train the grid, choose) -> write.

    Under torchrun (`group` joined) every rank holds a share of the rows, the gradients are
    summed over the ranks, every rank ends with the same head, and rank 0 writes it."""
    grp = group or Dist.Group.single()
    if settings.relabel:
        return grp.agree(lambda: run_relabel(settings, argv).raise_unless_accepted(),
                         only_rank0=True)
    # a user error on any rank stops every rank, with one line (rank 0's)
    rt = grp.agree(lambda: resolve(settings, grp))
    inputs = grp.agree(lambda: load(settings, rt))
    outcome = grp.agree(lambda: fit(inputs, settings, rt))
    if grp.collective:
        _check_same_head(grp, outcome)
    if grp.main:
        warn_backbone(outcome.verdict.as_dict(), "train_head")
        write(settings, inputs, rt, outcome, argv)
    return TrainSummary(settings.out, outcome.chosen, outcome.seconds, settings.epochs,
                        len(outcome.candidates), outcome.ms_per_epoch,
                        grp.world if grp.collective else 1, outcome.verdict)


def resolve(settings: TrainSettings, grp: Dist.Group) -> Runtime:
    """The settings on this machine: the device, the trainer's configuration."""
    if settings.stream_from_store and grp.collective:
        raise DataError(f"{T.ref('stream_from_store')} runs in one process; under torchrun each "
                        "rank holds its share of the rows in memory: add ranks until it fits")
    dev = resolve_device(settings.device)
    config = H.TrainConfig(lrs=settings.lrs, wds=settings.wds, epochs=settings.epochs,
                           batch_size=settings.batch_size,
                           label_smoothing=settings.label_smoothing,
                           warmup_epochs=settings.warmup_epochs, seed=settings.seed)
    return Runtime(config, dev, grp)


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


# ---------------------------------------------------------------------------------------------
# load: the store checked, its rows chosen and placed, the old head


def load(settings: TrainSettings, rt: Runtime) -> Inputs:
    """The store checked complete and usable, its rows split into train and holdout and placed
    on the device (or left on the host to stream, or in the store), and the original head."""
    store = open_checked(settings.features)
    masks, judged, labels = _row_masks(store, settings.holdout_fraction, settings.seed)
    old_head, recorded, _ = (None, None, None) if settings.checkpoint is None else _old_head(
        settings.checkpoint, store, settings.trust_checkpoint)
    counts = {k: int(mask.sum()) for k, (_, mask) in masks.items()}
    shard = None
    if rt.group.collective:  # this rank's share of each split's usable rows
        shard = _shard(int(masks["train"][1].sum()), rt.group)
        masks = {k: (split, _share(mask, rt.group)) for k, (split, mask) in masks.items()}
    inputs = _place(store, masks, labels, settings, rt, shard)
    inputs.old_head, inputs.recorded, inputs.judged = old_head, recorded, judged
    where = ("resident" if inputs.resident else "streamed") if not inputs.out_of_core else (
        f"out of core: a window of {inputs.batches.window} chunks "
        f"({inputs.batches.window * inputs.train.chunk_rows} rows)")
    ranks = (f"; rank {rt.group.rank} of {rt.group.world} holds {len(inputs.train)}"
             if shard else "")
    log.info("train: %d rows (%s%s), holdout %d, val %d; %d classes, %d-d features on %s",
             counts["train"], where, ranks, counts.get("holdout", 0), counts.get("val", 0),
             len(store.classes), store.feature_dim, rt.device)
    return inputs


def open_checked(path: Path) -> S.FeatureStore:
    """The store, refused unless it is finished, sound by listing, and not being written: a
    model is never trained on a fill value."""
    store = S.FeatureStore.open(path)
    splits = store.splits
    if "train" not in splits:
        raise StoreError(f"{path} has no train split (splits: {', '.join(splits)})")
    writer = store.writer()
    if writer is not None:
        raise StoreError(f"{path} is being written by a stage 1 run ({writer}); wait for it "
                         "to end")
    damage = store.check()
    if damage:
        raise StoreDamaged(f"the feature store {path} is damaged ({damage.describe()}): rerun "
                           f"{EXTRACT} with the same arguments to repair it")
    for split in splits:
        store.complete(split)
        store.check_digests(split, ("labels", "ok"))  # the features: as they are read
    return store


def _row_masks(store: S.FeatureStore, holdout_fraction: float, seed: int
               ) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, np.ndarray], np.ndarray]:
    """Which rows of which split each part is (train, holdout, val: usable rows only), the
    labels of those the backbone is judged on, and the train split's labels."""
    labels = store.read("train", "labels")
    ok = store.read("train", "ok").astype(bool)
    if not ok.any():
        raise DataError(f"the train split of {store.path} has no usable rows (all quarantined)")
    present = np.unique(labels[ok])
    if present.size < 2:
        raise DataError(f"the train split of {store.path} holds only one class "
                        f"({store.classes[int(present[0])]}); a classifier needs at least two")
    holdout = H.holdout_split(np.where(ok, labels, -1), holdout_fraction, seed) & ok
    masks = {"train": ("train", ok & ~holdout)}
    judged = {"holdout": labels[holdout]}
    if holdout.any():
        masks["holdout"] = ("train", holdout)
    if "val" in store.splits:
        val_ok = store.read("val", "ok").astype(bool)
        if val_ok.any():
            masks["val"] = ("val", val_ok)
            judged["val"] = store.read("val", "labels")[val_ok]
    return masks, judged, labels


def _shard(total: int, grp: Dist.Group) -> H.Shard:
    bounds = np.array_split(np.arange(total), grp.world)[grp.rank]
    return H.Shard(int(bounds[0]) if bounds.size else 0,
                   int(bounds[-1]) + 1 if bounds.size else 0, total)


def _share(mask: np.ndarray, grp: Dist.Group) -> np.ndarray:
    """This rank's contiguous share of the rows `mask` selects."""
    rows = np.array_split(np.flatnonzero(mask), grp.world)[grp.rank]
    mine = np.zeros_like(mask)
    mine[rows] = True
    return mine


def _place(store: S.FeatureStore, masks: dict[str, tuple[str, np.ndarray]],
           labels: np.ndarray, settings: TrainSettings, rt: Runtime, shard: H.Shard | None
           ) -> Inputs:
    """The rows where they are held: read from the store out of core (when asked, or when they
    do not fit in host memory), else loaded into memory, resident on the device when they fit
    there (or unless asked to stream). `labels`: the train split's."""

    def rows(key: str, side: np.ndarray | None = None) -> StoreRows:
        split, mask = masks[key]
        return StoreRows(store, split, mask, side=side,
                         labels=labels if split == "train" else None)

    # train with the holdout rows flagged: they share the chunks, so one read serves both
    hold = masks["holdout"][1] if "holdout" in masks else None
    if _out_of_core(store, masks, settings, rt):
        batches = WindowBatches(rows("train", hold), rt.config.batch_size, rt.device,
                                buffer_bytes=settings.buffer_bytes, seed=rt.config.seed,
                                side_name="holdout")
        if store.components.get("row_order") is None:
            log.warning("this store keeps its rows in folder order (made before row_order "
                        "%s): out of core, a window of chunks holds few classes and the "
                        "batches mix badly; rebuild it with %s %s, or train in memory (%s)",
                        "permuted-v1", EXTRACT, ref("extract.overwrite"),
                        T.ref("stream_from_store", negate=True))
        return Inputs(store, rows("train"), {k: rows(k) for k in masks if k != "train"},
                      batches, resident=False, out_of_core=True, shard=shard)
    train, held = rows("train", hold).load()
    evals = {"holdout": held} if held is not None else {}
    if "val" in masks:
        evals["val"] = rows("val").load()[0]
    resident = _fits([train, *evals.values()], rt.device) if settings.stream is None \
        else not settings.stream
    if resident:
        train = H.Features(train.x.to(rt.device), train.y.to(rt.device))
        evals = {k: H.Features(v.x.to(rt.device), v.y.to(rt.device)) for k, v in evals.items()}
    # streamed: the rows stay where they are; each batch is gathered into a pinned buffer
    batches = (H.ShardBatches(train, rt.config.batch_size, rt.device, shard) if shard else
               H.Batches(train, rt.config.batch_size, rt.device, stream=not resident))
    return Inputs(store, train, evals, batches, resident=resident, out_of_core=False,
                  shard=shard)


def _out_of_core(store: S.FeatureStore, masks: dict, settings: TrainSettings,
                 rt: Runtime) -> bool:
    if settings.stream_from_store is not None:
        return settings.stream_from_store
    need = sum(int(mask.sum()) for _, mask in masks.values()) * store.feature_dim * \
        store.dtype("train").itemsize
    if need <= 0.6 * available_memory():
        return False
    if rt.group.collective:
        raise DataError(f"this rank's share of the features ({need / 2**30:.1f} GiB) does not "
                        "fit in its host memory: run more ranks (torchrun --nproc-per-node, "
                        "--nnodes)")
    log.info("the features (%.1f GiB) do not fit in host memory (%.1f GiB available): reading "
             "them from the store", need / 2**30, available_memory() / 2**30)
    return True


# ---------------------------------------------------------------------------------------------
# fit: diagnose, train the grid, choose


def fit(inputs: Inputs, settings: TrainSettings, rt: Runtime) -> Outcome:
    """Diagnose the old head, train the grid, and choose among the grid's final points and the
    permuted old head (epoch 0) on the holdout."""
    config = rt.config
    diagnosis, permuted, init = _diagnose(inputs, settings.init, rt)
    if config.epochs == 0 and init is None:
        raise DataError(f"{T.ref('epochs', 0)}: the old head is not a permutation of the right "
                        "one, so there is nothing to reuse; train with "
                        f"{T.ref('epochs', 'N')}")
    candidates, heads, result = _train_grid(inputs, rt, init)
    if permuted is not None:
        candidates.append(_old_head_scores(permuted, inputs.evals, rt.device))
        heads.append((permuted[0].float(), permuted[1].float()))
    best = _choose(candidates, heads, config, "holdout" in inputs.evals)
    outcome = Outcome(heads[best][0].clone(), heads[best][1].clone(), candidates[best],
                      candidates, result.history if result else [],
                      "old-head (permuted)" if init is not None else "zeros", diagnosis)
    if result is not None:
        outcome.seconds = result.seconds
        outcome.ms_per_epoch = 1000 * float(np.median(result.epoch_seconds))
    outcome.verdict = judge_backbone(outcome.chosen, inputs.judged, inputs.recorded,
                                     len(inputs.classes))
    return outcome


def _diagnose(inputs: Inputs, init: str, rt: Runtime
              ) -> tuple[H.Diagnosis | None, tuple | None, tuple | None]:
    """Is the old head a permutation of the right one (judged on train, the holdout unseen)?
    The diagnosis, the permuted old head, and the head to start from (None: zeros)."""
    if inputs.old_head is None:
        return None, None, None
    diagnosis = H.diagnose(inputs.train, *inputs.old_head, device=rt.device)
    log.info(diagnosis.line())
    permuted = (inputs.old_head[0][diagnosis.mapping], inputs.old_head[1][diagnosis.mapping])
    if init == "old-head" or (init == "auto" and diagnosis.is_permutation):
        log.info("starting from the old head with its rows permuted")
        return diagnosis, permuted, permuted
    if init == "auto" and rt.config.epochs > 0:
        log.info("starting from zeros (the old head is not a clean permutation)")
    return diagnosis, permuted, None


def _train_grid(inputs: Inputs, rt: Runtime, init: tuple | None
                ) -> tuple[list[dict], list[tuple[torch.Tensor, torch.Tensor]],
                           H.TrainResult | None]:
    """Every grid point trained together: their final epochs' records and heads."""
    config, evals = rt.config, inputs.evals
    if config.epochs == 0:
        return [], [], None
    torch.manual_seed(config.seed)

    def progress(epoch: int, records: list[dict]) -> None:
        key = "holdout" if "holdout" in evals else "val" if "val" in evals else None
        best = records[H.choose(records, key)] if key else records[0]
        extra = f", best {key} top-1 {best[f'{key}_top1']:.2%}" if key else ""
        log.info("epoch %d/%d: train loss %.4f%s", epoch, config.epochs, best["train_loss"],
                 extra)

    result = H.train_heads(inputs.train, config, num_classes=len(inputs.classes),
                           device=rt.device, init=init, evals=evals, on_epoch=progress,
                           batches=inputs.batches)
    candidates = [{**rec, "candidate": "grid"} for rec in result.history[-len(config.grid()):]]
    return candidates, list(zip(result.weight, result.bias, strict=True)), result


def _old_head_scores(permuted: tuple, evals: dict, device: torch.device) -> dict:
    """The permuted old head as a candidate of its own (epoch 0), scored on every split."""
    old = {"candidate": OLD_HEAD, "epoch": 0, "lr": None, "weight_decay": None}
    w, b = permuted[0][None].float(), permuted[1][None].float()
    for name, feats in evals.items():
        (m,) = H.evaluate(feats, w.to(device), b.to(device), device=device)
        old.update({f"{name}_{k}": v for k, v in m.items()})
    return old


def _choose(candidates: list[dict], heads: list[tuple], config: H.TrainConfig,
            holdout: bool) -> int:
    """The chosen candidate: the best on the holdout; without one (a single grid point, by
    validation) the trained head unless there is none. A point whose loss or weights went
    non-finite diverged: it is reported, never chosen."""
    for rec, (w, b) in zip(candidates, heads, strict=True):
        rec["diverged"] = not (math.isfinite(rec.get("train_loss", 0.0))
                               and bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all()))
    live = [i for i, rec in enumerate(candidates) if not rec["diverged"]]
    if not live:
        raise DataError(f"training diverged at every grid point ({T.ref('lr', _grid_text(config))}"
                        f"): lower {T.ref('lr')}, and check the store with {EXTRACT} "
                        f"{ref('extract.verify')}")
    best = live[_best_on_holdout([candidates[i] for i in live])] if holdout else live[0]
    for rec in candidates:
        scores = "diverged (not a candidate)" if rec["diverged"] else "  ".join(
            f"{k} {rec[k]:.2%}" for k in ("holdout_top1", "val_top1", "val_top5") if k in rec)
        log.info("  %-24s %s", describe(rec).removeprefix("the "),
                 scores + ("   <- chosen" if rec is candidates[best] else ""))
    if len(live) < len(candidates):
        log.warning("%d of %d grid points diverged (their loss or weights became NaN/inf): "
                    "the highest learning rates are too high for these features",
                    len(candidates) - len(live), len(candidates))
    return best


def _best_on_holdout(records: list[dict]) -> int:
    """The best holdout top-1; a tie goes to the permuted old head (the model's own head, no
    training), then to the lower holdout loss."""
    def rank(i: int) -> tuple:
        rec = records[i]
        loss = rec["holdout_loss"]
        finite = math.isfinite(loss)
        return (finite, rec["holdout_top1"] if finite else 0.0,
                rec.get("candidate") == OLD_HEAD, -loss if finite else 0.0)

    return max(range(len(records)), key=rank)


# ---------------------------------------------------------------------------------------------
# relabel: the triage's decision on a sample store


@dataclass
class RelabelSummary:
    out: Path
    decision: T_.Decision
    record: HeadRecord | None = None
    sample: str = ""  # what to do when the sample is too small
    head_classes: list[str] | None = None  # the checkpoint's names of the old rows

    def raise_unless_accepted(self) -> RelabelSummary:
        """For the script: an accepted relabel, else one line saying why not."""
        d = self.decision
        if d.outcome == "grow":
            raise DataError(f"the sample is too small to decide: {d.reason}; {self.sample}")
        if d.outcome != "relabel":
            raise DataError(f"not a relabel: {d.reason}: train the head ({T.ref('relabel')} "
                            "left out, on a store of every image)")
        return self

    def line(self) -> str:
        return f"{self.decision.line()} -> {self.out}" if self.record else self.decision.line()


def run_relabel(settings: TrainSettings, argv: Sequence[str] | None = None, *,
                write_head: bool = True) -> RelabelSummary:
    """Decide from the store (a sample, or every image) whether the old head is a relabel; when
    it is, write it (its rows picked, nothing trained) to `settings.out`."""
    store = open_checked(settings.features)
    head, recorded, head_classes = _old_head(settings.checkpoint, store,
                                             settings.trust_checkpoint, any_size=True)
    if head is None:  # NaN or inf
        decision = T_.Decision("train", "the old head's weights hold NaN or inf: there is no "
                               "head to relabel", confidence=settings.relabel_confidence,
                               tolerance=settings.relabel_tolerance)
    else:
        diag, verify = _triage_rows(store)
        decision = T_.decide(diag, verify, *head, classes=store.classes,
                             names=store.class_names, head_classes=head_classes,
                             recorded=recorded[0] if recorded is not None else None,
                             confidence=settings.relabel_confidence,
                             tolerance=settings.relabel_tolerance, seed=settings.seed)
    per_class = store.per_class or {}
    k = max(per_class.values(), default=0)
    sample = (f"rerun {EXTRACT} with {ref('extract.per_class', 2 * k)}" if k else
              "the store holds every image: train the head")
    summary = RelabelSummary(settings.out, decision, sample=sample, head_classes=head_classes)
    if decision.outcome != "relabel" or not write_head:
        return summary
    index = torch.as_tensor(decision.mapping, dtype=torch.long)
    metrics = {"verification_top1": decision.top1,
               "verification_images": decision.images.get("verification", 0)}
    if "val" in store.splits:
        metrics["val_top1"] = decision.top1  # the sample's val rows
    summary.record = HeadRecord(
        weight=head[0][index].clone(), bias=head[1][index].clone(), classes=store.classes,
        class_names=store.class_names, source=Source.of(store),
        config={"init": "relabel", "sample": per_class or None},
        metrics=metrics, grid=[],
        diagnosis={"mapping": decision.mapping, "is_permutation": True,
                   "classes_moved": decision.moved, "clean_share": decision.clear,
                   "relabel": decision.as_dict(),
                   "recorded_top1": recorded[0] if recorded else None,
                   "recorded_key": recorded[1] if recorded else None},
        record=run_record(argv, {"features": str(settings.features), "out": str(settings.out),
                                 "checkpoint": str(settings.checkpoint)}))
    summary.record.save(settings.out)
    return summary


# A store of every image is decided on at most this many usable rows per class and split (the
# first in the store's shuffled order): memory stays that of a sample (ImageNet's train split in
# full would be 10 GB of features), and the decision needs no more.
TRIAGE_ROWS_PER_CLASS = 64


def _triage_rows(store: S.FeatureStore) -> tuple[T_.Rows, T_.Rows]:
    """The diagnosis rows (train) and the verification rows (val; without val, half of the
    train rows of each class), read chunk by chunk with their checksums checked (a damaged
    chunk, a non-finite value: StoreDamaged)."""
    cap = None if store.per_class else TRIAGE_ROWS_PER_CLASS

    def rows(split: str) -> T_.Rows:
        mask = store.read(split, "ok").astype(bool)
        labels = store.read(split, "labels")
        if cap is not None:
            idx = np.flatnonzero(mask)
            order = np.argsort(labels[idx], kind="stable")  # each class's rows in store order
            y = labels[idx][order]
            rank = np.arange(y.size) - np.searchsorted(y, y)  # the row's place in its class
            mask = np.zeros_like(mask)
            mask[idx[order][rank < cap]] = True
        feats, _ = StoreRows(store, split, mask, labels=labels).load()
        return T_.Rows(feats.x.float(), feats.y.numpy().astype(np.int64))

    diag = rows("train")
    val = next((s for s in ("val", "validation") if s in store.splits), None)
    if val is not None:
        return diag, rows(val)
    return T_.split_for_verification(diag)


# ---------------------------------------------------------------------------------------------
# write


def write(settings: TrainSettings, inputs: Inputs, rt: Runtime, outcome: Outcome,
          argv: Sequence[str] | None) -> None:
    """head.pt, then the metrics and the curves beside it, each written atomically."""
    record = HeadRecord(
        weight=outcome.weight, bias=outcome.bias, classes=inputs.classes,
        class_names=inputs.store.class_names, source=Source.of(inputs.store),
        config={**asdict(rt.config), "init": outcome.init, "resident": inputs.resident,
                "device": rt.device.type, "out_of_core": inputs.out_of_core,
                "ranks": rt.group.world if inputs.shard else 1,
                "holdout_fraction": settings.holdout_fraction},
        metrics=outcome.chosen, grid=outcome.candidates,
        diagnosis={**(outcome.diagnosis.as_dict() if outcome.diagnosis else {}),
                   **outcome.verdict.as_dict()},
        record=run_record(argv, {"features": str(settings.features), "out": str(settings.out),
                                 "checkpoint": str(settings.checkpoint)
                                 if settings.checkpoint else None}))
    out = settings.out
    record.save(out)
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


def _old_head(path: Path, store: S.FeatureStore, trust: bool, *, any_size: bool = False
              ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, tuple[float, str] | None,
                         list[str] | None]:
    """The original head (and the top-1 the checkpoint records, and the classes it names per
    row), after checking that the store was made from this checkpoint (its EMA copy, when the
    store was made from that). A head with another number of outputs than the store has
    classes is returned with `any_size` (a relabel picks its rows), else not reused (None)."""
    components, classes, dim = store.components, store.classes, store.feature_dim
    ckpt = load_checkpoint(path, trust=trust, use_ema=store.ema)
    head = components["head"]
    digest = backbone_digest(ckpt.state_dict, head, components.get("other_heads"))
    if digest != components["backbone_sha256"]:
        which = f"the {ckpt.source_key} weights of " if store.ema else ""
        raise StoreError(
            f"the feature store was not made from {which}{path}: its backbone weights differ "
            f"(rerun {EXTRACT} with this checkpoint)")
    weight = ckpt.state_dict.get(f"{head}.weight")
    bias = ckpt.state_dict.get(f"{head}.bias")
    if weight is None or weight.dim() != 2 or weight.shape[1] != dim:
        shape = None if weight is None else tuple(weight.shape)
        raise StoreError(f"{path}: head {head}.weight has shape {shape}, the store needs "
                         f"({len(classes)}, {dim})")
    if ckpt.recorded is not None:
        log.info("the checkpoint records top-1 %.2f%% (%s)", 100 * ckpt.recorded[0],
                 ckpt.recorded[1])
    if weight.shape[0] != len(classes) and not any_size:
        log.warning("the old head %s has %d outputs for the store's %d classes: it is not "
                    "reused (the new head is trained from zeros)", head, weight.shape[0],
                    len(classes))
        return None, ckpt.recorded, ckpt.classes
    if ckpt.classes is not None and len(ckpt.classes) == len(classes) and \
            sorted(ckpt.classes) != sorted(classes):
        raise StoreError(f"{path} names other classes than the feature store "
                         "(compare its id_to_class/class_to_idx with the store's classes)")
    if bias is None:
        bias = torch.zeros(weight.shape[0])
    weight, bias = weight.detach().float(), bias.detach().float()
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        log.warning("the old head %s holds NaN or inf: it is not reused (the new head is "
                    "trained from zeros)", head)
        return None, ckpt.recorded, ckpt.classes
    return (weight, bias), ckpt.recorded, ckpt.classes
