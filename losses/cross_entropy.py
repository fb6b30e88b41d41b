"""Cross-entropy with label smoothing (Szegedy et al., 2016)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def label_smoothing_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """logits (B, C), targets (B,) int64 -> scalar: mean_b sum_c -q_bc log softmax(logits)_bc,
    with q = (1 - epsilon) * onehot + epsilon / C."""
    num_classes = logits.shape[1]
    log_probs = F.log_softmax(logits.float(), dim=1)
    q = torch.full_like(log_probs, epsilon / num_classes)
    q.scatter_add_(1, targets.view(-1, 1), torch.full_like(log_probs[:, :1], 1.0 - epsilon))
    return -(q * log_probs).sum(dim=1).mean()
