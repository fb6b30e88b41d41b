"""The train augmentation of ``datasets.transforms`` as batched tensor ops, run on the training device.

The fast loader yields uint8 images already resized to INPUT.SIZE_TRAIN (and AutoAugmented on the host when
INPUT.AUTOAUGMENT_PROB > 0, see ``PKDataset``); ``ModelBase`` then calls, once per batch and on the device:

    params = draw_augment_params(B, (H, W), flip_prob=..., padding=..., erase_prob=..., generator=g)
    images = apply_augment_params(uint8_images, params.to(device), padding=..., mean=..., std=...)

which is horizontal flip -> zero pad -> random crop -> /255 -> normalise -> random erasing (filled with
the mean values written into the normalised tensor, the BoT quirk), exactly as the PIL path does it.
Drawing and applying are split so that a test can feed the same draws to the PIL path.

:func:`resolve_fast_path` turns the "auto" | "on" | "off" fast-path switches of the config into
booleans, in this one place, for the data module and the LightningModule alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    """Random choices for a batch of B images; every field has B rows and lives on one device."""

    flip: torch.Tensor  # (B,) bool: mirror left-right
    crop_top: torch.Tensor  # (B,) int64 in [0, 2 * padding]: first row of the crop in the padded image
    crop_left: torch.Tensor  # (B,) int64 in [0, 2 * padding]: first column of the crop in the padded image
    erase_box: torch.Tensor  # (B, 4) int64 (top, left, height, width); height = width = 0 means no erasing

    def to(self, device: torch.device | str) -> "AugmentParams":
        return AugmentParams(*(t.to(device, non_blocking=True) for t in
                               (self.flip, self.crop_top, self.crop_left, self.erase_box)))


def draw_augment_params(batch_size: int, image_size: Sequence[int], *, flip_prob: float, padding: int,
                        erase_prob: float, erase_area: tuple[float, float] = (0.02, 0.4), erase_ratio: float = 0.3,
                        erase_attempts: int = 100, generator: torch.Generator | None = None) -> AugmentParams:
    """Draw flips, crop offsets and erase boxes for ``batch_size`` images of ``image_size`` (H, W).

    Same distributions as ``T.RandomHorizontalFlip``, ``T.RandomCrop`` after ``T.Pad(padding)`` and
    ``transforms.RandomErasing``: with probability ``erase_prob`` an image gets the first of
    ``erase_attempts`` boxes (area fraction uniform in ``erase_area``, aspect ratio uniform in
    [erase_ratio, 1/erase_ratio], sides rounded) that fits strictly inside, at a uniform position;
    when no attempt fits the image is left unerased. All attempts are drawn at once (no Python loop).
    Returns CPU tensors when ``generator`` is None or a CPU generator.
    """
    height, width = int(image_size[0]), int(image_size[1])
    g = generator
    device = g.device if g is not None else torch.device("cpu")

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device=device, dtype=torch.float64)

    flip = uniform(batch_size) < flip_prob
    crop_top = torch.randint(0, 2 * padding + 1, (batch_size,), generator=g, device=device)
    crop_left = torch.randint(0, 2 * padding + 1, (batch_size,), generator=g, device=device)

    erase = uniform(batch_size) < erase_prob
    low, high = erase_area
    target_area = (low + (high - low) * uniform(batch_size, erase_attempts)) * (height * width)
    aspect = erase_ratio + (1 / erase_ratio - erase_ratio) * uniform(batch_size, erase_attempts)
    box_h = torch.round(torch.sqrt(target_area * aspect)).long()  # round half to even, as Python's round
    box_w = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (box_h < height) & (box_w < width)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first attempt that fits
    erase &= fits.any(dim=1)
    box_h = torch.where(erase, box_h.gather(1, first).squeeze(1), 0)
    box_w = torch.where(erase, box_w.gather(1, first).squeeze(1), 0)
    # Uniform integer in [0, size - box] (inclusive), like random.randint.
    top = torch.floor(uniform(batch_size) * (height - box_h + 1)).long()
    left = torch.floor(uniform(batch_size) * (width - box_w + 1)).long()
    erase_box = torch.stack([top, left, box_h, box_w], dim=1)
    return AugmentParams(flip, crop_top, crop_left, erase_box)


def apply_augment_params(images: torch.Tensor, params: AugmentParams, *, padding: int, mean: Sequence[float],
                         std: Sequence[float], is_real: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> augmented, normalised float32 images (B, 3, H, W), on their device.

    A pure function of its inputs. ``params`` must be on the images' device. Images whose ``is_real``
    flag (B,) is False (the loader's mock images) come out all zero, as the PIL path leaves them.
    """
    batch, channels, height, width = images.shape
    device = images.device
    # Flipping the padded image equals padding the flipped one (the padding is symmetric).
    padded = F.pad(images, (padding, padding, padding, padding))
    padded = torch.where(params.flip.view(batch, 1, 1, 1), padded.flip(-1), padded)
    rows = params.crop_top[:, None] + torch.arange(height, device=device)  # (B, H)
    cols = params.crop_left[:, None] + torch.arange(width, device=device)  # (B, W)
    batch_index = torch.arange(batch, device=device)[:, None, None]
    cropped = padded[batch_index, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    cropped = cropped.permute(0, 3, 1, 2)  # (B, C, H, W), channels_last in memory

    # Same op order and dtype as TF.to_tensor + TF.normalize, so results match the PIL path bit for bit.
    # Built on the host and copied without blocking: torch.tensor(..., device=cuda) would wait for the GPU.
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1).to(device, non_blocking=True)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1).to(device, non_blocking=True)
    # A device tensor, not the number 255: CUDA divides by a Python scalar as a product with its
    # reciprocal, 1 ulp off x / 255 (as the CPU and TF.to_tensor compute it) for half the byte values.
    out = (cropped.to(torch.float32).div(torch.full((), 255.0, device=device)) - mean_t) / std_t

    top, left, box_h, box_w = params.erase_box.unbind(1)
    ys = torch.arange(height, device=device)
    xs = torch.arange(width, device=device)
    in_rows = (ys >= top[:, None]) & (ys < (top + box_h)[:, None])  # (B, H)
    in_cols = (xs >= left[:, None]) & (xs < (left + box_w)[:, None])  # (B, W)
    erased = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (B, 1, H, W)
    out = torch.where(erased, mean_t, out)  # the BoT fill: mean values inside the normalised tensor
    if is_real is not None:
        out = torch.where(is_real.view(batch, 1, 1, 1), out, torch.zeros((), device=device))
    return out


# ----------------------------------------------------------------------------- which switches are on
@dataclass(frozen=True)
class FastPath:
    """The fast-path switches of a run, "auto" resolved."""

    channels_last: bool  # model and input batches in channels_last memory format
    compile: bool  # torch.compile the backbone
    fused_optimizer: bool  # fused Adam/AdamW
    gpu_augment: bool  # loader yields resized uint8; augmentation runs in ModelBase.on_after_batch_transfer
    cache_images: bool  # train images decoded once into RAM (implies gpu_augment)
    cache_gib: float  # RAM the cache needs (GiB), whether or not it is on

    def describe(self) -> str:
        def word(flag: bool) -> str:
            return "on" if flag else "off"
        return (f"channels_last {word(self.channels_last)}, compile {word(self.compile)}, "
                f"fused optimizer {word(self.fused_optimizer)}, device augmentation {word(self.gpu_augment)}, "
                f"image cache {word(self.cache_images)} ({self.cache_gib:.2f} GiB needed)")


def cache_nbytes(num_images: int, image_size: Sequence[int]) -> int:
    """Bytes of a (num_images, 3, H, W) uint8 image cache."""
    return num_images * 3 * int(image_size[0]) * int(image_size[1])


def resolve_fast_path(cfg, *, use_gpu: bool, train_images: int = 0) -> FastPath:
    """Resolve the "auto" | "on" | "off" switches: "auto" means on when training on a GPU.

    The image cache on "auto" is also limited to DATALOADER.CACHE_MAX_GB for ``train_images`` images
    of INPUT.SIZE_TRAIN; a cache that is on forces the device augmentation on (validated: not "off").
    """
    def switch(value: str) -> bool:
        return use_gpu if value == "auto" else value == "on"

    loader = cfg.DATALOADER
    need = cache_nbytes(train_images, cfg.INPUT.SIZE_TRAIN)
    gpu_augment = switch(loader.GPU_AUGMENT) or loader.CACHE_IMAGES == "on"
    if loader.CACHE_IMAGES == "auto":
        cache = use_gpu and gpu_augment and 0 < need <= loader.CACHE_MAX_GB * 2**30
    else:
        cache = loader.CACHE_IMAGES == "on"
    return FastPath(channels_last=switch(cfg.MODEL.CHANNELS_LAST), compile=switch(cfg.MODEL.COMPILE),
                    fused_optimizer=switch(cfg.SOLVER.FUSED_OPTIMIZER), gpu_augment=gpu_augment,
                    cache_images=cache, cache_gib=need / 2**30)
