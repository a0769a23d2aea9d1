"""Custom model factories for `--arch tests.factories:NAME` (the package.module:function form)."""

import os
import time

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def tiny_net(num_classes: int = 3) -> nn.Module:
    return TinyNet(num_classes)


class SlowNet(TinyNet):
    """TinyNet that takes a while per batch, so a test can kill a run part-way."""

    def forward(self, x):
        time.sleep(float(os.environ.get("SLOWNET_SECONDS", "0.3")))
        return super().forward(x)


def slow_net(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return SlowNet(num_classes)


class ProjectedNet(TinyNet):
    """A classifier with a contrastive projection head registered after it (SimCLR/SupCon
    style, used in training only): the last nn.Linear is not the classifier, --head names it."""

    def __init__(self, num_classes: int = 3):
        super().__init__(num_classes)
        self.projector = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def projected_net(num_classes: int = 3) -> nn.Module:
    return ProjectedNet(num_classes)
