"""Small Fashion-MNIST networks trained here (`python -m rex.train`).

Both are plain eager `nn.Module`s built from Conv2d / BatchNorm2d / ReLU(6) / Linear modules (one module
instance per use, no functional activations), so BN folding and Conv/Linear swapping see every layer.

- `ResNet20` — CIFAR-style ResNet-20 (He et al. 2016, 3 stages x 3 basic blocks, 16/32/64 channels) with
  residual adds; 1 input channel, 28x28 input. Down-sampling shortcuts are 1x1 conv + BN ("option B") so
  every weight lives in a Conv2d.
- `MobileNetV2Small` — a small MobileNetV2-style net: inverted residual blocks (1x1 expand, 3x3
  depthwise, 1x1 linear projection), BN, ReLU6, residual adds where stride 1 and channels match.
"""
from __future__ import annotations

import torch
from torch import nn

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 for 1x28x28 inputs (0.27 M parameters at width 16)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, blocks: int = 3,
                 stem_stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            stage = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(BasicBlock(cin, cout, stride))
                cin = cout
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _conv_bn_relu6(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers.append(_conv_bn_relu6(cin, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),  # linear bottleneck
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res else out


class MobileNetV2Small(nn.Module):
    """Small MobileNetV2-style net for 1x28x28 inputs.

    Stem 3x3 conv (16) at 28x28, then (expand t, channels c, repeats n, stride s):
    (1,16,1,1) (4,24,2,2) (4,32,3,2) (4,64,2,1), 1x1 conv to 256, global pool, dropout, linear.
    """

    CONFIG = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 64, 2, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 1, last_channels: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        cin = 16
        layers = [_conv_bn_relu6(in_channels, cin, 3, 1)]
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_relu6(cin, last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(self.pool(x), 1))


def resnet20_fmnist(num_classes: int = 10) -> ResNet20:
    return ResNet20(num_classes=num_classes)


def mobilenetv2_fmnist(num_classes: int = 10) -> MobileNetV2Small:
    return MobileNetV2Small(num_classes=num_classes)


from .vit import vit_fmnist  # noqa: E402  (the DeiT-style ViT trained the same way)

BUILDERS = {"resnet20_fmnist": resnet20_fmnist, "mobilenetv2_fmnist": mobilenetv2_fmnist, "vit_fmnist": vit_fmnist}
