"""Convert raw Street2Shop (Kiapour et al., ICCV 2015) to COCO-ReID JSON plus cropped, fitted images.

Raw layout (``--root``)::

    meta/json/train_pairs_<category>.json   [{"photo": id, "product": id, "bbox": {"left", "top", "width", "height"}}]
    meta/json/test_pairs_<category>.json    same
    meta/json/retrieval_<category>.json     [{"photo": id, "product": id}]   (shop photos)
    photos/<id>.jpg                         every photo (``--photos-dir``, ``--photo-name``)

for the 11 categories bags, belts, dresses, eyewear, footwear, hats, leggings, outerwear, pants,
skirts, tops (a missing file is noted and that part skipped). The photos are downloaded from URLs
and come in many formats; ``python -m datasets.convert_to_jpg`` turns them into ``<id>.jpg`` first.

A pair id is one (category, product), numbered from 1 in sorted order (0 would read as a distractor). Splits:

- train   = the street photos of the train pairs (cropped to their box, source "user")
            + the shop photos of every product that has a train pair (source "shop");
- query   = the street photos of the test pairs (cropped, source "user");
- gallery = the shop photos of every product that has a test pair (source "shop").

Output: ``<out>/<H>_<W>/{train,query,gallery}/`` and ``<out>/<H>_<W>/{train,query,gallery}.json``
(see ``datasets/fashion_utils.py``)::

    python -m datasets.convert_street2shop --root /data/street2shop_raw --out /data/street2shop
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter

from .fashion_utils import FashionItem, add_common_arguments, box_has_area, target_sizes, write_coco_reid, \
    xywh_to_corners

log = logging.getLogger(__name__)

CATEGORIES = ("bags", "belts", "dresses", "eyewear", "footwear", "hats", "leggings", "outerwear", "pants",
              "skirts", "tops")


def _read_list(path: str, notes: Counter) -> list[dict]:
    if not os.path.isfile(path):
        log.warning("Street2Shop: %s not found, skipped.", path)
        notes["missing metadata files (skipped)"] += 1
        return []
    try:
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise ValueError(f"{path}: cannot read the metadata: {err}") from err
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of {{'photo', 'product', ...}} entries.")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "photo" not in entry or "product" not in entry:
            raise ValueError(f"{path}: entry {index} has no 'photo' and 'product': {entry!r}")
    return entries


def _street_box(entry: dict, path: str):
    """The pair's box as corners, or None when the entry carries no box."""
    bbox = entry.get("bbox")
    if bbox is None:
        return None
    try:
        return xywh_to_corners(float(bbox["left"]), float(bbox["top"]), float(bbox["width"]), float(bbox["height"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: photo {entry['photo']} has a bbox without numeric left/top/width/height: "
                         f"{bbox!r}") from err


def build_items(meta_dir: str, photos_dir: str, *, photo_name: str = "{id}.jpg",
                categories=CATEGORIES) -> tuple[list[FashionItem], Counter]:
    """Every output image of the train/query/gallery splits, plus counts of what was left out."""
    notes: Counter = Counter()
    street: dict[str, list] = {"train": [], "test": []}  # (category, entry, json path)
    shop: list[tuple[str, dict, str]] = []
    for category in categories:
        for subset in ("train", "test"):
            path = os.path.join(meta_dir, f"{subset}_pairs_{category}.json")
            street[subset] += [(category, e, path) for e in _read_list(path, notes)]
        path = os.path.join(meta_dir, f"retrieval_{category}.json")
        shop += [(category, e, path) for e in _read_list(path, notes)]

    products = {subset: {(c, e["product"]) for c, e, _ in entries} for subset, entries in street.items()}
    # Numbered from 1: evaluation reads pid 0 as a distractor.
    pair_ids = {key: index for index, key in enumerate(sorted(products["train"] | products["test"],
                                                              key=lambda k: (k[0], str(k[1]))), start=1)}
    both = products["train"] & products["test"]
    if both:
        log.warning("Street2Shop: %d products have both train and test pairs; their shop photos are in "
                    "train and gallery.", len(both))
        notes["products in both train and test (kept in both)"] += len(both)

    def photo_path(photo) -> str:
        return os.path.join(photos_dir, photo_name.format(id=photo))

    items: dict[tuple[str, str], FashionItem] = {}

    def add(split: str, category: str, entry: dict, source: str, box) -> None:
        key = (category, entry["product"])
        name = f"{source}_{entry['photo']}_{category}_{entry['product']}.jpg"
        if (split, name) in items:
            notes[f"repeated {source} entries (kept once)"] += 1
            return
        items[(split, name)] = FashionItem(split, photo_path(entry["photo"]), box, pair_ids[key], source, name,
                                           {"category": category, "product": entry["product"],
                                            "photo": entry["photo"]})

    for subset, split in (("train", "train"), ("test", "query")):
        for category, entry, path in street[subset]:
            box = _street_box(entry, path)
            if box is not None and not box_has_area(box):
                notes["street boxes of zero area (skipped)"] += 1
                continue
            if box is None:
                notes["street photos without a box (whole photo used)"] += 1
            add(split, category, entry, "user", box)
    unused = 0
    for category, entry, _ in shop:
        key = (category, entry["product"])
        if key not in pair_ids:
            unused += 1
            continue
        if key in products["train"]:
            add("train", category, entry, "shop", None)
        if key in products["test"]:
            add("gallery", category, entry, "shop", None)
    if unused:
        notes["shop photos of products without pairs (unused)"] += unused
    return list(items.values()), notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datasets.convert_street2shop",
        description="Street2Shop -> COCO-ReID (query = street photos, gallery = shop photos). Writes "
                    "<out>/<H>_<W>/{train,query,gallery}.json and the cropped images next to them.")
    parser.add_argument("--root", required=True, help="Street2Shop folder holding meta/json/ and photos/")
    parser.add_argument("--meta-dir", help="folder of the *_pairs_<category>.json and retrieval_<category>.json "
                                           "files (default <root>/meta/json)")
    parser.add_argument("--photos-dir", help="folder of the photos (default <root>/photos)")
    parser.add_argument("--photo-name", default="{id}.jpg",
                        help="file name of a photo inside --photos-dir, {id} = photo id (default '{id}.jpg')")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES, metavar="CATEGORY",
                        help="categories to convert (default: all 11)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    meta_dir = args.meta_dir or os.path.join(args.root, "meta", "json")
    photos_dir = args.photos_dir or os.path.join(args.root, "photos")
    if not os.path.isdir(meta_dir):
        parser.error(f"metadata folder {meta_dir} not found (set --meta-dir)")
    try:
        items, notes = build_items(meta_dir, photos_dir, photo_name=args.photo_name, categories=args.categories)
    except (OSError, ValueError) as err:  # a damaged metadata file: the message names it
        parser.error(str(err))
    if not items:
        parser.error(f"no Street2Shop pairs found in {meta_dir}")
    write_coco_reid(items, args.out, target_sizes(args), dataset="street2shop", workers=args.workers,
                    enlarge=not args.no_enlarge, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
