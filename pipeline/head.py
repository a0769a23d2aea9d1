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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import DataError

log = logging.getLogger("quickfix")


@dataclass
class Features:
    """One split's usable rows (quarantined rows dropped), on the host or the device."""

    x: torch.Tensor  # [N, D] float16 or float32
    y: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class TrainConfig:
    lrs: list[float]
    wds: list[float]
    epochs: int = 5
    batch_size: int = 256
    momentum: float = 0.9
    label_smoothing: float = 0.0
    warmup_epochs: float = 1.0
    seed: int = 0
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
    """top-1, top-5 and mean cross-entropy of every grid point on `feats`."""
    g, c, _ = weight.shape
    k = min(5, c)
    top1 = torch.zeros(g, dtype=torch.float64, device=device)
    top5 = torch.zeros_like(top1)
    loss = torch.zeros_like(top1)
    n = len(feats)
    for lo in range(0, n, batch_size):
        x = feats.x[lo:lo + batch_size].to(device, non_blocking=True)
        y = feats.y[lo:lo + batch_size].to(device, non_blocking=True)
        logits = logits_of(x, weight, bias)  # [G, B, C]
        pred = logits.topk(k, dim=2).indices
        hit = pred == y[None, :, None]
        top1 += hit[:, :, 0].sum(1)
        top5 += hit.any(2).sum(1)
        loss += torch.nn.functional.cross_entropy(
            logits.reshape(-1, c), y.repeat(g), reduction="none").reshape(g, -1).sum(1)
    denom = max(n, 1)
    return [{"top1": float(a) / denom, "top5": float(b) / denom, "loss": float(lo_) / denom}
            for a, b, lo_ in zip(top1.tolist(), top5.tolist(), loss.tolist(), strict=True)]


def train_heads(
    train: Features,
    config: TrainConfig,
    *,
    num_classes: int,
    device: torch.device,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    evals: dict[str, Features] | None = None,
    on_epoch: Callable[[int, list[dict]], None] | None = None,
) -> TrainResult:
    """Train every (lr, wd) point of `config.grid()` together; returns the stacked heads.

    `train.x` may live on the device (resident) or on the host (streamed batch by batch): the
    batches, and so the result, are the same.
    """
    grid = config.grid()
    g, d, c = len(grid), train.x.shape[1], num_classes
    # Train on standardised features (each dimension zero-mean, unit-variance over train), which
    # SGD converges on far faster than raw pooled features, and fold the scaling back into the
    # head at the end: W x' + b with x' = (x - mu) / sigma is (W / sigma) x + (b - W mu / sigma).
    mu, sigma = feature_stats(train.x, device) if config.standardize else (
        torch.zeros(d, device=device), torch.ones(d, device=device))
    if init is None:
        weight = torch.zeros(g, c, d, device=device)
        bias = torch.zeros(g, c, device=device)
    else:
        w0, b0 = init[0].to(device, torch.float32), init[1].to(device, torch.float32)
        weight = (w0 * sigma).expand(g, c, d).clone()
        bias = (b0 + w0 @ mu).expand(g, c).clone()
    lrs = torch.tensor([lr for lr, _ in grid], device=device)
    wds = torch.tensor([wd for _, wd in grid], device=device)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    n = len(train)
    steps_per_epoch = -(-n // config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total // 2)
    eps = config.label_smoothing
    # The permutation is drawn on the training device in both modes, so resident and streamed
    # runs see identical batches.
    gen = torch.Generator(device=device).manual_seed(config.seed)
    result = TrainResult(weight, bias)
    start = time.perf_counter()
    step = 0
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen, device=device)
        if train.x.device != device:
            perm_host = perm.cpu()
        running = torch.zeros(g, device=device, dtype=torch.float64)
        for lo in range(0, n, config.batch_size):
            if train.x.device == device:
                idx = perm[lo:lo + config.batch_size]
                x, y = train.x[idx], train.y[idx]
            else:
                idx = perm_host[lo:lo + config.batch_size]
                x = train.x[idx].to(device, non_blocking=True)
                y = train.y[idx].to(device, non_blocking=True)
            x = (x.float() - mu) / sigma
            b = x.shape[0]
            logits = logits_of(x, weight, bias)  # [G, B, C]
            logp = torch.log_softmax(logits, dim=2)
            target = torch.full_like(logp, eps / c)
            target.scatter_(2, y[None, :, None].expand(g, b, 1), 1.0 - eps + eps / c)
            running += -(target * logp).sum(2).sum(1).double()
            grad = (logp.exp() - target) / b  # dLoss/dlogits of each point's mean loss
            grad_w = (grad.transpose(0, 1).reshape(b, g * c).T @ x).reshape(g, c, d)
            grad_b = grad.sum(1)
            rate = lrs * lr_factor(step, total, warmup)
            # torch.optim.SGD semantics: d = grad + wd * w; buf = m * buf + d; w -= lr * buf
            buf_w.mul_(config.momentum).add_(grad_w + wds[:, None, None] * weight)
            buf_b.mul_(config.momentum).add_(grad_b)
            weight.sub_(rate[:, None, None] * buf_w)
            bias.sub_(rate[:, None] * buf_b)
            step += 1
        records = [{"epoch": epoch + 1, "lr": lr, "weight_decay": wd,
                    "train_loss": float(running[i]) / n} for i, (lr, wd) in enumerate(grid)]
        raw_w, raw_b = fold(weight, bias, mu, sigma)
        for name, feats in (evals or {}).items():
            for rec, m in zip(records, evaluate(feats, raw_w, raw_b, device=device), strict=True):
                rec.update({f"{name}_{k}": v for k, v in m.items()})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.epoch_seconds.append(time.perf_counter() - t0)
        result.history += records
        if on_epoch is not None:
            on_epoch(epoch + 1, records)
    result.seconds = time.perf_counter() - start
    raw_w, raw_b = fold(weight, bias, mu, sigma)
    result.weight, result.bias = raw_w.cpu(), raw_b.cpu()
    return result


@torch.no_grad()
def feature_stats(x: torch.Tensor, device: torch.device, batch: int = 65536
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std over rows (float64 sums, in batches; std floored at 1e-6)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    sq = torch.zeros_like(total)
    for lo in range(0, x.shape[0], batch):
        part = x[lo:lo + batch].to(device).double()
        total += part.sum(0)
        sq += (part * part).sum(0)
    n = max(x.shape[0], 1)
    mean = total / n
    var = (sq / n - mean * mean).clamp_min(0)
    return mean.float(), var.sqrt().clamp_min(1e-6).float()


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
    preds = []
    for lo in range(0, len(feats), 4096):
        x = feats.x[lo:lo + 4096].to(device)
        preds.append(logits_of(x, w, b)[0].argmax(1).cpu())
    pred = torch.cat(preds).numpy()
    true = feats.y.cpu().numpy()
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (true, pred), 1)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    mapping = np.arange(c)
    mapping[rows] = cols  # true class t is predicted at old index mapping[t]
    before = float((pred == true).mean())
    inverse = np.empty(c, dtype=np.int64)
    inverse[mapping] = np.arange(c)
    after = float((inverse[pred] == true).mean())
    present = confusion.sum(1) > 0
    clean = float((confusion.argmax(1) == mapping)[present].mean()) if present.any() else 0.0
    moved = int((mapping != np.arange(c))[present].sum())
    return Diagnosis(before, after, moved, clean, mapping.tolist(),
                     is_permutation=clean >= min_clean)


def parse_grid(text: str, name: str, *, allow_zero: bool) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise DataError(f"--{name} {text!r}: expected numbers separated by commas") from exc
    if not values:
        raise DataError(f"--{name} is empty: give at least one value")
    bad = [v for v in values if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero)]
    if bad:
        need = "non-negative" if allow_zero else "positive"
        raise DataError(f"--{name}: {bad[0]} is not a valid value; every value must be {need}")
    return values


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
    """Index of the best grid point by `key`_top1, then lower `key`_loss."""
    return max(range(len(records)),
               key=lambda i: (records[i][f"{key}_top1"], -records[i][f"{key}_loss"]))
