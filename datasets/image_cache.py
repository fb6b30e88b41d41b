"""Train images as resized uint8 tensors: decoded per item, or once into one in-memory tensor.

Both use :func:`resized_uint8_transform`, the same ``T.Resize`` as the PIL train transform, so the
device augmentation (``datasets.gpu_augment``) sees exactly the pixels the PIL path would flip and crop.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
import torchvision.transforms as T

from .gpu_augment import cache_nbytes

log = logging.getLogger(__name__)


def resized_uint8_transform(size: Sequence[int]) -> T.Compose:
    """PIL image -> uint8 tensor (3, H, W) resized to ``size`` (H, W), as ``build_transforms`` resizes."""
    return T.Compose([T.Resize(list(size)), T.PILToTensor()])


class ImageCache:
    """Every image of ``paths`` decoded once by ``decode`` into one (N, 3, H, W) uint8 tensor.

    ``decode(path)`` must return a uint8 tensor (3, H, W) of ``size``. Decoding runs in ``threads``
    threads (PIL releases the GIL while it decodes and resizes). Indexing returns a view, so DataLoader
    workers forked after the build share the memory.
    """

    def __init__(self, paths: Sequence[str], decode: Callable[[str], torch.Tensor], size: Sequence[int],
                 threads: int | None = None):
        height, width = int(size[0]), int(size[1])
        self.images = torch.empty((len(paths), 3, height, width), dtype=torch.uint8)
        start = time.perf_counter()

        def fill(index: int) -> None:
            image = decode(paths[index])
            if image.shape != self.images.shape[1:] or image.dtype != torch.uint8:
                raise ValueError(f"Decoding {paths[index]} gave {image.dtype} {tuple(image.shape)}, "
                                 f"expected uint8 {tuple(self.images.shape[1:])}.")
            self.images[index] = image

        threads = threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(fill, range(len(paths))):  # re-raises the first decoding error
                pass
        self.build_seconds = time.perf_counter() - start
        log.info("Cached %d train images at %dx%d: %.2f GiB in %.1f s.", len(paths), height, width,
                 cache_nbytes(len(paths), size) / 2**30, self.build_seconds)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]
