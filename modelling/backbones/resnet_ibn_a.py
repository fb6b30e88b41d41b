"""ResNet-IBN-a (Pan et al., ECCV 2018): Instance + Batch normalisation in the first bottleneck norm.

In layer1..layer3 each bottleneck's ``bn1`` normalises half of its channels with InstanceNorm
(affine, computed in float32) and the rest with BatchNorm; layer4 keeps plain BatchNorm. The stem
is conv-BN-ReLU-maxpool. Parameter names follow the published IBN-a weights
(``layerX.Y.bn1.IN.weight``, ``layerX.Y.bn1.BN.running_mean``, ...).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .resnet import Bottleneck, ResNet


class IBN(nn.Module):
    def __init__(self, planes: int):
        super().__init__()
        self.half = planes // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, rest = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        first = self.IN(first.float()).to(x.dtype)  # InstanceNorm is unstable in half precision
        return torch.cat([first, self.BN(rest)], dim=1)


class ResNetIBNa(ResNet):
    def __init__(self, layers: list[int], last_stride: int = 1):
        super().__init__(Bottleneck, layers, last_stride=last_stride, stem_relu=True)
        for module in self.modules():  # the published IBN-a initialisation
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                module.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d)) and module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_block(self, block: type, planes: int, stride: int, downsample, index: int) -> nn.Module:
        norm1 = IBN(planes) if planes != 512 else None
        return block(self.inplanes, planes, stride, downsample, norm1=norm1)


def build_resnet_ibn_a(name: str, *, last_stride: int = 1) -> ResNetIBNa:
    layers = {"resnet50_ibn_a": [3, 4, 6, 3], "resnet101_ibn_a": [3, 4, 23, 3]}[name]
    return ResNetIBNa(layers, last_stride=last_stride)
