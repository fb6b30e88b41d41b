"""The PK batch sampler: every batch holds P distinct identities x K images each.

The sampler, not the dataset, decides which images fill an identity's K slots, so the dataset stays
immutable (the original popped samples out of its lists and ran dry after one epoch with persistent
workers). The plan of an epoch depends only on ``(seed, epoch)``: it uses its own
``numpy.random.Generator`` and never touches the global RNGs.

Under DDP every rank computes the same global plan; each global step draws ``P * world_size``
distinct identities and rank ``r`` takes the ``r``-th block of P, so ranks see disjoint identities
in every step and the same number of batches.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Sampler

from .bases import DatasetError

MOCK = -1  # slot index of a masked mock (all-zero) image
MOCK_IMAGES = ("zeros", "copy")  # what masked mock images show (DATALOADER.MOCK_IMAGES)


def masked_copy(index: int) -> int:
    """The slot entry of a masked mock image that shows record ``index`` (``DATALOADER.MOCK_IMAGES copy``)."""
    return -2 - index


def slot_record(entry: int) -> tuple[int | None, bool]:
    """A slot entry -> (record index to load, or None for an all-zero mock; whether the image is real)."""
    if entry >= 0:
        return entry, True
    return (None if entry == MOCK else -2 - entry), False


PlanSlot = tuple[int, tuple[int, ...]]  # (pid, K slot entries: record indices, MOCK or masked_copy(index))
PKSlot = tuple[int, tuple[int, ...], int]  # a PlanSlot and the seed of its images' random augmentation


def group_by_pid(pids: Sequence[int]) -> dict[int, list[int]]:
    """pid -> sorted list of record indices."""
    groups: dict[int, list[int]] = {}
    for index, pid in enumerate(pids):
        groups.setdefault(int(pid), []).append(index)
    return groups


class PKBatchSampler(Sampler[list[PKSlot]]):
    """Yields batches of P ``(pid, record_indices, augmentation_seed)`` slots, each holding K record indices.

    Each identity's images are shuffled and cut into groups of K. A last group of one image is
    dropped when the identity has others (it would be a lonely positive); identities with a single
    image are skipped. An incomplete last group is filled by resampling the identity's images
    (``use_resampling``) or with masked mock images: ``MOCK`` entries that the dataset turns into
    all-zero images, or with ``mock_images="copy"`` ``masked_copy`` entries, copies of the identity's
    images (drawn as resampling draws them) that the losses ignore just the same.
    """

    def __init__(self, pid_to_indices: Mapping[int, Sequence[int]], *, p: int, k: int, seed: int,
                 use_resampling: bool = True, mock_images: str = "zeros", rank: int = 0, world_size: int = 1):
        if p < 1 or k < 1:
            raise ValueError(f"P and K must be >= 1, got P={p}, K={k}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.pid_to_indices = {pid: list(idx) for pid, idx in sorted(pid_to_indices.items())}
        self.p, self.k, self.seed = p, k, seed
        self.use_resampling = use_resampling
        if mock_images not in MOCK_IMAGES:
            raise ValueError(f"mock_images must be one of {MOCK_IMAGES}, got {mock_images!r}")
        self.mock_images = mock_images
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        # Lightning calls set_epoch on ``dataloader.batch_sampler.sampler`` before every epoch.
        self.sampler = self
        usable = sum(1 for idx in self.pid_to_indices.values() if len(idx) > 1)
        if usable < p * world_size:
            advice = ("Lower SOLVER.IMS_PER_BATCH." if usable >= 2 * world_size else
                      "Add identities of two or more images: SOLVER.IMS_PER_BATCH cannot go below 2.")
            raise DatasetError(
                f"The PK sampler needs at least P x world size = {p} x {world_size} identities with two or "
                f"more images, but the training set has {usable}. {advice}")
        self._plan_cache: tuple[int, list[list[list[PlanSlot]]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch (also after a resume)."""
        self.epoch = epoch

    def _slots(self, rng: np.random.Generator) -> dict[int, list[tuple[int, ...]]]:
        slots: dict[int, list[tuple[int, ...]]] = {}
        for pid, indices in self.pid_to_indices.items():
            if len(indices) < 2:
                continue
            order = [indices[i] for i in rng.permutation(len(indices))]
            if len(order) % self.k == 1:
                order = order[:-1]  # never leave one image alone in a group
            groups = [order[i:i + self.k] for i in range(0, len(order), self.k)]
            last = groups[-1]
            if len(last) < self.k:
                if self.use_resampling or self.mock_images == "copy":
                    drawn = [indices[i] for i in rng.integers(0, len(indices), self.k - len(last))]
                    last = last + (drawn if self.use_resampling else [masked_copy(i) for i in drawn])
                else:
                    last = last + [MOCK] * (self.k - len(last))
                groups[-1] = last
            slots[pid] = [tuple(g) for g in groups]
        return slots

    def global_plan(self) -> list[list[list[PlanSlot]]]:
        """The epoch's batches for every rank: ``plan[step][rank]`` is a list of P slots."""
        if self._plan_cache is not None and self._plan_cache[0] == self.epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        remaining = self._slots(rng)
        per_step = self.p * self.world_size
        plan = []
        while len(remaining) >= per_step:
            alive = sorted(remaining)
            chosen = [alive[i] for i in rng.choice(len(alive), size=per_step, replace=False)]
            step = [(pid, remaining[pid].pop()) for pid in chosen]
            for pid in chosen:
                if not remaining[pid]:
                    del remaining[pid]
            plan.append([step[r * self.p:(r + 1) * self.p] for r in range(self.world_size)])
        self._plan_cache = (self.epoch, plan)
        return plan

    def __iter__(self) -> Iterator[list[PKSlot]]:
        """This rank's batches; each slot carries a seed for its images' random transforms, a function
        of (seed, epoch, step, rank, slot). The augmentation then depends neither on the process's RNG
        streams (a resumed run starts them afresh) nor on which loader worker loads the slot."""
        for number, step in enumerate(self.global_plan()):
            seeds = np.random.SeedSequence([self.seed, self.epoch, number, self.rank]).generate_state(self.p, np.uint64)
            yield [(pid, indices, int(seed >> np.uint64(1))) for (pid, indices), seed in zip(step[self.rank], seeds)]

    def __len__(self) -> int:
        return len(self.global_plan())
