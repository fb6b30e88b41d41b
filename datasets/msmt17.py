"""MSMT17 (Wei et al., CVPR 2018): ``ROOT_DIR/MSMT17_V1`` (or ``MSMT17_V2``) as released.

    MSMT17_V1/{train,test}/<pid>/<images>        (V2: mask_train_v2/, mask_test_v2/)
    MSMT17_V1/list_{train,val,query,gallery}.txt  lines "<pid>/<file> <pid>"

Expected: 32,621 train images (list_train + list_val, the paper's training set) of 1,041 identities,
11,659 query and 82,161 gallery images of 3,060 identities, cameras 1..15. File names hold the camera
as their third field (``0000_000_01_0303morning_0015_0.jpg``: camera 01). The lists number
identities from 0; query and gallery identities are stored from 1, because pid 0 is this project's
distractor label. There are no junk or distractor images.
"""
from __future__ import annotations

import os

from .bases import DatasetError, ImageRecord, ReIDSplits, relabel_pids

VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
MAX_CAMERA = 15


def parse_list(list_path: str, image_dir: str) -> list[ImageRecord]:
    """The records of one list file: ``<relative path> <pid>`` per line, the camera from the file name."""
    if not os.path.isfile(list_path):
        raise DatasetError(f"MSMT17 list file not found: {list_path}")
    records = []
    with open(list_path, encoding="utf-8-sig") as handle:  # -sig: a byte-order mark is not part of the first path
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                relative, pid = fields[0], int(fields[1])
                camera = int(os.path.basename(relative).split("_")[2])
            except (IndexError, ValueError):
                raise DatasetError(f"{list_path}, line {number}: cannot read {line.strip()!r}; expected "
                                   "'<pid>/<pid>_<n>_<camera>_....jpg <pid>'.") from None
            if pid < 0 or not 1 <= camera <= MAX_CAMERA:
                raise DatasetError(f"{list_path}, line {number}: identity {pid} or camera {camera} out of range "
                                   f"(identities from 0, cameras 1..{MAX_CAMERA}).")
            records.append(ImageRecord(os.path.join(image_dir, relative), pid, camera - 1))
    if not records:
        raise DatasetError(f"MSMT17 list file {list_path} lists no images.")
    return records


def build_msmt17(cfg) -> ReIDSplits:
    found = [version for version in VERSIONS if os.path.isdir(os.path.join(cfg.DATASETS.ROOT_DIR, version))]
    if not found:
        raise DatasetError(f"MSMT17 not found: neither {' nor '.join(os.path.join(cfg.DATASETS.ROOT_DIR, v) for v in VERSIONS)} "
                           "exists (DATASETS.ROOT_DIR must hold the unpacked MSMT17_V1 or MSMT17_V2 folder).")
    root = os.path.join(cfg.DATASETS.ROOT_DIR, found[0])
    train_dir, test_dir = (os.path.join(root, folder) for folder in VERSIONS[found[0]])

    def listed(split: str, image_dir: str) -> list[ImageRecord]:
        return parse_list(os.path.join(root, f"list_{split}.txt"), image_dir)

    train = [] if cfg.TEST.ONLY_TEST else relabel_pids(listed("train", train_dir) + listed("val", train_dir))
    query, gallery = ([r._replace(pid=r.pid + 1) for r in listed(split, test_dir)] for split in ("query", "gallery"))
    return ReIDSplits(name="msmt17", train=train, query=query, gallery=gallery)
