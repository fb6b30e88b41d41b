"""Torch datasets over records, the PK collate, and the LightningDataModule used by every trainer."""
from __future__ import annotations

import logging
import os
import random
from functools import cached_property
from typing import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import build_dataset
from .bases import DatasetError, ImageRecord, ReIDSplits, to_rgb, verify_images
from .gpu_augment import FastPath, resolve_fast_path
from .image_cache import ImageCache, resized_uint8_transform
from .samplers import PKBatchSampler, PKSlot, group_by_pid, slot_record
from .transforms import autoaugment, build_transforms

log = logging.getLogger(__name__)


def read_image(path: str) -> Image.Image:
    """RGB PIL image; a missing or unreadable file raises DatasetError naming it."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except FileNotFoundError as err:
        raise DatasetError(f"Image file disappeared after the dataset was indexed: {path}") from err
    except Exception as err:  # PIL's errors for truncated / non-image data vary
        raise DatasetError(f"Cannot read image {path}: {type(err).__name__}: {err}") from err


class ImageDataset(Dataset):
    """One record per item: ``(image, pid, camid, index)``."""

    def __init__(self, records: Sequence[ImageRecord], transform):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        return self.transform(read_image(record.path)), record.pid, record.camid, index


class PKDataset(Dataset):
    """Indexed by a PK slot ``(pid, K record indices, augmentation seed)`` from :class:`PKBatchSampler`.

    Returns K transformed images of the identity; ``MOCK`` entries become all-zero images and
    ``masked_copy`` entries the record's image, both with an ``is_real`` flag of False so that every
    loss can mask them out. Never mutates itself.
    With a ``cache`` (an :class:`ImageCache` indexed like ``records``) images come from it instead of
    ``transform(file)``; ``image_dtype`` is the dtype of the images (uint8 for the device augmentation).
    ``augment``, when given, is a random transform applied on the host to each loaded image, after
    ``transform`` or the cache (AutoAugment of the resized uint8 images on the device augmentation path);
    all-zero mocks skip it and stay blank.
    """

    def __init__(self, records: Sequence[ImageRecord], transform, image_size: Sequence[int], *,
                 cache: ImageCache | None = None, image_dtype: torch.dtype = torch.float32,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.records = list(records)
        self.transform = transform
        self.image_size = tuple(image_size)
        self.cache = cache
        self.image_dtype = image_dtype
        self.augment = augment

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, slot: PKSlot):
        pid, indices, seed = slot
        if self.cache is not None and self.augment is None:  # only the device augments, with its own generator
            return self._load(pid, indices)
        # The train transforms draw from torch's and Python's global RNGs: draw them from the slot's
        # seed, and leave the process's own streams as they were.
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU stream only: fork_rng restores that one
            random.seed(seed)
            try:
                return self._load(pid, indices)
            finally:
                random.setstate(python_state)

    def _load(self, pid: int, indices: Sequence[int]):
        images, camids, is_real = [], [], []
        for entry in indices:
            index, real = slot_record(entry)
            if index is None:
                images.append(torch.zeros(3, *self.image_size, dtype=self.image_dtype))
                camids.append(-1)
            else:
                record = self.records[index]
                image = self.cache[index] if self.cache is not None else self.transform(read_image(record.path))
                images.append(self.augment(image) if self.augment is not None else image)
                camids.append(record.camid)
            is_real.append(real)
        return (torch.stack(images), torch.full((len(indices),), pid, dtype=torch.long),
                torch.tensor(camids, dtype=torch.long), torch.tensor(is_real, dtype=torch.bool))


def collate_pk(batch):
    """P identity groups -> flat ``(P*K images, pids, camids, is_real)``, each identity contiguous."""
    images, pids, camids, is_real = zip(*batch)
    return torch.cat(images), torch.cat(pids), torch.cat(camids), torch.cat(is_real)


def default_num_workers(cfg, devices: int = 1) -> int:
    if cfg.DATALOADER.NUM_WORKERS >= 0:
        return cfg.DATALOADER.NUM_WORKERS
    return max(0, min(8, (os.cpu_count() or 1) // max(1, devices)))


def count_valid_queries(query: Sequence[ImageRecord], gallery: Sequence[ImageRecord], *,
                        camera_aware: bool) -> int:
    """Queries left with a true match once the protocol removes the gallery images of the query's
    identity AND camera (camera_aware, re-ID); without camera awareness any same-identity image counts."""
    cameras: dict[int, set[int]] = {}
    for record in gallery:
        cameras.setdefault(record.pid, set()).add(record.camid)
    if not camera_aware:
        return sum(1 for q in query if q.pid in cameras)
    return sum(1 for q in query if cameras.get(q.pid, set()) - {q.camid})


def check_evaluable(splits: ReIDSplits, *, camera_aware: bool) -> None:
    """Raise DatasetError when no query could be scored (an evaluation would fail only after training);
    warn when some queries will be skipped."""
    valid = count_valid_queries(splits.query, splits.gallery, camera_aware=camera_aware)
    gallery_pids = {r.pid for r in splits.gallery}
    # Queries whose identity has no gallery image at all: cameras are not the cause, and the camera advice
    # would mislead (e.g. image_folder query and gallery folders named "Bob" and "bob").
    absent = [q for q in splits.query if q.pid not in gallery_pids]
    example = f" (e.g. {absent[0].path}: identity {absent[0].pid} has no gallery image)" if absent else ""
    camera_caused = camera_aware and len(splits.query) - valid > len(absent)
    if valid == 0:
        rule = ("a gallery image of its identity from another camera: images with the query's identity "
                "AND camera are removed from its ranking (re-ID protocol). Data without camera ids needs "
                "different camera ids for query and gallery (e.g. c1 for query, c2 for gallery files), or "
                "MODEL.KEEP_CAMID_CENTROIDS False") if camera_caused else "a gallery image of its identity"
        raise DatasetError(f"{splits.name}: none of the {len(splits.query)} queries has {rule}{example}.")
    if valid < len(splits.query):
        log.warning("%s: %d of %d queries have no true match in the gallery%s%s; evaluations skip them.",
                    splits.name, len(splits.query) - valid, len(splits.query),
                    " from another camera" if camera_caused else "", example)


def check_train_labels(splits: ReIDSplits) -> None:
    """Train pids are the classifier's classes: they must be 0..N-1 (a builder of a new dataset may
    forget to relabel; the loss would then index past the classifier or train empty classes)."""
    pids = sorted({r.pid for r in splits.train})
    if pids != list(range(len(pids))):
        shown = ", ".join(map(str, pids[:5])) + (", ..." if len(pids) > 5 else "")
        raise DatasetError(f"Dataset {splits.name}: the train pids must be 0..{len(pids) - 1} (one class each), got "
                           f"{shown}; relabel them in the dataset's builder (datasets.bases.relabel_pids).")


class ReIDDataModule(pl.LightningDataModule):
    """Builds the records at construction, so bad data fails before any model is built.

    ``num_classes`` (train ids) and ``num_query`` are known right away. The validation loader
    yields the query images first, then the gallery; under DDP each rank gets a contiguous shard
    (no padding duplicates) and the model gathers features by index.
    """

    def __init__(self, cfg, *, seed: int = 0, splits: ReIDSplits | None = None, checked: bool = False):
        """splits: records built already (default: from cfg). checked: they come from a datamodule of the
        same config that has checked them (the next run of a multi-run training): not checked again."""
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.splits = splits if splits is not None else build_dataset(cfg)
        if not checked:
            self._check()
        self.num_classes = self.splits.num_train_pids
        self.num_query = len(self.splits.query)
        self.eval_records = self.splits.query + self.splits.gallery
        self._image_cache: ImageCache | None = None  # built on first use, kept across epochs
        self._cache_owner: ReIDDataModule | None = None  # for_run: the datamodule whose cache this one uses
        self._loaders: dict[str, tuple] = {}  # name -> ((trainer, rank, world), loader)

    def for_run(self, cfg, seed: int) -> ReIDDataModule:
        """The datamodule of one run of a multi-run training (``cfg`` is this one's with the run's output
        folder and weights; its data keys are the same): this one's checked records and its image cache,
        decoded once for all runs."""
        run = ReIDDataModule(cfg, seed=seed, splits=self.splits, checked=True)
        run._cache_owner = self
        return run

    def _check(self) -> None:
        """Bad data fails here, naming the file or id; queries without a match are counted in a warning."""
        cfg = self.cfg
        if cfg.DATASETS.VERIFY_IMAGES:
            # An evaluation-only run reads no train image: checking their headers would only cost time.
            train = [] if cfg.TEST.ONLY_TEST else self.splits.train
            verify_images(train + self.splits.query + self.splits.gallery)
        check_evaluable(self.splits, camera_aware=cfg.MODEL.KEEP_CAMID_CENTROIDS)
        if not cfg.TEST.ONLY_TEST:
            check_train_labels(self.splits)
            self.train_sampler()  # raises DatasetError if P identities of 2+ images cannot be drawn

    # ------------------------------------------------------------------ helpers
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader_kwargs(self, workers: int | None = None) -> dict:
        loader = self.cfg.DATALOADER
        workers = default_num_workers(self.cfg, self._rank_world()[1]) if workers is None else workers
        pin = loader.PIN_MEMORY and torch.cuda.is_available()
        kwargs = dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0 and loader.PERSISTENT_WORKERS)
        if workers > 0:  # torch refuses a prefetch factor without worker processes
            kwargs["prefetch_factor"] = loader.PREFETCH_FACTOR
        return kwargs

    def fast_path(self) -> FastPath:
        """The resolved fast-path switches (the same call as ModelBase's, so both agree)."""
        trainer = getattr(self, "trainer", None)
        use_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return resolve_fast_path(self.cfg, use_gpu=use_gpu, train_images=len(self.splits.train))

    def image_cache(self) -> ImageCache:
        if self._cache_owner is not None:
            return self._cache_owner.image_cache()
        if self._image_cache is None:
            decode = resized_uint8_transform(self.cfg.INPUT.SIZE_TRAIN)
            self._image_cache = ImageCache([r.path for r in self.splits.train], lambda path: decode(read_image(path)),
                                           self.cfg.INPUT.SIZE_TRAIN)
        return self._image_cache

    def train_dataset(self, fast: FastPath) -> PKDataset:
        """PIL-augmented float images, or resized uint8 images (cached or decoded per item) for the device,
        AutoAugmented here on the host when INPUT.AUTOAUGMENT_PROB > 0 (the device does the rest)."""
        size = self.cfg.INPUT.SIZE_TRAIN
        if not fast.gpu_augment:
            return PKDataset(self.splits.train, build_transforms(self.cfg, is_train=True), size)
        return PKDataset(self.splits.train, resized_uint8_transform(size), size, image_dtype=torch.uint8,
                         cache=self.image_cache() if fast.cache_images else None,
                         augment=autoaugment(self.cfg.INPUT.AUTOAUGMENT_PROB))

    @cached_property
    def train_groups(self) -> dict[int, list[int]]:
        """Training-image indices by pid (the sampler's input), built once."""
        return group_by_pid([r.pid for r in self.splits.train])

    def warn_about_small_identities(self) -> None:
        """Say so when most training identities have fewer than K (DATALOADER.NUM_INSTANCE) images: their
        slots are filled by resampling or with masked mock images, and a large K mostly adds filler."""
        k = self.cfg.DATALOADER.NUM_INSTANCE
        counts = np.array([len(indices) for indices in self.train_groups.values()])
        singles = int((counts == 1).sum())
        if singles:
            # They stay classes of the classifier, but the PK sampler never draws them: nothing trains them.
            log.warning("%d of %d training identities have a single image: the PK sampler never puts them in a "
                        "batch (it needs two images of an identity), so they are not trained on.",
                        singles, counts.size)
        short = int((counts < k).sum())
        if counts.size and short * 2 > counts.size:
            loader = self.cfg.DATALOADER
            filler = ("resampled images" if loader.USE_RESAMPLING else
                      "masked copies of their images" if loader.MOCK_IMAGES == "copy" else "masked mock images")
            log.warning("DATALOADER.NUM_INSTANCE %d: %d of %d training identities have fewer images (median %g); "
                        "their batch slots are filled with %s. A K nearer the median wastes less of each batch.",
                        k, short, counts.size, float(np.median(counts)), filler)

    def train_sampler(self, rank: int = 0, world_size: int = 1) -> PKBatchSampler:
        return PKBatchSampler(self.train_groups,
                              p=self.cfg.SOLVER.IMS_PER_BATCH, k=self.cfg.DATALOADER.NUM_INSTANCE,
                              seed=self.seed, use_resampling=self.cfg.DATALOADER.USE_RESAMPLING,
                              mock_images=self.cfg.DATALOADER.MOCK_IMAGES, rank=rank, world_size=world_size)

    def eval_shard(self, rank: int, world_size: int) -> range:
        """Contiguous slice of the query+gallery list handled by ``rank``."""
        n = len(self.eval_records)
        return range(rank * n // world_size, (rank + 1) * n // world_size)

    # ------------------------------------------------------------------ loaders
    def _loader_for_trainer(self, name: str, build: Callable[[], DataLoader]) -> DataLoader:
        """``build()``'s loader, made once per trainer and rank and handed back on later calls
        (Lightning asks every epoch): its persistent workers live on."""
        owner = (getattr(self, "trainer", None), *self._rank_world())
        cached = self._loaders.get(name)
        if cached is None or cached[0][0] is not owner[0] or cached[0][1:] != owner[1:]:
            cached = self._loaders[name] = (owner, build())
        return cached[1]

    def _build_train_loader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = self.train_sampler(rank, world)
        if world > 1:  # the ranks' plans give disjoint identities only when their seeds are equal
            log.info("Rank %d/%d: PK sampler seed %d", rank, world, self.seed)
        fast = self.fast_path()
        # From the cache a batch is a few tensor copies: worker processes would only add start-up time.
        # AutoAugment is per-image CPU work again, which the workers share (forked, they share the cache).
        workers = 0 if fast.cache_images and self.cfg.INPUT.AUTOAUGMENT_PROB == 0 else None
        return DataLoader(self.train_dataset(fast), batch_sampler=sampler, collate_fn=collate_pk,
                          **self._loader_kwargs(workers))

    def train_dataloader(self) -> DataLoader:
        """The PK loader, with its plan set to the coming epoch. Lightning asks for it every epoch:
        the plan's length changes with the epoch, and Lightning reads a loader's length only when
        it gets one."""
        loader = self._loader_for_trainer("train", self._build_train_loader)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            # Set before Lightning's own set_epoch call: the length Lightning reads now, and the
            # first iterator (also after a resume), whose workers prefetch at once, follow this
            # epoch's plan. Lightning's own set_epoch value; after a resume current_epoch still lags.
            loader.batch_sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
        return loader

    def _build_val_loader(self) -> DataLoader:
        shard = self.eval_shard(*self._rank_world())
        dataset = ImageDataset(self.eval_records, build_transforms(self.cfg, is_train=False))
        subset = torch.utils.data.Subset(dataset, list(shard))
        return DataLoader(subset, batch_size=self.cfg.TEST.IMS_PER_BATCH, shuffle=False, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        """Each rank's contiguous shard of query + gallery."""
        return self._loader_for_trainer("val", self._build_val_loader)
