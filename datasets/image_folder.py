"""One folder per identity: ``ROOT_DIR/{train,query,gallery}/<identity>/<images>``.

The layout of most custom and product-retrieval data: an identity is the name of a folder directly
inside the split folder (any text; its images may sit in subfolders of it), and there are no camera
ids. Query and gallery identities share one numbering (their names, sorted, from 1), so a name means
the same identity in both; the train split is numbered 0..N-1 on its own. Images directly in
``gallery/``, in no identity folder, are distractors (pid 0). Images directly in ``train/`` or
``query/`` are an error: their identity is unknown.

Without camera ids, query images get camera 0 and gallery images camera 1: the camera-aware re-ID
protocol then removes nothing from a query's ranking, and a query's own centroid holds all gallery
images of its identity, whatever ``MODEL.KEEP_CAMID_CENTROIDS`` says (train images: camera 0).
"""
import logging
import os
from collections import Counter

from .bases import (IMAGE_EXTENSIONS, DatasetError, ImageRecord, ReIDSplits, is_image_name, other_image_format,
                    warn_other_formats)

log = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train", "query", "gallery")
QUERY_CAMERA, GALLERY_CAMERA = 0, 1


def _identity_images(folder: str, other_formats: Counter) -> list[str]:
    """Image files anywhere below ``folder`` (hidden files and folders skipped), sorted by path; files of
    image formats not read are counted in ``other_formats``. A linked folder is searched once: a link
    back up the tree (a loop) would list every image again at each level, or never end."""
    found, searched = [], set()  # (device, inode) of each folder searched
    for parent, subfolders, files in os.walk(folder, followlinks=True):
        info = os.stat(parent)
        if (info.st_dev, info.st_ino) in searched:
            subfolders[:] = []
            continue
        searched.add((info.st_dev, info.st_ino))
        subfolders[:] = [s for s in subfolders if not s.startswith(".")]
        found.extend(os.path.join(parent, f) for f in files if is_image_name(f))
        other_formats.update(filter(None, (other_image_format(f) for f in files if not f.startswith("."))))
    return sorted(found)


def scan_split(folder: str, split: str) -> tuple[dict[str, list[str]], list[str]]:
    """``({identity name: image paths}, loose images)`` of one split folder, both sorted; an identity
    folder without images is left out with a warning."""
    if not os.path.isdir(folder):
        raise DatasetError(f"Missing {split} folder: {folder} (layout: {split}/<identity>/<images>)")
    identities, loose, empty, other_formats = {}, [], [], Counter()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith("."):
            continue
        if os.path.isdir(path):
            images = _identity_images(path, other_formats)
            if images:
                identities[name] = images
            else:
                empty.append(name)
        elif is_image_name(name):
            loose.append(path)
        elif extension := other_image_format(name):
            other_formats[extension] += 1
    warn_other_formats(other_formats, split, folder)
    if empty:
        shown = ", ".join(repr(n) for n in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        log.warning("%d identity folder(s) in %s hold no image (%s); left out.", len(empty), folder, shown)
    return identities, loose


def _records(identities: dict[str, list[str]], numbers: dict[str, int], camid: int) -> list[ImageRecord]:
    return [ImageRecord(path, numbers[name], camid) for name, paths in identities.items() for path in paths]


def _refuse_loose(loose: list[str], folder: str, split: str) -> None:
    if loose:
        more = f" (and {len(loose) - 1} more)" if len(loose) > 1 else ""
        raise DatasetError(f"{loose[0]}{more} lies directly in the {split} folder {folder}: put each image in "
                           f"a folder named after its identity, {split}/<identity>/<image>.")


def _require_images(records: list[ImageRecord], folder: str, split: str) -> list[ImageRecord]:
    if not records:
        raise DatasetError(f"No usable images in {split} folder {folder} (looked for {', '.join(IMAGE_EXTENSIONS)} "
                           f"in {split}/<identity>/).")
    return records


def build_image_folder(cfg) -> ReIDSplits:
    root = cfg.DATASETS.ROOT_DIR
    if not os.path.isdir(root):
        raise DatasetError(f"Dataset root of image_folder not found: {root}")
    train_dir, query_dir, gallery_dir = (os.path.join(root, split) for split in SPLIT_FOLDERS)
    train: list[ImageRecord] = []
    if not cfg.TEST.ONLY_TEST:  # an evaluation reads no train folder (cross-domain: another dataset's)
        train_ids, loose = scan_split(train_dir, "train")
        _refuse_loose(loose, train_dir, "train")
        labels = {name: label for label, name in enumerate(train_ids)}  # sorted names -> 0..N-1
        train = _require_images(_records(train_ids, labels, 0), train_dir, "train")
    query_ids, loose = scan_split(query_dir, "query")
    _refuse_loose(loose, query_dir, "query")
    gallery_ids, distractors = scan_split(gallery_dir, "gallery")
    numbers = {name: pid for pid, name in enumerate(sorted(set(query_ids) | set(gallery_ids)), start=1)}
    query = _require_images(_records(query_ids, numbers, QUERY_CAMERA), query_dir, "query")
    gallery = _records(gallery_ids, numbers, GALLERY_CAMERA) + [
        ImageRecord(path, 0, GALLERY_CAMERA) for path in distractors]
    return ReIDSplits(name="image_folder", train=train, query=query,
                      gallery=_require_images(gallery, gallery_dir, "gallery"))
