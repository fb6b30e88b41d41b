"""Pairwise distances between two sets of row vectors, on the device of the inputs."""
from __future__ import annotations

import contextlib

import torch


def _float32_matmuls(device: torch.device):
    """Autocast off: under bf16 autocast ``x @ y.t()`` would run in bf16 even for float32 inputs, and
    ‖x‖² + ‖y‖² − 2x·y then loses about ‖x‖²·2⁻⁸ to cancellation (distances of 2 for features ~30 apart)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(M, D), (N, D) -> (M, N) Euclidean distances, computed in float32 (also under autocast),
    clamped at 1e-12 before the sqrt."""
    with _float32_matmuls(x.device):
        x, y = x.float(), y.float()
        squared = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * x @ y.t()
        return squared.clamp(min=1e-12).sqrt()


def cosine_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(M, D), (N, D) -> (M, N) cosine distances |1 - cos|, in float32 (also under autocast),
    clamped at 1e-12."""
    with _float32_matmuls(x.device):
        x, y = x.float(), y.float()
        x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
        y = y / y.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return (1.0 - x @ y.t()).abs().clamp(min=1e-12)


DISTANCES = {"euclidean": euclidean_dist, "cosine": cosine_dist}
