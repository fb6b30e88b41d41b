"""Backbone registry: ``MODEL.NAME`` -> how to build it and how many channels it outputs."""
from __future__ import annotations

from typing import Callable, NamedTuple

from torch import nn

from .mobilenet import MobileNetV2Features
from .resnet import build_resnet
from .resnet_ibn_a import build_resnet_ibn_a


class BackboneSpec(NamedTuple):
    build: Callable[..., nn.Module]  # build(cfg) -> module mapping (B,3,H,W) to (B,C,h,w)
    feat_dim: int


def _resnet(name: str) -> Callable[..., nn.Module]:
    return lambda cfg: build_resnet(name, last_stride=cfg.MODEL.LAST_STRIDE, stem_relu=cfg.MODEL.STEM_RELU)


def _ibn(name: str) -> Callable[..., nn.Module]:
    return lambda cfg: build_resnet_ibn_a(name, last_stride=cfg.MODEL.LAST_STRIDE)


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(_resnet("resnet18"), 512),
    "resnet34": BackboneSpec(_resnet("resnet34"), 512),
    "resnet50": BackboneSpec(_resnet("resnet50"), 2048),
    "resnet101": BackboneSpec(_resnet("resnet101"), 2048),
    "resnet152": BackboneSpec(_resnet("resnet152"), 2048),
    "resnet50_ibn_a": BackboneSpec(_ibn("resnet50_ibn_a"), 2048),
    "resnet101_ibn_a": BackboneSpec(_ibn("resnet101_ibn_a"), 2048),
    "mobilenet_v2": BackboneSpec(lambda cfg: MobileNetV2Features(), 1280),
}


def build_backbone(cfg) -> nn.Module:
    return BACKBONES[cfg.MODEL.NAME].build(cfg)
