"""Models for benchmarks, by `--arch bench.models:NAME`.

`pool` costs next to nothing (a global average pool and a linear layer), so stage 1 run with it
measures the input path alone: reading, checking, decoding, resizing, the hand-over to torch and
the store writes.
"""

import torch
from torch import nn


class Pool(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x):
        return self.fc(self.pool(x))


def pool(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return Pool(num_classes)
