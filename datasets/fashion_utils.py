"""Helpers shared by the fashion converters: box formats, crop-and-fit, and writing COCO-ReID sets.

A converter turns its raw annotations into a list of :class:`FashionItem` (one output image each:
source file, optional box, pair id, "user"/"shop") and hands it to :func:`write_coco_reid`, which
crops, fits and saves every item once per target size and writes one COCO-ReID JSON per split::

    <out>/<H>_<W>/{train,query,gallery}/<file_name>      the fitted images (JPEG)
    <out>/<H>_<W>/{train,query,gallery}.json             COCO-ReID annotations of each split
    <out>/conversion_summary.json                         counts of what was written and skipped

so that ``DATASETS.ROOT_DIR <out>/<H>_<W> DATASETS.JSON_TRAIN_PATH <out>/<H>_<W>/train.json`` loads
it (the query/gallery JSON paths default to the train path with 'train' replaced in the file name).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from PIL import Image

from datasets.bases import to_rgb

log = logging.getLogger(__name__)

DEFAULT_TARGET_SIZES = ((320, 320), (256, 128))  # (height, width), as the L and S train scripts use
SPLITS = ("train", "query", "gallery")
WHITE = (255, 255, 255)

Box = tuple[float, float, float, float]  # corners (x1, y1, x2, y2) in source pixels, x2/y2 exclusive


@dataclass(frozen=True)
class FashionItem:
    """One image a converter wants written: ``source_path`` cropped to ``box`` (whole image if None)."""
    split: str  # train | query | gallery
    source_path: str
    box: Box | None
    pair_id: int
    source: str  # user (consumer / street photo) | shop
    file_name: str  # output path relative to <out>/<H>_<W>/<split>/
    extra: dict = field(default_factory=dict, compare=False)  # copied into the annotation (e.g. category)
    box_space: str | None = None  # image whose pixels ``box`` is given in, when not ``source_path`` (rescaled)


def xywh_to_corners(x: float, y: float, w: float, h: float) -> Box:
    """``[x, y, w, h]`` (top-left corner + size, COCO / Street2Shop) -> ``(x1, y1, x2, y2)``."""
    return (x, y, x + w, y + h)


def box_has_area(box: Box) -> bool:
    x1, y1, x2, y2 = box
    return x2 > x1 and y2 > y1


def crop_box(image: Image.Image, box: Box | None) -> tuple[Image.Image | None, bool]:
    """``(crop, clamped)``: the part of ``image`` inside the corner box, clipped to the image.

    Coordinates are rounded to whole pixels. The crop is None when nothing of the box lies inside
    the image; ``clamped`` says whether the box stuck out of it.
    """
    if box is None:
        return image, False
    width, height = image.size
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    cx1, cy1, cx2, cy2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
    if cx2 <= cx1 or cy2 <= cy1:
        return None, True
    return image.crop((cx1, cy1, cx2, cy2)), (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)


def fit_to_canvas(image: Image.Image, height: int, width: int, *, enlarge: bool = True,
                  fill: tuple[int, int, int] = WHITE) -> tuple[Image.Image, list[int]]:
    """Scale ``image`` to fit ``height x width`` with its aspect ratio kept, centred on a ``fill`` canvas.

    Returns the RGB canvas and the ``[x, y, w, h]`` box of the pasted image on it. With
    ``enlarge=False`` small images are not scaled up (PIL ``thumbnail`` behaviour).
    """
    src_w, src_h = image.size
    scale = min(width / src_w, height / src_h)
    if not enlarge:
        scale = min(scale, 1.0)
    new_w = max(1, min(width, int(round(src_w * scale))))
    new_h = max(1, min(height, int(round(src_h * scale))))
    resized = image.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
    canvas = Image.new("RGB", (width, height), fill)
    left, top = (width - new_w) // 2, (height - new_h) // 2
    canvas.paste(resized, (left, top))
    return canvas, [left, top, new_w, new_h]


def size_dir(out_dir: str, size: Sequence[int]) -> str:
    """``<out>/<H>_<W>``: the ROOT_DIR of one converted size."""
    return os.path.join(out_dir, f"{size[0]}_{size[1]}")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out``, ``--target-size H W`` (repeatable), ``--workers``, ``--no-enlarge``."""
    parser.add_argument("--out", required=True,
                        help="output folder; each size goes to <out>/<H>_<W>/{train,query,gallery}[.json]")
    parser.add_argument("--target-size", nargs=2, type=int, action="append", metavar=("H", "W"),
                        help="output image size, height then width; repeat for several sizes "
                             "(default: --target-size 320 320 --target-size 256 128)")
    parser.add_argument("--workers", type=int, default=4, help="threads that crop and save images (default 4)")
    parser.add_argument("--no-enlarge", action="store_true",
                        help="never scale crops up (PIL thumbnail); by default small crops are enlarged to fit")


def target_sizes(args: argparse.Namespace) -> list[tuple[int, int]]:
    sizes = [tuple(s) for s in (args.target_size or DEFAULT_TARGET_SIZES)]
    for size in sizes:
        if min(size) < 8:
            raise SystemExit(f"--target-size {size[0]} {size[1]}: height and width must be >= 8 pixels.")
    return list(dict.fromkeys(sizes))  # drop repeats, keep order


@dataclass
class _Outcome:
    item: FashionItem
    problem: str | None  # why the item was not written
    boxes: dict  # size -> [x, y, w, h] of the pasted crop
    clamped: bool = False


def _process(item: FashionItem, out_dir: str, sizes: Sequence[tuple[int, int]], enlarge: bool) -> _Outcome:
    if not os.path.isfile(item.source_path):
        return _Outcome(item, "missing source image", {})
    try:
        with Image.open(item.source_path) as img:
            image = to_rgb(img)
    except Exception as err:  # PIL raises many kinds for a damaged or non-image file
        log.debug("Cannot read %s: %s", item.source_path, err)
        return _Outcome(item, "unreadable source image", {})
    box = item.box
    if box is not None and item.box_space is not None:
        try:
            with Image.open(item.box_space) as reference:
                ref_width, ref_height = reference.size
        except Exception as err:  # missing or damaged: the box cannot be placed
            log.debug("Cannot read %s: %s", item.box_space, err)
            return _Outcome(item, "missing or unreadable image the box refers to", {})
        sx, sy = image.width / ref_width, image.height / ref_height
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    crop, clamped = crop_box(image, box)
    if crop is None:
        return _Outcome(item, "box outside the image", {})
    boxes = {}
    for size in sizes:
        canvas, pasted = fit_to_canvas(crop, size[0], size[1], enlarge=enlarge)
        target = os.path.join(size_dir(out_dir, size), item.split, item.file_name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        canvas.save(target, "JPEG", quality=95)
        boxes[size] = pasted
    return _Outcome(item, None, boxes, clamped)


def _coco_json(dataset: str, split: str, size: tuple[int, int], outcomes: Sequence[_Outcome]) -> dict:
    height, width = size
    images, annotations = [], []
    for index, outcome in enumerate(outcomes, start=1):
        item = outcome.item
        x, y, w, h = outcome.boxes[size]
        images.append({"id": index, "file_name": item.file_name, "height": height, "width": width})
        annotations.append({"id": index, "image_id": index, "pair_id": item.pair_id, "source": item.source,
                            "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, **item.extra})
    return {"info": {"description": f"{dataset} COCO-ReID {split} split, images {height}x{width} (HxW)",
                     "dataset": dataset, "split": split, "image_size": [height, width]},
            "images": images, "annotations": annotations}


def write_coco_reid(items: Iterable[FashionItem], out_dir: str, sizes: Sequence[tuple[int, int]], *,
                    dataset: str, workers: int = 4, enlarge: bool = True,
                    notes: Counter | None = None) -> dict:
    """Crop, fit and save every item for every size, then write the three JSONs per size.

    Items whose source image is missing or unreadable, or whose box misses the image, are skipped
    and counted. Query items whose pair id ends up with no gallery image are removed (files too),
    so the output always passes the COCO-ReID loader's checks. ``notes`` holds the converter's own
    counts (e.g. boxes of zero area); everything is logged and written to
    ``<out>/conversion_summary.json`` (with up to 20 source files per skip reason), which is also returned.
    """
    items = sorted(items, key=lambda it: (SPLITS.index(it.split), it.file_name))
    names = Counter((it.split, it.file_name) for it in items)
    repeated = [name for name, count in names.items() if count > 1]
    if repeated:
        raise ValueError(f"Two items share the output file {repeated[0][0]}/{repeated[0][1]}; "
                         "the converter must give every item a unique file name.")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = list(pool.map(lambda it: _process(it, out_dir, sizes, enlarge), items))

    skipped = Counter(notes or {})
    skipped.update(o.problem for o in outcomes if o.problem)
    skipped["boxes clipped to the image (kept)"] += sum(o.clamped for o in outcomes)
    kept = [o for o in outcomes if o.problem is None]
    gallery_pairs = {o.item.pair_id for o in kept if o.item.split == "gallery"}
    lonely = [o for o in kept if o.item.split == "query" and o.item.pair_id not in gallery_pairs]
    for outcome in lonely:
        for size in sizes:
            os.remove(os.path.join(size_dir(out_dir, size), "query", outcome.item.file_name))
    if lonely:
        skipped["query images whose pair has no gallery image (removed)"] += len(lonely)
    lonely_ids = {id(o) for o in lonely}
    kept = [o for o in kept if id(o) not in lonely_ids]

    by_split = {split: [o for o in kept if o.item.split == split] for split in SPLITS}
    for size in sizes:
        for split, outcomes_of_split in by_split.items():
            path = os.path.join(size_dir(out_dir, size), f"{split}.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(_coco_json(dataset, split, size, outcomes_of_split), handle)
    summary = {
        "dataset": dataset,
        "sizes": [f"{h}_{w}" for h, w in sizes],
        "images": {split: len(v) for split, v in by_split.items()},
        "pair_ids": {split: len({o.item.pair_id for o in v}) for split, v in by_split.items()},
        "skipped_or_changed": {k: v for k, v in sorted(skipped.items()) if v},
        "skipped_examples": {reason: [o.item.source_path for o in outcomes if o.problem == reason][:20]
                             for reason in sorted({o.problem for o in outcomes if o.problem})},
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "conversion_summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    log.info("%s: wrote %s images (%s pair ids) per size %s under %s", dataset, summary["images"],
             summary["pair_ids"], summary["sizes"], out_dir)
    for reason, count in summary["skipped_or_changed"].items():
        log.info("  %s: %d", reason, count)
    return summary
