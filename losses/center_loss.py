"""Center loss (Wen et al., ECCV 2016): pulls each feature to a learned per-class center."""
from __future__ import annotations

import torch
from torch import nn


class CenterLoss(nn.Module):
    """loss = sum_i clamp(||x_i - c_{y_i}||^2, 1e-12, 1e12) / B.

    The centers are a parameter (num_classes, feat_dim) ~ N(0, 1); they move with the module to any
    device and are trained by their own SGD optimiser (see the LightningModules).
    """

    def __init__(self, num_classes: int, feat_dim: int):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """features (B, D), labels (B,) -> scalar; zero for an empty batch."""
        if features.shape[0] == 0:
            return self.centers.sum() * 0.0
        diff = features.float() - self.centers[labels].float()
        return diff.pow(2).sum(dim=1).clamp(min=1e-12, max=1e12).sum() / features.shape[0]
