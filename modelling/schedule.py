"""The learning rate as a pure function of the epoch: warmup, then multistep or cosine.

Being stateless, it is restored exactly by a resume: the trainer sets the rate at the start of
every epoch from this function.
"""
from __future__ import annotations

import math


def lr_at_epoch(epoch: int, solver) -> float:
    """Learning rate of the network optimiser during ``epoch`` (0-based), from the SOLVER config node."""
    base = solver.BASE_LR
    warmup = solver.WARMUP_EPOCHS if solver.USE_WARMUP_LR else 0
    if epoch < warmup:
        return base * (epoch + 1) / warmup
    if solver.LR_SCHEDULER_NAME == "cosine_annealing":
        span = max(1, solver.MAX_EPOCHS - warmup)
        progress = min(1.0, (epoch - warmup) / span)
        return solver.MIN_LR + (base - solver.MIN_LR) * 0.5 * (1.0 + math.cos(math.pi * progress))
    passed = sum(1 for step in solver.LR_STEPS if epoch >= step)
    return base * solver.GAMMA ** passed
