"""Convert DeepFashion Consumer-to-Shop (Liu et al., CVPR 2016) to COCO-ReID JSON plus cropped images.

Raw layout (``--root``)::

    Eval/list_eval_partition.txt       line 1: row count; line 2: column names; then rows
                                       image_pair_name_1 image_pair_name_2 item_id evaluation_status
    Anno/list_bbox_consumer2shop.txt   line 1: row count; line 2: column names; then rows
                                       image_name clothes_type source_type pose_type x_1 y_1 x_2 y_2
    img/CLOTHING/Blouse/id_00000001/comsumer_01.jpg ...   (image names are relative to --images-root)

``source_type`` 1 is a shop image and 2 a consumer image. The box is given by its **corners**
(x_1, y_1) and (x_2, y_2) in the pixels of the ``img/`` images; it is cropped as corners (the
original project read them as x, y, w, h and cropped too much). With ``--highres-dir img_highres``
the crops come from the high-resolution copies (``img_highres/CLOTHING/...``, the same names under
another first folder) and each box is rescaled from its ``img/`` image's size to the copy's size;
both copies must then be present.

The pair id is the number in the item id (``id_00000123`` -> 123). Splits, by evaluation_status:

- train   = every image of the ``train`` rows (source "user" or "shop" from the bbox list);
- query   = the consumer images of the ``test`` rows;
- gallery = the shop images of the ``test`` rows, plus, with ``--gallery-includes-val``, the shop
            images of the ``val`` rows (items of other ids: extra distractors, as the original did).

The ``val`` consumer images are not used. Output: ``<out>/<H>_<W>/{train,query,gallery}/`` and
``<out>/<H>_<W>/{train,query,gallery}.json`` (see ``datasets/fashion_utils.py``)::

    python -m datasets.convert_deepfashion --root /data/deepfashion/consumer2shop --out /data/df1
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections import Counter
from typing import NamedTuple

from .fashion_utils import FashionItem, add_common_arguments, box_has_area, target_sizes, write_coco_reid

log = logging.getLogger(__name__)

PARTITION_FILE = os.path.join("Eval", "list_eval_partition.txt")
BBOX_FILE = os.path.join("Anno", "list_bbox_consumer2shop.txt")
SHOP, CONSUMER = 1, 2  # source_type values in the bbox list


class PairRow(NamedTuple):
    consumer: str  # image_pair_name_1
    shop: str  # image_pair_name_2
    item_id: str
    status: str  # train | val | test


class BoxRow(NamedTuple):
    clothes_type: int
    source_type: int  # 1 shop, 2 consumer
    pose_type: int
    corners: tuple[float, float, float, float]  # x_1, y_1, x_2, y_2


def _read_table(path: str, columns: int) -> list[list[str]]:
    """Rows of a DeepFashion list file (count line and header line skipped), each split on spaces."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepFashion list file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a count line and a header line before the rows.")
    rows = []
    for number, line in enumerate(lines[2:], start=3):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != columns:
            raise ValueError(f"{path}, line {number}: expected {columns} fields, got {len(fields)}: {line!r}")
        rows.append(fields)
    try:
        declared = int(lines[0].strip())
    except ValueError as err:
        raise ValueError(f"{path}: the first line should be the row count, got {lines[0]!r}") from err
    if declared != len(rows):
        log.warning("%s declares %d rows but holds %d.", path, declared, len(rows))
    return rows


def read_partition(path: str) -> list[PairRow]:
    rows = [PairRow(*fields) for fields in _read_table(path, 4)]
    for row in rows:
        if row.status not in ("train", "val", "test"):
            raise ValueError(f"{path}: evaluation_status {row.status!r} of {row.consumer} is not train/val/test.")
    return rows


def read_boxes(path: str) -> dict[str, BoxRow]:
    boxes = {}
    for fields in _read_table(path, 8):
        try:
            boxes[fields[0]] = BoxRow(int(fields[1]), int(fields[2]), int(fields[3]),
                                      tuple(float(v) for v in fields[4:8]))
        except ValueError as err:
            raise ValueError(f"{path}: non-numeric field in the row of {fields[0]}: {' '.join(fields)}") from err
    return boxes


def item_number(item_id: str) -> int:
    """``id_00000123`` -> 123."""
    digits = re.sub(r"\D", "", item_id)
    if not digits:
        raise ValueError(f"item id {item_id!r} holds no number")
    return int(digits)


def highres_name(name: str, highres_dir: str) -> str:
    """``img/CLOTHING/...`` -> ``<highres_dir>/CLOTHING/...`` (the first folder of the name replaced)."""
    parts = name.replace("\\", "/").split("/", 1)
    if len(parts) < 2:
        raise ValueError(f"image name {name!r} has no leading folder to replace with {highres_dir!r}")
    return f"{highres_dir}/{parts[1]}"


def build_items(rows: list[PairRow], boxes: dict[str, BoxRow], images_root: str, *,
                gallery_includes_val: bool = False, highres_dir: str | None = None
                ) -> tuple[list[FashionItem], Counter]:
    """Every output image of the train/query/gallery splits, plus counts of what was left out.

    highres_dir: crop from the copies under this folder instead of ``img/`` (boxes rescaled).
    """
    notes: Counter = Counter()
    wanted = {"train": {"user": "train", "shop": "train"}, "test": {"user": "query", "shop": "gallery"},
              "val": {"shop": "gallery"} if gallery_includes_val else {}}
    statuses_of_item: dict[int, set[str]] = {}
    seen: dict[tuple[str, str], int] = {}  # (status, image name) -> pair id; rows repeat images
    items: list[FashionItem] = []
    written: set[tuple[str, str]] = set()  # (split, image name) already an item
    for row in rows:
        pair_id = item_number(row.item_id)
        statuses_of_item.setdefault(pair_id, set()).add(row.status)
        for name in (row.consumer, row.shop):
            if (row.status, name) in seen:
                if seen[(row.status, name)] != pair_id:
                    notes["images listed under two item ids (first kept)"] += 1
                continue
            seen[(row.status, name)] = pair_id
            box_row = boxes.get(name)
            if box_row is None:
                notes["images not in the bbox list (skipped)"] += 1
                continue
            if box_row.source_type not in (SHOP, CONSUMER):
                notes["source_type not 1 (shop) or 2 (consumer) (skipped)"] += 1
                continue
            source = "shop" if box_row.source_type == SHOP else "user"
            split = wanted[row.status].get(source)
            if split is None:
                notes[f"{row.status} {source} images (unused)"] += 1
                continue
            if not box_has_area(box_row.corners):
                notes["boxes of zero area (skipped)"] += 1
                continue
            if (split, name) in written:
                notes["images under two evaluation statuses (first kept)"] += 1
                continue
            written.add((split, name))
            extra = {"item_id": row.item_id, "clothes_type": box_row.clothes_type, "pose_type": box_row.pose_type}
            low_res = os.path.join(images_root, name)
            if highres_dir:
                items.append(FashionItem(split, os.path.join(images_root, highres_name(name, highres_dir)),
                                         box_row.corners, pair_id, source, name, extra, box_space=low_res))
            else:
                items.append(FashionItem(split, low_res, box_row.corners, pair_id, source, name, extra))
    mixed = sum(len(statuses) > 1 for statuses in statuses_of_item.values())
    if mixed:
        log.warning("DeepFashion: %d item ids appear under more than one evaluation_status.", mixed)
        notes["item ids in more than one of train/val/test"] += mixed
    return items, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datasets.convert_deepfashion",
        description="DeepFashion Consumer-to-Shop -> COCO-ReID (query = consumer, gallery = shop images of the "
                    "test rows). Writes <out>/<H>_<W>/{train,query,gallery}.json and the cropped images.")
    parser.add_argument("--root", required=True, help=f"folder holding {PARTITION_FILE} and {BBOX_FILE}")
    parser.add_argument("--images-root", help="folder the image names (img/...) are relative to (default --root)")
    parser.add_argument("--highres-dir", metavar="NAME",
                        help="crop from the high-resolution copies in this folder (e.g. img_highres, beside img/); "
                             "boxes are rescaled from the img/ image sizes")
    parser.add_argument("--gallery-includes-val", action="store_true",
                        help="also put the shop images of the val rows in the gallery (as the original did)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        rows = read_partition(os.path.join(args.root, PARTITION_FILE))
        boxes = read_boxes(os.path.join(args.root, BBOX_FILE))
        items, notes = build_items(rows, boxes, args.images_root or args.root,
                                   gallery_includes_val=args.gallery_includes_val, highres_dir=args.highres_dir)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    write_coco_reid(items, args.out, target_sizes(args), dataset="df1", workers=args.workers,
                    enlarge=not args.no_enlarge, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
