"""MobileNetV2 (width 1.0) feature extractor in torchvision's layout (``features.N...``), 1280-d."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import mobilenet_v2


class MobileNetV2Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = mobilenet_v2(weights=None).features  # never downloads: weights=None
        self.out_channels = 1280

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)
