"""Small CNNs for 28-32 px inputs (MNIST, Fashion-MNIST, CIFAR), our own simple designs.

Each is three stages of conv3x3-BN-ReLU blocks with a 2x2 max-pool between stages, then global
average pooling and a linear head. Children are named so that feature taps read well:
``stage1``, ``pool1``, ``stage2``, ``pool2``, ``stage3``, ``pool``, ``flatten``, ``dropout``, ``head``
(blocks inside a stage are ``stage2.0``, ``stage2.1``, each with ``conv``, ``bn``, ``relu``).

``SMALL_MODELS`` is the registry: a new entry (named in ``names.py`` too, where name checks find it without
torch) is picked up by ``build_model`` and by the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from kd_cluster.models.names import SMALL_NAMES


class ConvBNReLU(nn.Sequential):
    """conv3x3 (no bias) -> BatchNorm -> ReLU, same spatial size."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        self.relu = nn.ReLU(inplace=True)


@dataclass(frozen=True)
class SmallCNNSpec:
    """The shape of one small CNN."""

    widths: tuple[int, int, int]
    """Output channels of stage 1, 2 and 3."""
    depth: int
    """conv3x3-BN-ReLU blocks per stage."""
    dropout: float
    """Dropout probability before the linear head (0 disables it)."""


class SmallCNN(nn.Module):
    """Three conv stages with max-pools between them, global average pool, linear head.

    Input ``(N, in_chans, H, W)`` with H, W >= 4 (made for 28 and 32); output ``(N, num_classes)``.
    """

    def __init__(self, spec: SmallCNNSpec, *, num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        w1, w2, w3 = spec.widths
        self.stage1 = _stage(in_chans, w1, spec.depth)
        self.pool1 = nn.MaxPool2d(2)
        self.stage2 = _stage(w1, w2, spec.depth)
        self.pool2 = nn.MaxPool2d(2)
        self.stage3 = _stage(w2, w3, spec.depth)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.head = nn.Linear(w3, num_classes)
        self.num_classes = num_classes
        self.num_features = w3
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images."""
        x = self.pool1(self.stage1(x))
        x = self.pool2(self.stage2(x))
        x = self.stage3(x)
        x = self.flatten(self.pool(x))
        return self.head(self.dropout(x))


def _stage(in_chans: int, out_chans: int, depth: int) -> nn.Sequential:
    blocks = [ConvBNReLU(in_chans if i == 0 else out_chans, out_chans) for i in range(depth)]
    return nn.Sequential(*blocks)


SMALL_SPECS: dict[str, SmallCNNSpec] = {
    "cnn_xs": SmallCNNSpec(widths=(8, 16, 32), depth=1, dropout=0.0),
    "cnn_s": SmallCNNSpec(widths=(16, 32, 64), depth=1, dropout=0.0),
    "cnn_m": SmallCNNSpec(widths=(32, 64, 128), depth=2, dropout=0.1),
    "cnn_l": SmallCNNSpec(widths=(64, 128, 256), depth=2, dropout=0.1),
}

SMALL_MODELS: dict[str, Callable[..., nn.Module]] = {
    name: partial(SmallCNN, spec) for name, spec in SMALL_SPECS.items()
}
"""Registry of the small CNNs: name -> constructor taking ``num_classes=`` and ``in_chans=``."""
assert tuple(SMALL_MODELS) == SMALL_NAMES, "a small CNN must also be named in models/names.py (torch-free)"
