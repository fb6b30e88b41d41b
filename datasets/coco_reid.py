"""Consumer-to-shop fashion retrieval from COCO-ReID JSON files (Street2Shop, DeepFashion C2S).

Inputs (the converters ``datasets.convert_street2shop`` / ``datasets.convert_deepfashion`` write them):

- ``DATASETS.JSON_TRAIN_PATH``: the train JSON. ``DATASETS.JSON_QUERY_PATH`` and
  ``DATASETS.JSON_GALLERY_PATH`` default to it with "train" replaced by "query" / "gallery" in the
  **file name** only (``/data/train_sets/train.json`` -> ``/data/train_sets/query.json``). An
  evaluation-only read (``TEST.ONLY_TEST``, or the test set of a cross-domain training) does not read
  the train JSON: it need not exist, and need not be named when both other paths are given.
- Each JSON holds ``images`` (``id``, ``file_name``, optional ``width``/``height``) and
  ``annotations`` (``image_id``, ``pair_id``, ``source`` = "user" | "shop", optional ``bbox``
  [x, y, w, h] that is checked but not cropped: the converters already cropped the images).
- Image files are ``ROOT_DIR/<split>/<file_name>`` (split = train, query, gallery), or
  ``file_name`` itself when it is an absolute path.

Splits: one record per annotation, sorted by (path, pair id).

- train: every annotation of the train JSON. Pair ids with a single image are dropped (counted in
  the log); the rest are relabelled 0..N-1 in sorted order. camid 0 for "user", 1 for "shop".
- query: the ``source == "user"`` annotations of the query JSON; raw pair id; camid 0.
- gallery: the ``source == "shop"`` annotations of the gallery JSON; raw pair id; camid 1.

The split is decided by the ``source`` field, never by path names. Evaluate with
``MODEL.KEEP_CAMID_CENTROIDS False``: nothing is removed from a query's ranking, and centroid mode
builds one centroid per gallery pair id.

Bad input (``DATASETS.ON_BAD_ANNOTATION``): an annotation whose image id is not in ``images`` or
whose file does not exist, a ``bbox`` of zero area or outside the image, an image id listed twice,
an annotation without an integer ``pair_id`` or without ``source`` "user"/"shop", a "shop"
annotation in the query JSON or a "user" one in the gallery JSON, and a query pair id with no shop
image in the gallery. With "error" (default) loading stops with a DatasetError naming the JSON file
and the ids; with "skip" those annotations are left out and counted in a summary logged at the end
(a repeated image id counts once and every annotation of it is left out; a query pair id without
gallery images counts its query images).

Metrics: fashion papers report mAP and Acc@k (top-k accuracy) for k = 1, 5, 10, 20, 50. Acc@k is
the CMC at rank k, the fraction of queries with a shop image of their pair id among the k nearest
gallery items, so ``rank1`` ... ``rank50`` in ``metrics.json`` (both modes) *are* Acc@1 ... Acc@50.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any

from .bases import DatasetError, ImageRecord, ReIDSplits

log = logging.getLogger(__name__)

BAD_ANNOTATION_MODES = ("error", "skip")
SPLIT_SOURCES = {"query": "user", "gallery": "shop"}  # the one source each evaluation split keeps
SOURCE_CAMID = {"user": 0, "shop": 1}
_SHOWN = 10  # problems listed in an error message


def default_split_path(train_path: str, split: str) -> str:
    """``train_path`` with every "train" in its file name (not its folders) replaced by ``split``."""
    folder, name = os.path.split(train_path)
    if "train" not in name:
        raise DatasetError(
            f"Cannot derive the {split} JSON from DATASETS.JSON_TRAIN_PATH {train_path!r}: its file name has "
            f"no 'train' to replace. Set DATASETS.JSON_{split.upper()}_PATH.")
    return os.path.join(folder, name.replace("train", split))


class BadInput:
    """Bad annotations found while loading: raised together ("error") or counted ("skip")."""

    def __init__(self, mode: str):
        if mode not in BAD_ANNOTATION_MODES:
            raise DatasetError(f"DATASETS.ON_BAD_ANNOTATION = {mode!r}; allowed: {', '.join(BAD_ANNOTATION_MODES)}.")
        self.mode = mode
        self.counts: Counter = Counter()  # (json file name, kind) -> annotations skipped
        self._pending: list[str] = []

    def add(self, path: str, kind: str, message: str, count: int = 1) -> None:
        self.counts[(os.path.basename(path), kind)] += count
        self._pending.append(f"{path}: {message}")
        if self.mode == "skip" and len(self._pending) <= _SHOWN:
            log.warning("Skipping bad annotation: %s: %s", path, message)

    def raise_if_any(self) -> None:
        """In "error" mode, one DatasetError listing what was found so far."""
        if self.mode != "error" or not self._pending:
            return
        shown = "\n  ".join(self._pending[:_SHOWN])
        more = f"\n  ... and {len(self._pending) - _SHOWN} more" if len(self._pending) > _SHOWN else ""
        raise DatasetError(f"{len(self._pending)} bad COCO-ReID annotation(s):\n  {shown}{more}\n"
                           "Fix the JSON (or re-run the converter), or set DATASETS.ON_BAD_ANNOTATION skip "
                           "to leave such annotations out.")

    def log_summary(self, name: str) -> None:
        if not self.counts:
            return
        lines = [f"  {file}: {kind}: {count}" for (file, kind), count in sorted(self.counts.items())]
        log.warning("%s: skipped %d bad annotation(s) (DATASETS.ON_BAD_ANNOTATION skip):\n%s", name,
                    sum(self.counts.values()), "\n".join(lines))


def read_coco(path: str, what: str) -> dict:
    """The parsed JSON at ``path`` with ``images`` and ``annotations`` lists."""
    if not os.path.isfile(path):
        raise DatasetError(f"{what} JSON not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{what} JSON {path} cannot be read: {err}") from err
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise DatasetError(f"{what} JSON {path} must be an object with 'images' and 'annotations' lists.")
    return data


def _box_problem(bbox: Any, image: dict) -> str | None:
    """Why ``bbox`` [x, y, w, h] is unusable on ``image``, or None."""
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        return f"bbox {bbox!r} is not [x, y, w, h]"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bbox {list(bbox)} has zero area"
    tolerance = 1e-3  # float rounding of boxes that touch the border
    if x < -tolerance or y < -tolerance:
        return f"bbox {list(bbox)} starts outside the image (negative x or y)"
    width, height = image.get("width"), image.get("height")
    if (isinstance(width, (int, float)) and x + w > width + tolerance) or \
            (isinstance(height, (int, float)) and y + h > height + tolerance):
        return f"bbox {list(bbox)} lies outside the {width}x{height} image"
    return None


def parse_split(path: str, split: str, root_dir: str, bad: BadInput) -> list[tuple[int, str, str]]:
    """``(raw pair id, image path, source)`` of every usable annotation of one split's JSON."""
    data = read_coco(path, split)
    images: dict[Any, dict] = {}
    duplicates = Counter()
    for image in data["images"]:
        if not isinstance(image, dict) or not isinstance(image.get("id"), (int, str)) or isinstance(image["id"], bool):
            raise DatasetError(f"{path}: an entry of 'images' has no integer or string 'id': {image!r}")
        if image["id"] in images:
            duplicates[image["id"]] += 1
        images[image["id"]] = image
    for image_id, extra in sorted(duplicates.items(), key=lambda kv: str(kv[0])):
        bad.add(path, "duplicate image id", f"image id {image_id!r} is listed {extra + 1} times in 'images'")
    keep_source = SPLIT_SOURCES.get(split)
    records = []
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DatasetError(f"{path}: annotation #{index} is not an object: {ann!r}")
        image_id = ann.get("image_id")
        where = f"annotation {ann.get('id', '#' + str(index))!r} (image id {image_id!r})"
        pair_id, source = ann.get("pair_id"), ann.get("source")
        if not isinstance(pair_id, int) or isinstance(pair_id, bool):
            bad.add(path, "no integer pair_id", f"{where} has no integer 'pair_id' (got {pair_id!r})")
            continue
        if source not in SOURCE_CAMID:
            bad.add(path, "no source user/shop", f"{where} has no 'source' \"user\" or \"shop\" (got {source!r})")
            continue
        if keep_source is not None and source != keep_source:
            bad.add(path, f"source {source} in the {split} file",
                    f"{where} has source {source!r}, but the {split} split holds only {keep_source!r} images; "
                    f"move it to the {'gallery' if source == 'shop' else 'query'} JSON")
            continue
        if image_id in duplicates:
            continue  # counted once above; which of the entries is meant cannot be known
        image = images.get(image_id)
        if image is None:
            bad.add(path, "image id not in images", f"{where} refers to an image id that is not in 'images'")
            continue
        file_name = image.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            bad.add(path, "image without file_name", f"{where}: the image has no 'file_name'")
            continue
        image_path = file_name if os.path.isabs(file_name) else os.path.join(root_dir, split, file_name)
        if not os.path.isfile(image_path):
            bad.add(path, "image file missing", f"{where}: image file {image_path} does not exist")
            continue
        if "bbox" in ann:
            problem = _box_problem(ann["bbox"], image)
            if problem:
                bad.add(path, "bad bbox", f"{where}: {problem}")
                continue
        records.append((pair_id, image_path, source))
    bad.raise_if_any()
    return records


def _sorted(records: list[ImageRecord]) -> list[ImageRecord]:
    return sorted(records, key=lambda r: (r.path, r.pid))


def load_coco_reid(cfg, name: str) -> tuple[ReIDSplits, Counter]:
    """The splits named by the config, and the counts of skipped annotations ((file, kind) -> n)."""
    ds = cfg.DATASETS
    train_path = ds.JSON_TRAIN_PATH
    # An evaluation-only read (TEST.ONLY_TEST, or the test set of a cross-domain training) leaves the train JSON
    # unread: it need not exist, and with JSON_QUERY_PATH and JSON_GALLERY_PATH both given it need not be named.
    need_train = not cfg.TEST.ONLY_TEST
    if not train_path and (need_train or not (ds.JSON_QUERY_PATH and ds.JSON_GALLERY_PATH)):
        raise DatasetError(f"DATASETS.JSON_TRAIN_PATH is empty: {name} needs the COCO-ReID train JSON written by "
                           f"the converter (e.g. <out>/320_320/train.json, with DATASETS.ROOT_DIR <out>/320_320)"
                           + ("" if need_train else ", or DATASETS.JSON_QUERY_PATH and JSON_GALLERY_PATH both") + ".")
    query_path = ds.JSON_QUERY_PATH or default_split_path(train_path, "query")
    gallery_path = ds.JSON_GALLERY_PATH or default_split_path(train_path, "gallery")
    bad = BadInput(ds.ON_BAD_ANNOTATION)
    raw = {split: parse_split(path, split, ds.ROOT_DIR, bad) if split != "train" or need_train else []
           for split, path in (("train", train_path), ("query", query_path), ("gallery", gallery_path))}

    gallery_pids = {pid for pid, _, _ in raw["gallery"]}
    query_count = Counter(pid for pid, _, _ in raw["query"])
    for pid in sorted(set(query_count) - gallery_pids):
        bad.add(query_path, "query pair_id without gallery images",
                f"query pair_id {pid} ({query_count[pid]} images) has no shop image in the gallery "
                f"{gallery_path}", count=query_count[pid])
    bad.raise_if_any()
    # Evaluation reads pid <= 0 as a distractor (its images stay individual gallery items in
    # centroid mode), which a product is not: shift the ids so that the smallest is 1.
    shift = max(0, 1 - min(gallery_pids, default=1))
    if shift:
        log.info("%s: query/gallery pair ids shifted by +%d so that none is <= 0 (evaluation reads pid <= 0 "
                 "as a distractor).", name, shift)
    query = [ImageRecord(p, pid + shift, 0) for pid, p, _ in raw["query"] if pid in gallery_pids]
    gallery = [ImageRecord(p, pid + shift, 1) for pid, p, _ in raw["gallery"]]

    train_count = Counter(pid for pid, _, _ in raw["train"])
    singles = sorted(pid for pid, n in train_count.items() if n < 2)
    if singles:
        log.info("%s: dropped %d train pair ids with a single image.", name, len(singles))
    mapping = {pid: label for label, pid in enumerate(sorted(pid for pid, n in train_count.items() if n > 1))}
    train = [ImageRecord(p, mapping[pid], SOURCE_CAMID[source]) for pid, p, source in raw["train"] if pid in mapping]

    for split, records, path in (("train", train, train_path), ("query", query, query_path),
                                 ("gallery", gallery, gallery_path)):
        if not records and (split != "train" or need_train):
            extra = " with two or more images" if split == "train" else ""
            raise DatasetError(f"{name}: no usable {split} image{extra} in {path}.")
    bad.log_summary(name)
    return ReIDSplits(name=name, train=_sorted(train), query=_sorted(query), gallery=_sorted(gallery)), bad.counts


def build_coco_reid(cfg, name: str) -> ReIDSplits:
    return load_coco_reid(cfg, name)[0]
