"""Centroid triplet loss (CTL) of Wieczorek et al., ICONIP 2021, in its batch-hard form.

The batch is P identities x K instances, each identity's K items contiguous. For every instance
slot i in 0..K-1 a "split" is formed from the identities whose i-th item is real:
  query_p    = f[p, i]
  centroid_p = mean of p's *other* real items (leave-one-out: the query is not in its centroid)
Identities with no other real item (empty centroid) are left out of the split; so are identities
whose slot i holds a mock image. A split with fewer than two identities is skipped. The batch-hard
triplet loss then runs over the 2P' items [queries; centroids] with labels [p; p]: every query and
every centroid is an anchor, and mock images never enter as anchors or mining candidates.
The loss is the mean over the valid splits.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .triplet_loss import batch_hard_triplet_loss


class CTLOutput(NamedTuple):
    loss: torch.Tensor
    dist_ap: torch.Tensor  # mean hardest-positive distance over valid splits (detached)
    dist_an: torch.Tensor  # mean hardest-negative distance over valid splits (detached)
    centroid_l2: torch.Tensor  # mean L2 norm of the centroids used (detached)
    num_splits: int


def centroid_triplet_loss(features: torch.Tensor, labels: torch.Tensor, is_real: torch.Tensor | None, *,
                          num_instances: int, margin: float = 0.5, distance: str = "euclidean",
                          soft_margin: bool = False) -> CTLOutput:
    """features (P*K, D), labels (P*K,), is_real (P*K,) bool or None (every item real),
    identities contiguous in groups of K."""
    features = features.float()  # bf16 under autocast: centroids and distances in fp32
    total, dim = features.shape
    k = num_instances
    if total % k:
        raise ValueError(f"Batch of {total} items is not a multiple of K={k} instances per identity.")
    feats = features.view(total // k, k, dim)
    if is_real is None:
        return _all_real_ctl(feats, labels.view(total // k, k)[:, 0], margin, distance, soft_margin)
    # Every mask and count on the host (free for the loader's flags, one wait for a device mask);
    # the device only receives index lists, copied asynchronously, so no selection waits for it.
    real = is_real.view(total // k, k).cpu()
    device = features.device
    ids = labels.view(total // k, k)[:, 0]
    real_f = real.to(device, non_blocking=True).to(feats.dtype).unsqueeze(-1)
    sums = (feats * real_f).sum(dim=1)  # (P, D): sum of real items
    counts = real.sum(dim=1)  # (P,)

    splits = []
    for slot in range(k):
        others = counts - real[:, slot].long()
        valid = real[:, slot] & (others > 0)
        if int(valid.sum()) < 2:
            continue
        rows = valid.nonzero().squeeze(1)
        divisors = others[rows].to(device, non_blocking=True).to(feats.dtype).unsqueeze(1)
        rows = rows.to(device, non_blocking=True)
        queries = feats[:, slot].index_select(0, rows)
        centroids = (sums.index_select(0, rows) - queries) / divisors
        splits.append(_split_loss(queries, centroids, ids.index_select(0, rows), margin, distance, soft_margin))
    return _mean_over_splits(splits, features)


def _all_real_ctl(feats: torch.Tensor, ids: torch.Tensor, margin: float, distance: str,
                  soft_margin: bool) -> CTLOutput:
    """The same loss when every item is real: every split holds all P identities, so nothing
    depends on the data's values and a GPU step needs no host-device synchronisation."""
    num_ids, k, _ = feats.shape
    if num_ids < 2 or k < 2:
        return _mean_over_splits([], feats)
    sums = feats.sum(dim=1)
    splits = [_split_loss(feats[:, slot], (sums - feats[:, slot]) / (k - 1), ids, margin, distance,
                          soft_margin)
              for slot in range(k)]
    return _mean_over_splits(splits, feats)


def _split_loss(queries: torch.Tensor, centroids: torch.Tensor, pids: torch.Tensor, margin: float,
                distance: str, soft_margin: bool) -> tuple[torch.Tensor, ...]:
    """One split: batch-hard triplet over [queries; centroids] -> (loss, d_ap, d_an, centroid L2)."""
    loss, d_ap, d_an = batch_hard_triplet_loss(
        torch.cat([queries, centroids]), torch.cat([pids, pids]), margin=margin, distance=distance,
        soft_margin=soft_margin)
    return loss, d_ap, d_an, centroids.detach().norm(dim=1).mean()


def _mean_over_splits(splits: list[tuple[torch.Tensor, ...]], features: torch.Tensor) -> CTLOutput:
    """CTLOutput of the split means; a zero loss (still in the graph) when there is no split."""
    if not splits:
        zero = features.sum() * 0.0
        return CTLOutput(zero, zero.detach(), zero.detach(), zero.detach(), 0)
    loss, d_ap, d_an, norm = (torch.stack(values).mean() for values in zip(*splits))
    return CTLOutput(loss, d_ap, d_an, norm, len(splits))
