"""Records and the parser shared by every folder-layout (Market-1501 style) dataset.

A dataset is three lists of :class:`ImageRecord` (train, query, gallery). Parsers build them in a
sorted, deterministic order; nothing downstream ever mutates them.
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# "<pid>_c<camera>..." as in Market-1501 / DukeMTMC-reID; pid may be -1 (junk) or 0 (distractor).
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
# Identities and cameras become int64 tensors at evaluation; larger numbers in a file name used to
# parse and then crash there ("Overflow when unpacking long long").
MAX_NAME_NUMBER = 2**31 - 1


_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Modes whose PNG tRNS chunk names one transparent colour (PIL: info["transparency"], an int or an RGB tuple).
_COLOUR_KEY_MODES = ("L", "RGB") + _WIDE_GREY_MODES


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of any PIL image: how every reader in the project sees an image.

    - 16-bit grey images (16-bit PNGs open as "I;16", some as "I") are scaled to 8 bits
      (value / 257); PIL's own conversion clips every value above 255 to white.
    - Transparent pixels (RGBA, LA, palettes with a transparent colour, and RGB, L or 16-bit
      grey PNGs whose tRNS chunk names a transparent colour) are composited onto white, the
      background of product photos; PIL's conversion drops alpha and shows the colour the
      transparent pixels happen to hold (often black).
    - EXIF orientation is not applied: pixels are used as stored, as PIL, torchvision and
      the peer frameworks read them, and as annotation boxes refer to them.
    """
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    keyed = _colour_key_mask(image)
    if keyed is not None:  # a colour key is all-or-nothing alpha: compositing onto white = painting white
        rgb = np.array(_opaque_to_rgb(image))
        rgb[keyed] = 255
        return Image.fromarray(rgb, "RGB")
    return _opaque_to_rgb(image)


def _opaque_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_GREY_MODES:
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def _colour_key_mask(image: Image.Image) -> np.ndarray | None:
    """(H, W) bool, True where a pixel equals the image's colour key; None without one.

    Compared on the stored values (16-bit grey before scaling), as the PNG tRNS chunk defines it.
    """
    key = image.info.get("transparency") if image.mode in _COLOUR_KEY_MODES else None
    if key is None:
        return None
    key = np.asarray(key).reshape(-1)
    pixels = np.asarray(image).reshape(image.height, image.width, -1)
    if key.size != pixels.shape[-1]:  # not a key PIL would give this mode: treat the image as opaque
        return None
    return np.all(pixels == key, axis=-1)


class DatasetError(ValueError):
    """Bad dataset input; the message names the file, folder or id."""


class ImageRecord(NamedTuple):
    path: str
    pid: int  # identity (train split: relabelled 0..N-1)
    camid: int  # 0-based camera index


@dataclass(frozen=True)
class ReIDSplits:
    name: str
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    def summary(self) -> str:
        def row(split: str, recs: Sequence[ImageRecord]) -> str:
            return (f"  {split:<8}| {len({r.pid for r in recs}):>6} ids | {len(recs):>7} images | "
                    f"{len({r.camid for r in recs}):>4} cameras")
        return "\n".join([f"Dataset {self.name}:", row("train", self.train), row("query", self.query),
                          row("gallery", self.gallery)])


def is_image_name(name: str) -> bool:
    """Whether a file name is one the dataset loaders read: an image extension, not a hidden file."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: str) -> list[str]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if is_image_name(f))


def other_image_format(name: str) -> str | None:
    """The extension of a file name in an image format that PIL knows but the loaders do not read
    (e.g. ``.tif``), else None."""
    extension = os.path.splitext(name)[1].lower()
    return extension if extension in Image.registered_extensions() and extension not in IMAGE_EXTENSIONS else None


def unread_entries(folder: str) -> tuple[Counter, int]:
    """What :func:`list_images` passes over in ``folder`` that a user may have meant as data: the
    files of other image formats PIL knows (extension -> count, e.g. ``.tif``) and the subfolders."""
    other_formats: Counter = Counter()
    subfolders = 0
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            subfolders += 1
        elif extension := other_image_format(entry.name):
            other_formats[extension] += 1
    return other_formats, subfolders


def warn_other_formats(other_formats: Counter, split: str, folder: str) -> None:
    """One warning per split for image files left out for their format: they would otherwise vanish
    from the split without a word."""
    if other_formats:
        log.warning("Left %d image file(s) out of the %s split (%s): %s not among the formats read (%s); "
                    "convert them (e.g. python -m datasets.convert_to_jpg).", sum(other_formats.values()), split,
                    folder, ", ".join(f"{ext} ({n})" for ext, n in sorted(other_formats.items())),
                    ", ".join(IMAGE_EXTENSIONS))


def parse_market_name(path: str, *, max_camera: int | None = None) -> tuple[int, int]:
    """``(pid, camid)`` from a Market-style file name; camid is 0-based."""
    name = os.path.basename(path)
    match = _MARKET_NAME.match(name)
    if match is None:
        raise DatasetError(f"Cannot parse identity and camera from file name {path!r}: "
                           "expected '<pid>_c<camera>...' such as '0002_c1s1_000451_03.jpg'.")
    pid, camera = int(match.group(1)), int(match.group(2))
    highest_camera = max_camera or MAX_NAME_NUMBER
    if not 1 <= camera <= highest_camera:
        raise DatasetError(f"Camera number {camera} in {path!r} is out of range (1..{highest_camera}).")
    if not -1 <= pid <= MAX_NAME_NUMBER:
        raise DatasetError(f"Identity {pid} in {path!r} is out of range (allowed: -1 junk, 0 distractor, "
                           f"1..{MAX_NAME_NUMBER} identities); renumber the identities of this dataset.")
    return pid, camera - 1


def parse_folder(folder: str, *, split: str, max_camera: int | None, drop_junk: bool = True,
                 relabel: bool = False, allow_distractors: bool = True) -> list[ImageRecord]:
    """Records of one split folder.

    Junk images (pid -1) are dropped when ``drop_junk``; distractors (pid 0) are kept only where
    ``allow_distractors`` (the gallery), and left out elsewhere with one warning per split.
    ``relabel`` maps the pids, sorted, to 0..N-1 (train).
    """
    if not os.path.isdir(folder):
        raise DatasetError(f"Missing {split} folder: {folder}")
    records = []
    distractors_left_out = 0
    for path in list_images(folder):
        pid, camid = parse_market_name(path, max_camera=max_camera)
        if pid == -1 and drop_junk:
            continue
        if pid == 0 and not allow_distractors:
            distractors_left_out += 1
            continue
        records.append(ImageRecord(path, pid, camid))
    if distractors_left_out:
        # Custom data numbered from 0 would otherwise lose a whole identity without a word.
        log.warning("Left %d image(s) of pid 0 out of the %s split (%s): pid 0 marks distractors in the "
                    "Market-1501 naming and is used in the gallery only; number identities from 1.",
                    distractors_left_out, split, folder)
    other_formats, subfolders = unread_entries(folder)
    warn_other_formats(other_formats, split, folder)
    if not records:
        inside = (f"; its {subfolders} subfolder(s) are not searched: put the images directly in it, or, for "
                  "images in one folder per identity, use DATASETS.NAMES image_folder" if subfolders else "")
        raise DatasetError(f"No usable images in {split} folder {folder} "
                           f"(looked for {', '.join(IMAGE_EXTENSIONS)} named '<pid>_c<camera>...'){inside}.")
    return relabel_pids(records) if relabel else records


def relabel_pids(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """``records`` with their pids mapped, in sorted order, to 0..N-1: the classes of a train split."""
    mapping = {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}
    return [r._replace(pid=mapping[r.pid]) for r in records]


def parse_market_layout(root: str, name: str, *, max_camera: int | None,
                        folders: tuple[str, str, str] = ("bounding_box_train", "query", "bounding_box_test"),
                        need_train: bool = True) -> ReIDSplits:
    """Train/query/gallery records of a Market-1501-style folder. Without ``need_train`` (an
    evaluation-only run, or the test set of a cross-domain training) the train folder is not read,
    and need not exist: the train split is empty."""
    if not os.path.isdir(root):
        raise DatasetError(f"Dataset root of {name} not found: {root}{_level_hint(root, folders)}")
    train_dir, query_dir, gallery_dir = (os.path.join(root, f) for f in folders)
    if not any(os.path.isdir(os.path.join(root, f)) for f in folders):
        raise DatasetError(f"Dataset root of {name} {root} holds none of the folders {', '.join(folders)}"
                           f"{_level_hint(root, folders) or '.'}")
    train: list[ImageRecord] = []
    if need_train:
        train = parse_folder(train_dir, split="train", max_camera=max_camera, relabel=True, allow_distractors=False)
    return ReIDSplits(
        name=name,
        train=train,
        query=parse_folder(query_dir, split="query", max_camera=max_camera, allow_distractors=False),
        gallery=parse_folder(gallery_dir, split="gallery", max_camera=max_camera),
    )


def _level_hint(root: str, folders: Sequence[str]) -> str:
    """Where split folders are near ``root`` (its parent, its subfolders, or, when it does not exist, its
    siblings such as an unzipped ``Market-1501-v15.09.15``), for a DATASETS.ROOT_DIR at the wrong level."""
    parent = os.path.dirname(os.path.normpath(root)) or "."
    below = root if os.path.isdir(root) else parent
    candidates = [parent]
    if os.path.isdir(below):
        candidates += sorted(entry.path for entry in os.scandir(below) if entry.is_dir())
    found = [c for c in candidates if os.path.abspath(c) != os.path.abspath(root)
             and any(os.path.isdir(os.path.join(c, f)) for f in folders)]
    if not found:
        return ""
    return (f". Split folders were found in {found[0]}: check DATASETS.ROOT_DIR and DATASETS.NAMES (market1501 "
            "and dukemtmcreid read ROOT_DIR/market1501 and ROOT_DIR/DukeMTMC-reID, reid_folder reads ROOT_DIR itself).")


def _check_image(path: str) -> str | None:
    """None if ``path`` decodes completely, else a line naming the file and the error.

    ``verify()`` alone reads only the header, so a JPEG cut off mid-scan passed it and stopped
    the run at its first evaluation; decoding finds that. JPEGs decode at 1/8 scale (draft
    mode): every byte of the scan is still read, at about the cost of ``verify()``.
    """
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        return None
    except Exception as err:  # PIL raises many kinds; every one means "cannot use this file"
        return f"{path}: {type(err).__name__}: {err}"


def verify_images(records: Sequence[ImageRecord], *, workers: int = 8) -> None:
    """Raise DatasetError listing every image that PIL cannot decode."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [p for p in pool.map(_check_image, [r.path for r in records]) if p]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DatasetError(f"{len(problems)} unreadable image(s):\n  {shown}{more}")
