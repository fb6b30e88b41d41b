"""Global pooling of the backbone's feature map into one vector per image (``MODEL.POOLING``).

``avg`` is the paper's and BoT's global average pooling. ``gem`` is generalised-mean pooling
(Radenović et al., TPAMI 2018): ``(mean over positions of x^p)^(1/p)`` per channel, with the
exponent p starting at ``MODEL.GEM_P`` and learned with the network unless
``MODEL.GEM_P_LEARNED False``. p = 1 is average pooling and p → ∞ approaches max pooling, so a
larger p weighs the strongest responses of a channel more; fast-reid's stronger baselines use it.
"""
from __future__ import annotations

import torch
from torch import nn


def generalized_mean(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, H, W), exponent p (a 1-element tensor) -> (B, C) in float32, or float64 for float64 input."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    p = p.to(dtype)
    return x.to(dtype).clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeneralizedMeanPooling(nn.Module):
    """(B, C, H, W) -> (B, C): ``mean_hw(clamp(x, eps)^p)^(1/p)``, computed in float32 (or wider).

    The float32 computation keeps ``x^p`` of a bf16/fp16 feature map (autocast) from rounding or
    overflowing; ``eps`` keeps the gradient with respect to p finite where a ReLU output is 0.
    p is a parameter in either case, so the state dict (and an ONNX export) always holds the value used.
    """

    def __init__(self, p: float = 3.0, *, learned: bool = True, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]), requires_grad=learned)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return generalized_mean(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()):.4g}, learned={self.p.requires_grad}, eps={self.eps}"


POOLINGS = ("avg", "gem")


def build_pooling(cfg) -> nn.Module:
    """The pooling layer ``cfg.MODEL.POOLING`` names."""
    name = cfg.MODEL.POOLING
    if name == "avg":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    if name == "gem":
        return GeneralizedMeanPooling(cfg.MODEL.GEM_P, learned=cfg.MODEL.GEM_P_LEARNED)
    raise ValueError(f"MODEL.POOLING {name!r} is not one of {POOLINGS}")
