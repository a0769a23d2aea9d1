"""Stage 2: train only the linear head on cached features; a whole LR x WD grid in one pass.

Every grid point is one slice of a batched head W[G, C, D], b[G, C]. One matrix multiply gives
all points' logits for a batch, the cross-entropy gradient is written out by hand
(softmax - target), and SGD with momentum, weight decay and a warmup + cosine schedule updates
each slice with its own LR and WD. All points see the same shuffled batches, so a point trained
in a grid follows the same trajectory as the point trained alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .dist import all_sum

log = logging.getLogger("quickfix")


@dataclass
class Features:
    """One split's usable rows (quarantined rows dropped), on the host or the device."""

    x: torch.Tensor  # [N, D] float16 or float32
    y: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def blocks(self, size: int = 4096):
        """(x, y) slices of `size` rows, in order (a store-backed source yields its chunks)."""
        for lo in range(0, len(self), size):
            yield self.x[lo:lo + size], self.y[lo:lo + size]


@dataclass
class Shard:
    """This rank's rows under torchrun: rows [lo, hi) of the `total` usable train rows."""

    lo: int
    hi: int
    total: int


@dataclass
class TrainConfig:
    """The trainer's knobs (the user's defaults are pipeline.settings.TrainSettings')."""

    lrs: list[float]
    wds: list[float]
    epochs: int
    batch_size: int
    warmup_epochs: float
    label_smoothing: float = 0.0
    seed: int = 0
    momentum: float = 0.9
    standardize: bool = True

    def grid(self) -> list[tuple[float, float]]:
        return [(lr, wd) for lr in self.lrs for wd in self.wds]


@dataclass
class TrainResult:
    weight: torch.Tensor  # [G, C, D] float32, on the CPU
    bias: torch.Tensor  # [G, C]
    history: list[dict] = field(default_factory=list)  # one record per (epoch, grid point)
    seconds: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine to 0 (the factor applied to each point's base LR)."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))


def logits_of(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[G, B, C] logits of every grid point, in one GEMM: x [B, D] @ W[G*C, D]^T."""
    g, c, d = weight.shape
    out = x.float() @ weight.reshape(g * c, d).T
    return out.reshape(x.shape[0], g, c).transpose(0, 1) + bias[:, None, :]


@torch.no_grad()
def evaluate(feats: Features, weight: torch.Tensor, bias: torch.Tensor, *, device: torch.device,
             batch_size: int = 4096) -> list[dict]:
    """top-1, top-5 and mean cross-entropy of every grid point on `feats` (under torchrun, on
    the union of the ranks' shards)."""
    scores = Scores(weight, bias, device)
    for x, y in feats.blocks(batch_size):
        scores.add(x, y)
    return scores.result()


class Scores:
    """Accumulates top-1, top-5 and cross-entropy of every grid point, block by block."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, device: torch.device):
        self.weight, self.bias, self.device = weight, bias, device
        g = weight.shape[0]
        # top-1 hits, top-5 hits, summed loss per point, then the row count
        self.sums = torch.zeros(3 * g + 1, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        g, c, _ = self.weight.shape
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        logits = logits_of(x, self.weight, self.bias)  # [G, B, C]
        hit = logits.topk(min(5, c), dim=2).indices == y[None, :, None]
        self.sums[:g] += hit[:, :, 0].sum(1)
        self.sums[g:2 * g] += hit.any(2).sum(1)
        self.sums[2 * g:3 * g] += torch.nn.functional.cross_entropy(
            logits.reshape(-1, c), y.repeat(g), reduction="none").reshape(g, -1).sum(1)
        self.sums[-1] += y.shape[0]

    def result(self) -> list[dict]:
        g = self.weight.shape[0]
        sums = all_sum(self.sums).tolist()
        denom = max(sums[-1], 1.0)
        return [{"top1": sums[i] / denom, "top5": sums[g + i] / denom,
                 "loss": sums[2 * g + i] / denom} for i in range(g)]


class HeadState:
    """Every grid point's head and optimizer state on the device, and the training step.

    The head is trained on standardised features x' = (x - mu) / s (SGD converges on them far
    faster than on raw pooled features) and folded back into a head for raw features at the end:
    W x' + b = (W / s) x + (b - W mu / s). The objective is the raw head's, as with
    `torch.optim.SGD(weight_decay=wd)` on the weight of an `nn.Linear` on raw features: mean
    cross-entropy + wd / 2 * ||W / s||^2 (the bias is not decayed, as timm's optimizer factory
    leaves 1-d parameters). In standardised coordinates that penalty's gradient is
    wd * W / s^2, so each dimension's step is preconditioned by s^2 / (s^2 + wd): the same
    minimiser, and stable where a near-constant dimension (s^2 << wd) would otherwise blow up.

    `step` is one graph-capturable unit: fixed shapes (the last batch is padded and masked), the
    LR schedule read from a device tensor at a device-side step counter, the loss accumulated
    on the device; nothing in it waits for the host or makes the host wait.
    """

    def __init__(self, config: TrainConfig, *, num_classes: int, dim: int, steps: int,
                 mu: torch.Tensor, scale: torch.Tensor, device: torch.device,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None, sharded: bool = False):
        grid = config.grid()
        self.sharded = sharded
        g, c, d = len(grid), num_classes, dim
        self.config, self.num_classes, self.mu, self.scale = config, c, mu, scale
        if init is None:
            self.weight = torch.zeros(g, c, d, device=device)
            self.bias = torch.zeros(g, c, device=device)
        else:
            w0, b0 = init[0].to(device, torch.float32), init[1].to(device, torch.float32)
            self.weight = (w0 * scale).expand(g, c, d).clone()
            self.bias = (b0 + w0 @ mu).expand(g, c).clone()
        self.buf_w, self.buf_b = torch.zeros_like(self.weight), torch.zeros_like(self.bias)
        self.lrs = torch.tensor([lr for lr, _ in grid], device=device)
        wds = torch.tensor([wd for _, wd in grid], device=device)
        # d = P * (grad + wd * W / s^2) = P * grad + K * W, with P = s^2 / (s^2 + wd) on
        # standardised features; on raw ones (standardize=False, s = 1) plain SGD: P = 1, K = wd
        wd = wds[:, None, None]
        s2 = (scale * scale)[None, None, :]
        self.decayed = bool((wds > 0).any())
        self.precond = s2 / (s2 + wd) if config.standardize else torch.ones_like(s2 + wd)
        self.decay = self.precond * wd / s2
        warmup = min(int(round(config.warmup_epochs * steps / max(config.epochs, 1))),
                     steps // 2)
        self.factors = torch.tensor([lr_factor(i, steps, warmup) for i in range(steps)] or [0.0],
                                    device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.running = torch.zeros(g, dtype=torch.float64, device=device)

    def step(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
             count: torch.Tensor | None = None) -> None:
        """One SGD step of every grid point on the batch x [B, D] (raw features), y [B]; rows
        with mask 0 are padding and count for nothing.

        Sharded (torchrun): x holds this rank's rows of a global batch of `count` real rows; the
        gradients are summed over the ranks, so every rank takes the same step."""
        cfg, c = self.config, self.num_classes
        g, b = self.weight.shape[0], x.shape[0]
        x = (x.float() - self.mu) / self.scale
        logp = torch.log_softmax(logits_of(x, self.weight, self.bias), dim=2)  # [G, B, C]
        eps = cfg.label_smoothing
        target = torch.full_like(logp, eps / c)
        target.scatter_(2, y[None, :, None].expand(g, b, 1), 1.0 - eps + eps / c)
        per_row = -(target * logp).sum(2)  # [G, B]
        self.running += (per_row * mask).sum(1).double()
        # dLoss/dlogits of each point's mean loss over the real rows: (softmax - target) / n
        grad = (logp.exp_() - target) * (mask / (mask.sum() if count is None else count)
                                          )[None, :, None]
        grad_w = (grad.transpose(0, 1).reshape(b, g * c).T @ x).reshape(g, c, -1)
        grad_b = grad.sum(1)
        if self.sharded:
            all_sum(grad_w)
            all_sum(grad_b)
        self.update(grad_w, grad_b)

    def update(self, grad_w: torch.Tensor, grad_b: torch.Tensor) -> None:
        """The SGD update from the loss gradients (`grad_w` is consumed)."""
        rate = self.lrs * self.factors.index_select(0, self.step_index)
        # torch.optim.SGD: d = grad + decay; buf = m * buf + d; w -= lr * buf
        if self.decayed:
            grad_w.mul_(self.precond).addcmul_(self.decay, self.weight)
        self.buf_w.mul_(self.config.momentum).add_(grad_w)
        self.buf_b.mul_(self.config.momentum).add_(grad_b)
        self.weight.sub_(rate[:, None, None] * self.buf_w)
        self.bias.sub_(rate[:, None] * self.buf_b)
        self.step_index += 1

    def raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The heads for raw features."""
        return fold(self.weight, self.bias, self.mu, self.scale)


class BatchSource(Protocol):
    """Where an epoch's batches come from, one interface for every way the rows are held:
    resident on the device or streamed from host memory (`Batches`), this rank's share under
    torchrun (`ShardBatches`), read from the store out of core (`streaming.WindowBatches`).

    `epoch(perm, side)` yields (x [B, D], y [B], mask [B]) on the device, the last batch padded
    (mask 0), or with a fourth item, the batch's real rows over every rank (`sharded`). `perm`
    is the epoch's order of the `rows` rows, drawn on the device by the trainer, or None for a
    source that draws its own (`own_order`). A source whose pass also reads the rows of an
    evaluation split (`side_name`, the holdout out of core) hands them to `side(x, y)`."""

    steps: int
    rows: int
    own_order: bool
    sharded: bool
    side_name: str | None

    def epoch(self, perm: torch.Tensor | None, side: Callable | None = None) -> Iterator[tuple]:
        ...


class Batches:
    """The padded, masked batches of one epoch: (x [B, D], y [B], mask [B]) on the device.

    Resident features are gathered on the device. Host features are streamed: each batch is
    gathered into one of a few pinned host buffers and copied on a side stream, so the host
    gathers batch k+1 and the copy engine moves it while the GPU computes batch k; the host only
    waits for a copy to finish before it reuses that copy's pinned buffer.
    """

    own_order, sharded, side_name = False, False, None

    def __init__(self, train: Features, batch_size: int, device: torch.device,
                 stream: bool | None = None, slots: int = 3):
        self.train, self.batch_size, self.device = train, batch_size, device
        n = self.rows = len(train)
        self.steps = -(-n // batch_size)
        pad = self.steps * batch_size - n
        self.mask = torch.cat([torch.ones(n, device=device), torch.zeros(pad, device=device)]
                              ).reshape(self.steps, batch_size)
        self.pad = pad
        self.streamed = train.x.device != device if stream is None else stream
        self.cuda = device.type == "cuda"
        if self.streamed:
            d, pin = train.dim, self.cuda
            self.host = [(torch.empty(batch_size, d, dtype=train.x.dtype, pin_memory=pin),
                          torch.empty(batch_size, dtype=torch.long, pin_memory=pin))
                         for _ in range(slots)]
            self.dev = [(torch.empty(batch_size, d, dtype=train.x.dtype, device=device),
                         torch.empty(batch_size, dtype=torch.long, device=device))
                        for _ in range(slots)]
            if self.cuda:
                self.copy_stream = torch.cuda.Stream(device)
                self.copied = [torch.cuda.Event() for _ in range(slots)]
                self.consumed = [torch.cuda.Event() for _ in range(slots)]

    def epoch(self, perm: torch.Tensor, side: Callable | None = None):
        """Yield the epoch's batches in the order of `perm` (a permutation on the device)."""
        perm = torch.cat([perm, perm.new_zeros(self.pad)]).reshape(self.steps, self.batch_size)
        if not self.streamed:
            for k in range(self.steps):
                idx = perm[k]
                yield self.train.x.index_select(0, idx), self.train.y.index_select(0, idx), \
                    self.mask[k]
            return
        yield from self._streamed(perm.cpu())  # one host sync per epoch

    def _streamed(self, perm: torch.Tensor):
        slots = len(self.host)
        for k in range(self.steps):
            s = k % slots
            hx, hy = self.host[s]
            dx, dy = self.dev[s]
            if self.cuda:
                self.copied[s].synchronize()  # the pinned buffer's last copy has landed
            torch.index_select(self.train.x, 0, perm[k], out=hx)
            torch.index_select(self.train.y, 0, perm[k], out=hy)
            if self.cuda:
                main = torch.cuda.current_stream(self.device)
                self.copy_stream.wait_event(self.consumed[s])  # the step that read dx is done
                with torch.cuda.stream(self.copy_stream):
                    dx.copy_(hx, non_blocking=True)
                    dy.copy_(hy, non_blocking=True)
                    self.copied[s].record(self.copy_stream)
                main.wait_event(self.copied[s])
                yield dx, dy, self.mask[k]
                self.consumed[s].record(main)
            else:
                dx.copy_(hx)
                dy.copy_(hy)
                yield dx, dy, self.mask[k]


class ShardBatches:
    """This rank's part of each global batch under torchrun: (x [m, D], y [m], mask [m], count).

    Every rank draws the same permutation of all `shard.total` rows, so batch k is the same
    slice of it on every rank, as in a single process; this rank takes the rows of that slice it
    holds (lo..hi), so the union over the ranks is exactly the single-process batch, and `count`
    (its real rows, on the device) normalises the gradients that the ranks then sum.
    """

    own_order, sharded, side_name = False, True, None

    def __init__(self, train: Features, batch_size: int, device: torch.device, shard: Shard):
        self.train, self.batch_size, self.device, self.shard = train, batch_size, device, shard
        self.rows = shard.total
        self.steps = -(-shard.total // batch_size)
        self.pad = self.steps * batch_size - shard.total
        self.streamed = train.x.device != device

    def epoch(self, perm: torch.Tensor, side: Callable | None = None):
        lo, hi = self.shard.lo, self.shard.hi
        rows = torch.cat([perm, perm.new_full((self.pad,), -1)]).reshape(self.steps,
                                                                         self.batch_size)
        mine = (rows >= lo) & (rows < hi)
        counts = mine.sum(1).tolist()  # one host sync per epoch
        real = (rows >= 0).sum(1).float()
        local = (rows[mine] - lo).to(self.train.x.device)  # grouped by batch, in order
        at = 0
        for k, m in enumerate(counts):
            idx = local[at:at + m]
            at += m
            x = self.train.x.index_select(0, idx).to(self.device, non_blocking=True)
            y = self.train.y.index_select(0, idx).to(self.device, non_blocking=True)
            yield x, y, torch.ones(m, device=self.device), real[k]


def train_heads(
    train: Features,
    config: TrainConfig,
    *,
    num_classes: int,
    device: torch.device,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    evals: dict[str, Features] | None = None,
    on_epoch: Callable[[int, list[dict]], None] | None = None,
    batches: BatchSource | None = None,
) -> TrainResult:
    """Train every (lr, wd) point of `config.grid()` together; returns the stacked heads.

    `batches`: where the batches come from (default: `train` resident when it lives on
    `device`, else streamed from the host; the batches, and so the result, are the same);
    `train` (or its store-backed stand-in) also gives the feature statistics. The permutation is
    drawn on the training device, so resident and streamed runs see identical batches.
    """
    batches = batches or Batches(train, config.batch_size, device)
    mu, scale = feature_stats(train, device) if config.standardize else (
        torch.zeros(train.dim, device=device), torch.ones(train.dim, device=device))
    state = HeadState(config, num_classes=num_classes, dim=train.dim, mu=mu, scale=scale,
                      steps=batches.steps * config.epochs, device=device, init=init,
                      sharded=batches.sharded)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    result = TrainResult(state.weight, state.bias)
    records = _Records(config.grid(), evals or {}, batches.side_name, result, on_epoch, device)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        state.running.zero_()
        perm = None if batches.own_order else torch.randperm(batches.rows, generator=gen,
                                                              device=device)
        side = records.side_scores(state)
        for batch in batches.epoch(perm, side.add if side else None):
            state.step(*batch)
        if batches.sharded:
            all_sum(state.running)
        # the epoch's one read of the training metrics
        records.epoch(epoch + 1, state, (state.running / batches.rows).tolist(), side)
        result.epoch_seconds.append(time.perf_counter() - t0)
    records.close(state)
    result.seconds = time.perf_counter() - start
    raw_w, raw_b = state.raw()
    result.weight, result.bias = raw_w.cpu(), raw_b.cpu()
    return result


class _Records:
    """Each epoch's record per grid point: its train loss and its scores on each evaluated
    split. A split that the batch source reads in its pass anyway (`side`: the holdout, out of
    core) is scored there, with the head as the next pass starts (the epoch's last), so the
    store is read once per epoch; an epoch's records are complete one pass later, the last
    epoch's by a pass of their own."""

    def __init__(self, grid: list[tuple[float, float]], evals: dict, side: str | None,
                 result: TrainResult, on_epoch: Callable | None, device: torch.device):
        self.grid, self.evals, self.side, self.device = grid, evals, side, device
        self.result, self.on_epoch = result, on_epoch
        self.pending: list[dict] | None = None

    def side_scores(self, state: HeadState) -> Scores | None:
        """What scores the side split in the coming pass (when a record waits for it)."""
        return Scores(*state.raw(), self.device) if self.pending is not None else None

    def epoch(self, epoch: int, state: HeadState, losses: list[float],
              side: Scores | None) -> None:
        if self.pending is not None:
            self._finish(self.pending, side)
        records = [{"epoch": epoch, "lr": lr, "weight_decay": wd, "train_loss": loss}
                   for (lr, wd), loss in zip(self.grid, losses, strict=True)]
        raw_w, raw_b = state.raw()
        for name, feats in self.evals.items():
            if name == self.side:
                continue
            for rec, m in zip(records, evaluate(feats, raw_w, raw_b, device=self.device),
                              strict=True):
                rec.update({f"{name}_{k}": v for k, v in m.items()})
        if self.side:
            self.pending = records
        else:
            self._finish(records, None)

    def close(self, state: HeadState) -> None:
        """The last epoch's side split: a pass of its own."""
        if self.pending is None:
            return
        scores = Scores(*state.raw(), self.device)
        for x, y in self.evals[self.side].blocks():
            scores.add(x, y)
        self._finish(self.pending, scores)
        self.pending = None

    def _finish(self, records: list[dict], scores: Scores | None) -> None:
        if scores is not None:
            for rec, m in zip(records, scores.result(), strict=True):
                rec.update({f"{self.side}_{k}": v for k, v in m.items()})
        self.result.history.extend(records)
        if self.on_epoch is not None:
            self.on_epoch(records[0]["epoch"], records)


@torch.no_grad()
def feature_stats(x: torch.Tensor, device: torch.device, batch: int = 8192,
                  rel_floor: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and scale over rows (float64 sums, in batches).

    The scale is the std, floored at `rel_floor` times the median std of the dimensions that
    vary: a near-constant dimension (a dead channel, float16 rounding noise) is not blown up to
    unit variance, which would give it a huge weight in the raw head.

    `x`: a [N, D] tensor, or Features / a store-backed source (its blocks are read in turn);
    under torchrun, the statistics of every rank's rows together."""
    rows = Features(x, x.new_empty(0, dtype=torch.long)) if isinstance(x, torch.Tensor) else x
    d = rows.dim
    sums = torch.zeros(2 * d + 1, dtype=torch.float64, device=device)
    total, sq = sums[:d], sums[d:2 * d]
    for part, _ in rows.blocks(batch):
        part = part.to(device).double()
        total += part.sum(0)
        sq += (part * part).sum(0)
        sums[-1] += part.shape[0]
    all_sum(sums)
    n = max(float(sums[-1]), 1.0)
    mean = total / n
    std = (sq / n - mean * mean).clamp_min(0).sqrt()
    varying = std[std > 0]
    typical = float(varying.median()) if varying.numel() else 1.0
    return mean.float(), std.clamp_min(max(rel_floor * typical, 1e-12)).float()


def fold(weight: torch.Tensor, bias: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """A head for standardised features as a head for raw ones."""
    raw_w = weight / sigma
    return raw_w, bias - raw_w @ mu


# ---------------------------------------------------------------------------------------------
# Diagnosis: is the old head a row-permutation of the right one?


@dataclass
class Diagnosis:
    accuracy_before: float
    accuracy_after: float
    moved: int  # classes whose old row is not at the right index
    clean: float  # share of classes whose most-predicted old index is the assigned one
    mapping: list[int]  # new row t = old row mapping[t]
    is_permutation: bool

    def as_dict(self) -> dict:
        return {"accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
                "classes_moved": self.moved, "clean_share": self.clean,
                "is_permutation": self.is_permutation, "mapping": self.mapping}

    def line(self) -> str:
        verdict = ("already the right head (no class moved)" if self.is_permutation
                   and self.moved == 0 else
                   f"a permutation of the right head ({self.moved} classes moved)"
                   if self.is_permutation else
                   f"not a clean permutation (only {self.clean:.0%} of classes map one-to-one)")
        return (f"old head: top-1 {self.accuracy_before:.2%} with the correct labels; it is "
                f"{verdict}; rows permuted: top-1 {self.accuracy_after:.2%}")


def diagnose(feats: Features, weight: torch.Tensor, bias: torch.Tensor, *,
             device: torch.device, min_clean: float = 0.9) -> Diagnosis:
    """Hungarian assignment on the confusion matrix of the old head's predictions."""
    from scipy.optimize import linear_sum_assignment

    c = weight.shape[0]
    w, b = weight[None].to(device, torch.float32), bias[None].to(device, torch.float32)
    counts = torch.zeros(c * c, dtype=torch.int64, device=device)  # true x predicted
    for x, y in feats.blocks(4096):
        pred = logits_of(x.to(device), w, b)[0].argmax(1)
        counts += torch.bincount(y.to(device) * c + pred, minlength=c * c)
    confusion = all_sum(counts).reshape(c, c).cpu().numpy()  # every rank's rows (torchrun)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    mapping = np.arange(c)
    mapping[rows] = cols  # true class t is predicted at old index mapping[t]
    n = max(int(confusion.sum()), 1)
    before = float(np.trace(confusion)) / n
    after = float(confusion[np.arange(c), mapping].sum()) / n
    present = confusion.sum(1) > 0
    clean = float((confusion.argmax(1) == mapping)[present].mean()) if present.any() else 0.0
    moved = int((mapping != np.arange(c))[present].sum())
    return Diagnosis(before, after, moved, clean, mapping.tolist(),
                     is_permutation=clean >= min_clean)


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of holdout rows: `fraction` of each class, drawn with `seed`."""
    mask = np.zeros(labels.shape[0], dtype=bool)
    if fraction <= 0:
        return mask
    rng = np.random.default_rng(seed)
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        k = int(round(fraction * rows.size))
        if 0 < k < rows.size:
            mask[rng.choice(rows, size=k, replace=False)] = True
    return mask


def choose(records: Sequence[dict], key: str) -> int:
    """Index of the best candidate by `key`_top1, then lower `key`_loss; a candidate whose loss
    is not finite (a point whose LR diverged) comes last."""

    def rank(i: int) -> tuple[bool, float, float]:
        loss = records[i][f"{key}_loss"]
        finite = math.isfinite(loss)
        return finite, records[i][f"{key}_top1"] if finite else 0.0, -loss if finite else 0.0

    return max(range(len(records)), key=rank)
