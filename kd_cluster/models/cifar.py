"""The CIFAR model family of the knowledge-distillation literature (the CRD benchmark), our own code.

The architectures follow the networks the CRD paper (Tian et al., ICLR 2020) and its public benchmark
report on: CIFAR ResNets (3x3 stem, three stages, ``6n+2`` layers; ``x4`` = four times the widths),
wide ResNets ``wrn_<depth>_<widen>`` (pre-activation blocks), VGG-8/13 with batch norm and one linear
layer, and the CIFAR MobileNetV2 with expansion 6 and width 0.5. Differences from those networks,
none of which changes a parameter count:

* global pooling is adaptive (``AdaptiveAvgPool2d(1)``), so the models run at any input size
  (28 px grayscale digits for smoke runs, 32 px CIFAR, larger);
* VGG never max-pools after its fourth block (their code does so only for 64 px inputs).

Names: ``build_model("cifar:<name>")`` always means this family (what the job files and the README
use); the bare names that no torchvision model has (``resnet8x4``, ``wrn_40_2``, ...) resolve here too.
``vgg13`` alone is torchvision's ImageNet VGG-13, so write ``cifar:vgg13``.

Feature taps (module names, each standing for the module's output):

* ResNets: ``stem`` (conv-BN-ReLU), ``layer1``, ``layer2``, ``layer3`` (after the block's ReLU),
  ``flatten`` (the pooled penultimate feature), ``fc``;
* WRNs: ``conv1``, ``block1``, ``block2``, ``block3`` (group outputs, before the final BN-ReLU),
  ``relu`` (after it), ``flatten``, ``fc``;
* VGG: ``block0`` .. ``block4`` (after each block's last ReLU), ``flatten``, ``classifier``;
* MobileNetV2: ``conv1``, ``blocks.0`` .. ``blocks.6``, ``conv2``, ``flatten``, ``classifier``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from kd_cluster.models.names import CIFAR_NAMES, CIFAR_PREFIX


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _cbr(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _head() -> tuple[nn.Module, nn.Module]:
    return nn.AdaptiveAvgPool2d(1), nn.Flatten(1)


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected when the shape changes) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32 px inputs: a 3x3 stem of ``widths[0]`` channels, three stages of ``(depth-2)/6``
    basic blocks with ``widths[1:]`` channels (stride 1, 2, 2), global average pool, linear."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], *, num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        assert (depth - 2) % 6 == 0, depth
        n = (depth - 2) // 6
        self.stem = _cbr(in_chans, widths[0], 3)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            blocks = [BasicBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.pool, self.flatten = _head()
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images."""
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


# ------------------------------------------------------------------------------------ Wide ResNet


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the input (1x1 conv when the width changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.equal = cin == cout and stride == 1
        self.shortcut = nn.Identity() if self.equal else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        # a projecting shortcut reads the activated input (as in the original WRN); identity reads x
        return out + (x if self.equal else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-widen for 32 px inputs: widths 16, 16k, 32k, 64k; ``(depth-4)/6`` blocks per group."""

    def __init__(self, depth: int, widen: int, *, num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        assert (depth - 4) % 6 == 0, depth
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = _conv3x3(in_chans, widths[0])
        groups, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            groups.append(nn.Sequential(*[WideBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1)
                                          for j in range(n)]))
            cin = w
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool, self.flatten = _head()
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(self.relu(self.bn(x)))))


# -------------------------------------------------------------------------------------------- VGG

VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class CifarVGG(nn.Module):
    """VGG with batch norm for 32 px: five blocks of conv3x3(bias)-BN-ReLU, 2x2 max-pools after the first
    three, global average pool, one linear layer."""

    def __init__(self, config: tuple[tuple[int, ...], ...], *, num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        cin = in_chans
        for i, widths in enumerate(config):
            layers: list[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            setattr(self, f"block{i}", nn.Sequential(*layers))
        self.pool0, self.pool1, self.pool2 = (nn.MaxPool2d(2) for _ in range(3))
        self.pool, self.flatten = _head()
        self.classifier = nn.Linear(cin, num_classes)
        self.num_features = cin
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images."""
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.block3(x))
        return self.classifier(self.flatten(self.pool(x)))


# ------------------------------------------------------------------------------------ MobileNetV2


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN; residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.conv = nn.Sequential(_cbr(cin, hidden, 1), _cbr(hidden, hidden, 3, stride, groups=hidden),
                                  nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for 32 px (stride-2 stem, seven inverted-residual groups, 1x1 conv to 1280, pool, linear)."""

    SETTINGS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
                (None, 160, 3, 2), (None, 320, 1, 1))  # (expansion or None = T, channels, blocks, stride)

    def __init__(self, expand: int = 6, width: float = 0.5, *, num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        cin = int(32 * width)
        self.conv1 = _cbr(in_chans, cin, 3, stride=2)
        groups = []
        for t, c, n, s in self.SETTINGS:
            cout = int(c * width)
            blocks = []
            for j in range(n):
                blocks.append(InvertedResidual(cin, cout, s if j == 0 else 1, expand if t is None else t))
                cin = cout
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*groups)
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _cbr(cin, last, 1)
        self.pool, self.flatten = _head()
        self.classifier = nn.Linear(last, num_classes)
        self.num_features = last
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images."""
        x = self.conv2(self.blocks(self.conv1(x)))
        return self.classifier(self.flatten(self.pool(x)))


CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8x4": partial(CifarResNet, 8, (32, 64, 128, 256)),
    "resnet32x4": partial(CifarResNet, 32, (32, 64, 128, 256)),
    "resnet8": partial(CifarResNet, 8, (16, 16, 32, 64)),
    "resnet14": partial(CifarResNet, 14, (16, 16, 32, 64)),
    "resnet20": partial(CifarResNet, 20, (16, 16, 32, 64)),
    "resnet32": partial(CifarResNet, 32, (16, 16, 32, 64)),
    "resnet44": partial(CifarResNet, 44, (16, 16, 32, 64)),
    "resnet56": partial(CifarResNet, 56, (16, 16, 32, 64)),
    "resnet110": partial(CifarResNet, 110, (16, 16, 32, 64)),
    "wrn_16_1": partial(WideResNet, 16, 1),
    "wrn_16_2": partial(WideResNet, 16, 2),
    "wrn_40_1": partial(WideResNet, 40, 1),
    "wrn_40_2": partial(WideResNet, 40, 2),
    "vgg8": partial(CifarVGG, VGG_CONFIGS["vgg8"]),
    "vgg11": partial(CifarVGG, VGG_CONFIGS["vgg11"]),
    "vgg13": partial(CifarVGG, VGG_CONFIGS["vgg13"]),
    "mobilenetv2": partial(CifarMobileNetV2, 6, 0.5),
}
"""Registry of the CIFAR family (names without the ``cifar:`` prefix): constructor taking
``num_classes=`` and ``in_chans=``."""
assert tuple(CIFAR_MODELS) == CIFAR_NAMES, "a CIFAR model must also be named in models/names.py (torch-free)"

