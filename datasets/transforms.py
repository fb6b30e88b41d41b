"""Train and test transforms (reference section 3.5).

Train: Resize -> [AutoAugment, with INPUT.AUTOAUGMENT_PROB > 0] -> RandomHorizontalFlip -> Pad (black) ->
RandomCrop -> ToTensor -> Normalize -> RandomErasing. Test: Resize -> ToTensor -> Normalize.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import torch
import torchvision.transforms as T


class RandomErasing:
    """Erase a random rectangle of a normalised CHW tensor (Zhong et al., 2017), BoT-style.

    With probability ``probability`` try up to ``attempts`` times to draw a box whose area is a
    fraction in [area_low, area_high] of the image and whose aspect ratio is in [ratio, 1/ratio];
    the box is filled with ``fill`` per channel. The BoT recipe fills with the ImageNet mean values
    written into the already-normalised tensor; we keep that for parity.
    Randomness comes from Python's ``random`` module (seeded per PK slot by ``PKDataset``).
    """

    def __init__(self, probability: float = 0.5, area_low: float = 0.02, area_high: float = 0.4,
                 ratio: float = 0.3, fill: Sequence[float] = (0.485, 0.456, 0.406), attempts: int = 100):
        self.probability, self.area_low, self.area_high = probability, area_low, area_high
        self.ratio, self.fill, self.attempts = ratio, tuple(fill), attempts

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if random.uniform(0, 1) >= self.probability:
            return img
        channels, height, width = img.shape
        area = height * width
        for _ in range(self.attempts):
            target_area = random.uniform(self.area_low, self.area_high) * area
            aspect = random.uniform(self.ratio, 1 / self.ratio)
            box_h = int(round(math.sqrt(target_area * aspect)))
            box_w = int(round(math.sqrt(target_area / aspect)))
            if box_w < width and box_h < height:
                top = random.randint(0, height - box_h)
                left = random.randint(0, width - box_w)
                img = img.clone()
                for c in range(channels):
                    img[c, top:top + box_h, left:left + box_w] = self.fill[c % len(self.fill)]
                return img
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.probability}, area=[{self.area_low}, {self.area_high}])"


def autoaugment(probability: float) -> T.RandomApply | None:
    """torchvision's ImageNet AutoAugment policy applied with ``probability`` (fast-reid's optional
    AutoAugment); None when the probability is 0, so that the pipeline draws nothing extra.

    Takes a PIL image or a uint8 tensor (3, H, W) and returns the same kind. Randomness comes from
    torch's global RNG (seeded per PK slot by ``PKDataset``). The PIL and the tensor implementations
    choose the same operations for the same RNG state, but their pixels may differ slightly.
    """
    if probability <= 0:
        return None
    return T.RandomApply([T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)], p=probability)


def build_transforms(cfg, *, is_train: bool) -> T.Compose:
    normalize = T.Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD)
    if not is_train:
        return T.Compose([T.Resize(list(cfg.INPUT.SIZE_TEST)), T.ToTensor(), normalize])
    size = list(cfg.INPUT.SIZE_TRAIN)
    auto = autoaugment(cfg.INPUT.AUTOAUGMENT_PROB)
    return T.Compose([
        T.Resize(size),
        *([auto] if auto is not None else []),  # fast-reid's order: after the resize, before flip and crop
        T.RandomHorizontalFlip(p=cfg.INPUT.PROB),
        T.Pad(cfg.INPUT.PADDING),
        T.RandomCrop(size),
        T.ToTensor(),
        normalize,
        RandomErasing(probability=cfg.INPUT.RE_PROB, fill=cfg.INPUT.PIXEL_MEAN),
    ])
