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


# ---------------------------------------------------------------------------------------------
# `tiles`: a 1000-class classifier of composed images (bench/triage.py)

TILE = 28  # a Fashion-MNIST photo
TILE_CLASSES = 10


class TileNet(nn.Module):
    """A small CNN for one 28x28 tile (3 channels, ImageNet-normalised): 10 logits."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.body = nn.Sequential(*block(3, 24), nn.MaxPool2d(2), *block(24, 48),
                                  nn.MaxPool2d(2), *block(48, 96), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.out = nn.Linear(96, TILE_CLASSES)

    def forward(self, x):
        return self.out(self.body(x))


class Tiles(nn.Module):
    """Images of three Fashion-MNIST tiles (top left, top right, bottom left of a 56x56 square);
    class (a, b, c) = a * 100 + b * 10 + c, 1000 classes. The backbone is one TileNet run on each
    tile; its features are the three tiles' log-probabilities (30-d); `fc` is the head. The head
    with rows e_a + e_(10+b) + e_(20+c) scores log p(a) + log p(b) + log p(c): the classes'
    log-probabilities under independent tiles."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.tile = TileNet()
        self.fc = nn.Linear(3 * TILE_CLASSES, num_classes)

    def features(self, x):
        n = x.shape[0]
        t = torch.stack([x[:, :, :TILE, :TILE], x[:, :, :TILE, TILE:2 * TILE],
                         x[:, :, TILE:2 * TILE, :TILE]], 1).flatten(0, 1)
        return torch.log_softmax(self.tile(t), 1).reshape(n, 3 * TILE_CLASSES)

    def forward(self, x):
        return self.fc(self.features(x))


def tiles(num_classes: int = 1000) -> nn.Module:
    torch.manual_seed(0)
    return Tiles(num_classes)
