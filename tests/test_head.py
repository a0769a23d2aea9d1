"""The stage 2 training step (pipeline/head.py) as a unit: fixed shapes, no host syncs, streamed
batches equal to resident ones, and capture in a CUDA graph where a GPU is present."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline import head as H

# Ops that make the host wait for the device on CUDA (a scalar read, data-dependent shapes).
HOST_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "is_nonzero"}


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def features(n=203, d=12, c=5, seed=0, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=gen) * 3
    y = torch.randint(0, c, (n,), generator=gen)
    x = torch.relu(centres[y] + torch.randn(n, d, generator=gen)).to(dtype)
    return H.Features(x, y)


CPU = torch.device("cpu")


def state_for(train, cfg, batches, device=CPU):
    mu, scale = H.feature_stats(train.x, device)
    return H.HeadState(cfg, num_classes=5, dim=train.x.shape[1], mu=mu, scale=scale,
                       steps=batches.steps * cfg.epochs, device=device)


@pytest.mark.parametrize("stream", [False, True])
def test_batches_have_one_shape_and_the_step_never_syncs(stream):
    train = features()
    cfg = H.TrainConfig(lrs=[0.1, 0.3], wds=[0.0, 1e-3], epochs=1, batch_size=32,
                        warmup_epochs=1.0, label_smoothing=0.1)
    batches = H.Batches(train, 32, torch.device("cpu"), stream)
    assert batches.steps == 7 and batches.streamed is stream
    state = state_for(train, cfg, batches)
    shapes, rows = set(), 0
    log = OpLog()
    for x, y, mask in batches.epoch(torch.randperm(len(train))):
        shapes.add((tuple(x.shape), tuple(y.shape), tuple(mask.shape)))
        rows += int(mask.sum())
        with log:
            state.step(x, y, mask)
    assert shapes == {((32, 12), (32,), (32,))}  # the last batch is padded, not smaller
    assert rows == len(train)  # padding is masked out: every real row counted once
    assert int(state.step_index) == 7
    assert log.ops and not HOST_SYNCS & set(log.ops), sorted(HOST_SYNCS & set(log.ops))


def test_padding_rows_count_for_nothing():
    """The padded last batch gives the same step as the unpadded rows alone."""
    train = features(n=20)
    cfg = H.TrainConfig(lrs=[0.5], wds=[1e-3], epochs=1, batch_size=32, warmup_epochs=0)
    a = state_for(train, cfg, H.Batches(train, 32, torch.device("cpu")))
    b = state_for(train, cfg, H.Batches(train, 20, torch.device("cpu")))
    pad = torch.zeros(12, 12, dtype=train.x.dtype)
    a.step(torch.cat([train.x, pad + 7]), torch.cat([train.y, torch.zeros(12, dtype=torch.long)]),
           torch.cat([torch.ones(20), torch.zeros(12)]))
    b.step(train.x, train.y, torch.ones(20))
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.running, b.running)


def test_near_constant_dimensions_are_not_blown_up():
    """A dimension with (almost) no variance keeps a scale near the typical one, so the raw
    head's weight on it stays small."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen) + 3
    x[:, 0] = 2.0  # dead channel
    x[:, 1] = 1.0 + 1e-7 * torch.randn(500, generator=gen)  # rounding noise
    mu, scale = H.feature_stats(x, torch.device("cpu"))
    typical = float(scale[2:].median())
    assert float(scale[0]) >= 0.01 * typical * 0.99 and float(scale[1]) >= 0.01 * typical * 0.99
    torch.testing.assert_close(scale[2:], x[:, 2:].std(0, unbiased=False), rtol=1e-4, atol=0)


@pytest.mark.gpu
def test_step_replays_in_a_cuda_graph_as_it_runs_eagerly():
    dev = torch.device("cuda")
    host = features(n=1000, d=64)
    train = H.Features(host.x.to(dev), host.y.to(dev))
    cfg = H.TrainConfig(lrs=[0.1, 0.3], wds=[0.0, 1e-4], epochs=2, batch_size=64,
                        warmup_epochs=1.0)
    batches = H.Batches(train, 64, dev)
    eager = state_for(train, cfg, batches, dev)
    graphed = state_for(train, cfg, batches, dev)
    warm = state_for(train, cfg, batches, dev)
    sx = torch.empty(64, 64, dtype=train.x.dtype, device=dev)
    sy = torch.zeros(64, dtype=torch.long, device=dev)
    sm = torch.ones(64, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        for _ in range(3):
            warm.step(sx, sy, sm)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step(sx, sy, sm)
    gen = torch.Generator(device=dev).manual_seed(0)
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(train), generator=gen, device=dev)
        for x, y, mask in batches.epoch(perm):
            eager.step(x, y, mask)
            sx.copy_(x)
            sy.copy_(y)
            sm.copy_(mask)
            graph.replay()
    torch.testing.assert_close(graphed.weight, eager.weight, rtol=0, atol=0)
    torch.testing.assert_close(graphed.running, eager.running, rtol=0, atol=0)
    assert int(graphed.step_index) == batches.steps * cfg.epochs


@pytest.mark.gpu
def test_streamed_equals_resident_on_cuda():
    dev = torch.device("cuda")
    host = features(n=3000, d=64)
    cfg = H.TrainConfig(lrs=[0.1, 0.3], wds=[0.0, 1e-4], epochs=2, batch_size=256,
                        warmup_epochs=1.0)
    resident = H.train_heads(H.Features(host.x.to(dev), host.y.to(dev)), cfg, num_classes=5,
                             device=dev)
    streamed = H.train_heads(host, cfg, num_classes=5, device=dev)
    assert torch.equal(resident.weight, streamed.weight)
    assert torch.equal(resident.bias, streamed.bias)
    again = H.train_heads(host, cfg, num_classes=5, device=dev)
    assert torch.equal(again.weight, streamed.weight)
    assert np.isfinite(resident.weight.numpy()).all()


def test_a_diverged_point_is_never_chosen():
    records = [{"h_top1": 0.9, "h_loss": float("nan")}, {"h_top1": 0.5, "h_loss": 1.0},
               {"h_top1": 0.5, "h_loss": 0.8}, {"h_top1": 1.0, "h_loss": float("inf")}]
    assert H.choose(records, "h") == 2

