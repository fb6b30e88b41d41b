"""Batch-hard triplet loss (Hermans et al., 2017)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distances import DISTANCES


def batch_hard_triplet_loss(features: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.3,
                            distance: str = "euclidean", soft_margin: bool = False,
                            anchor_mask: torch.Tensor | None = None,
                            candidate_mask: torch.Tensor | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over anchors of max(0, d(a, hardest positive) - d(a, hardest negative) + margin).

    features: (N, D); labels: (N,). The hardest positive is the farthest same-label item (the anchor
    itself included, as in the reference), the hardest negative the nearest other-label item.
    ``anchor_mask`` (N,) bool selects the anchors that count; ``candidate_mask`` (N,) bool selects the
    items that may be mined as positives or negatives (mock images are excluded from both).
    Anchors without any negative candidate are ignored. ``soft_margin`` uses log(1 + exp(d_ap - d_an)).
    Returns (loss, mean d_ap, mean d_an) over the counted anchors; zeros when none counts.
    """
    n = features.shape[0]
    dist = DISTANCES[distance](features, features)
    same = labels.view(n, 1) == labels.view(1, n)
    # Masks may come from the host (the loader's flags): copied asynchronously, without a wait.
    candidates = torch.ones(n, dtype=torch.bool, device=features.device) if candidate_mask is None \
        else candidate_mask.to(features.device, non_blocking=True).bool()
    anchors = candidates.clone() if anchor_mask is None else \
        anchor_mask.to(features.device, non_blocking=True).bool()
    eye = torch.eye(n, dtype=torch.bool, device=features.device)
    positive = (same & candidates.view(1, n)) | eye
    negative = ~same & candidates.view(1, n)
    d_ap = torch.where(positive, dist, torch.full_like(dist, -1.0)).max(dim=1).values
    d_an = torch.where(negative, dist, torch.full_like(dist, float("inf"))).min(dim=1).values
    # Means over the counted anchors as masked sums: no data-dependent shape, so no host-device
    # synchronisation in the middle of a GPU training step.
    counted = anchors & negative.any(dim=1)
    weight = counted.to(dist.dtype)
    num_counted = weight.sum().clamp(min=1.0)
    d_an = torch.where(counted, d_an, d_ap)  # no negative: +inf, replaced by a finite value
    if soft_margin:
        per_anchor = F.softplus(d_ap - d_an)
    else:
        per_anchor = F.relu(d_ap - d_an + margin)
    loss = (per_anchor * weight).sum() / num_counted
    return (loss, (d_ap.detach() * weight).sum() / num_counted,
            (d_an.detach() * weight).sum() / num_counted)
