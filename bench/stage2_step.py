#!/usr/bin/env python3
"""Stage 2's training step: the hand-written gradient against autograd on the batched weight.

    python bench/stage2_step.py [--device cpu] [--dim 512 --classes 100 --batch 256]

Both run the same update (SGD with momentum, the raw head's weight decay, label smoothing) on
the same batches; the autograd step differs only in how the gradient is found:
`torch.autograd.grad` of the masked mean cross-entropy through `logits_of`. Prints the median
ms per step of each (interleaved rounds) and the largest weight difference after the run.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stage2 import make_features  # noqa: E402
from pipeline import head as H  # noqa: E402


class AutogradState(H.HeadState):
    def step(self, x, y, mask):
        cfg, c = self.config, self.num_classes
        g, b = self.weight.shape[0], x.shape[0]
        x = (x.float() - self.mu) / self.scale
        w = self.weight.detach().requires_grad_(True)
        bias = self.bias.detach().requires_grad_(True)
        rows = torch.nn.functional.cross_entropy(
            H.logits_of(x, w, bias).reshape(g * b, c), y.repeat(g), reduction="none",
            label_smoothing=cfg.label_smoothing).reshape(g, b)
        self.running += (rows.detach() * mask).sum(1).double()
        loss = (rows * (mask / mask.sum())).sum()  # the points are independent: sum of means
        grad_w, grad_b = torch.autograd.grad(loss, (w, bias))
        self.update(grad_w, grad_b)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    x, y = make_features(args.n, args.dim, args.classes, device=args.device)
    train = H.Features(x, y)
    print(f"# stage 2 step: N={args.n} D={args.dim} C={args.classes} batch {args.batch}, "
          f"{dev}; {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| grid points | hand-written ms/step | autograd ms/step | autograd / hand-written | "
          "max weight difference |")
    print("|---|---|---|---|---|")
    for lrs, wds in (([0.1], [0.0]), ([0.01, 0.03, 0.1, 0.3], [0.0, 1e-4, 1e-3])):
        cfg = H.TrainConfig(lrs=lrs, wds=wds, epochs=1, batch_size=args.batch,
                            warmup_epochs=1.0, label_smoothing=0.1)
        batches = H.Batches(train, args.batch, dev)
        mu, scale = H.feature_stats(x, dev)
        times = {H.HeadState: [], AutogradState: []}
        states = {}
        for _ in range(args.rounds):
            for kind in times:
                state = kind(cfg, num_classes=args.classes, dim=args.dim, mu=mu, scale=scale,
                             steps=batches.steps, device=dev)
                perm = torch.randperm(args.n, generator=torch.Generator(dev).manual_seed(0),
                                      device=dev)
                t0 = time.perf_counter()
                for xb, yb, mask in batches.epoch(perm):
                    state.step(xb, yb, mask)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times[kind].append((time.perf_counter() - t0) / batches.steps * 1000)
                states[kind] = state
        hand, auto = (float(np.median(times[k])) for k in (H.HeadState, AutogradState))
        diff = float((states[H.HeadState].weight - states[AutogradState].weight).abs().max())
        print(f"| {len(cfg.grid())} | {hand:.2f} | {auto:.2f} | {auto / hand:.2f} | "
              f"{diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
