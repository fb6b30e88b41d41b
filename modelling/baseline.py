"""The embedding network: backbone -> global pooling (average or GeM) -> BNNeck -> bias-free classifier.

``forward`` returns the pre-BN feature (fed to the metric losses). ``embed`` returns the feature used
for evaluation and inference: post-BN, or pre-BN with ``TEST.NECK_FEAT before``; with ``TEST.FLIP_FEATS``
the mean of the image's and its mirror image's. ``classify`` maps pre-BN features to logits through
the BNNeck, whose bias is frozen at zero.
"""
from __future__ import annotations

import torch
from torch import nn

from .backbones import BACKBONES, build_backbone
from .pooling import build_pooling


class ReIDModel(nn.Module):
    def __init__(self, cfg, num_classes: int):
        super().__init__()
        self.backbone = build_backbone(cfg)
        self.feat_dim = BACKBONES[cfg.MODEL.NAME].feat_dim
        self.pool = build_pooling(cfg)
        self.neck_feat = cfg.TEST.NECK_FEAT  # which feature embed() returns
        self.flip_feats = cfg.TEST.FLIP_FEATS  # embed() averages each image with its horizontal mirror
        self.bnneck = nn.BatchNorm1d(self.feat_dim)
        self.bnneck.bias.requires_grad_(False)  # BNNeck: shift-free, as in BoT
        self.classifier = nn.Linear(self.feat_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pre-BN features (B, feat_dim)."""
        return self.pool(self.backbone(images))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-BN features (B, feat_dim) -> logits (B, num_classes)."""
        return self.classifier(self.bnneck(features))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> embeddings (B, feat_dim): post-BN, or pre-BN (``TEST.NECK_FEAT before``); call in
        eval mode. With ``TEST.FLIP_FEATS`` the pooled features of the image and of its mirror image are
        averaged (before the BNNeck, which in eval mode is affine: the same as averaging after it)."""
        features = self.forward(images)
        if self.flip_feats:
            features = (features + self.forward(images.flip(-1))) / 2
        return features if self.neck_feat == "before" else self.bnneck(features)
