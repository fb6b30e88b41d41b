"""Re-encode every file of a folder tree as an RGB JPEG, tolerating truncated images.

Street2Shop's photos are downloads in many formats (PNG, GIF, CMYK JPEG, cut-off files); this makes
them ``<target-dir>/<same relative folder>/<stem>.jpg`` so the converter can read ``<id>.jpg``::

    python -m datasets.convert_to_jpg --source-dir /data/s2s_raw/images --target-dir /data/s2s_raw/photos

Truncated files are decoded as far as they go (the rest stays grey); files PIL cannot read at all,
and a second file of the same stem in a folder, are failures. Both counts are printed; the exit
status is 1 only when files were found and none could be converted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from PIL import Image, ImageFile

from datasets.bases import to_rgb

log = logging.getLogger(__name__)


class ConversionCounts(NamedTuple):
    converted: int
    failed: int
    failures: list[str]  # "<source path>: <reason>"


def _convert_one(source: str, target: str) -> str | None:
    try:
        with Image.open(source) as img:
            rgb = to_rgb(img)  # also flattens palette/alpha/CMYK/16-bit images
        os.makedirs(os.path.dirname(target), exist_ok=True)
        rgb.save(target, "JPEG", quality=95)
        return None
    except Exception as err:  # PIL raises many kinds for non-image or damaged data
        return f"{source}: {type(err).__name__}: {err}"


def convert_folder(source_dir: str, target_dir: str, num_threads: int = 4) -> ConversionCounts:
    """Convert every file under ``source_dir``; returns the success and failure counts."""
    if not os.path.isdir(source_dir):
        raise FileNotFoundError(f"source folder not found: {source_dir}")
    jobs, failures = [], []
    targets: set[str] = set()
    for folder, _, files in sorted(os.walk(source_dir)):
        for name in sorted(files):
            source = os.path.join(folder, name)
            relative = os.path.relpath(source, source_dir)
            target = os.path.join(target_dir, os.path.splitext(relative)[0] + ".jpg")
            if target in targets:
                failures.append(f"{source}: another file in this folder already became {target}")
                continue
            targets.add(target)
            jobs.append((source, target))
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # a PIL-wide switch: set only while this function runs
    try:
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            results = list(pool.map(lambda job: _convert_one(*job), jobs))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    failures += [r for r in results if r is not None]
    return ConversionCounts(converted=sum(r is None for r in results), failed=len(failures), failures=failures)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datasets.convert_to_jpg",
                                     description="Re-encode every file under --source-dir as an RGB JPEG "
                                                 "<target-dir>/<relative folder>/<stem>.jpg.")
    parser.add_argument("--source-dir", required=True, help="folder of images in any format PIL reads")
    parser.add_argument("--target-dir", required=True, help="where the .jpg files go (same sub-folders)")
    parser.add_argument("--num-threads", type=int, default=4, help="conversion threads (default 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        counts = convert_folder(args.source_dir, args.target_dir, args.num_threads)
    except FileNotFoundError as err:
        parser.error(str(err))
    for failure in counts.failures:
        log.warning("failed: %s", failure)
    log.info("Converted %d files, %d failed.", counts.converted, counts.failed)
    return 0 if counts.converted or not counts.failed else 1


if __name__ == "__main__":
    sys.exit(main())
