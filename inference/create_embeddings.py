"""Embed a folder, an image or a list of images with a trained checkpoint (a gallery for get_similar).

    python inference/create_embeddings.py --config_file=configs/256_resnet50.yml \
        MODEL.PRETRAIN_PATH logs/market1501/256_resnet50/run_0/checkpoints/best.ckpt \
        DATASETS.ROOT_DIR data/gallery OUTPUT_DIR outputs/gallery [--images-in-subfolders MODEL.USE_CENTROIDS True]

Writes to OUTPUT_DIR (each file atomically; ``embeddings.npy`` last, so it never pairs with stale files):
- ``embeddings.npy``: float32 (N, D) embeddings (post-BN unless TEST.NECK_FEAT is before), not normalised;
- ``paths.txt``: the N image paths (absolute), or with centroids the N identities, one per line;
- ``members.json`` (centroids only): identity -> its image paths;
- ``meta.json``: checkpoint, config, D, normalised (always false), kind, skipped files and why.
Files under OUTPUT_DIR (when it lies inside DATASETS.ROOT_DIR) are never embedded, nor the thumbnails
in OUTPUT_DIR/thumbs: a re-run does not pick up the outputs of the last one.
Exit code 2 with a message for bad input (missing folder, no images, not a checkpoint).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import build_arg_parser, cfg_to_dict  # noqa: E402
from inference.common import (Embedder, InferenceError, centroids, identity_of, list_images,  # noqa: E402
                              npy_bytes, parse_tool_args, require_output_dir, run_cli, save_json,
                              save_lines, warn_skipped)
from utils.io import atomic_write_bytes  # noqa: E402

log = logging.getLogger("centroids_reid.inference")

OUTPUT_FILES = ("embeddings.npy", "paths.txt", "meta.json", "members.json")


def build_parser():
    parser = build_arg_parser("Embed images with a checkpoint of this project (the features evaluation uses).")
    parser.add_argument("--images-in-subfolders", action="store_true",
                        help="each image's identity is its parent folder (relative to DATASETS.ROOT_DIR); "
                             "with MODEL.USE_CENTROIDS True, write one mean embedding per identity")
    parser.add_argument("--identity-from", choices=("parent", "top"),
                        help="implies --images-in-subfolders: 'parent' (its default) names an identity by the image's "
                             "own folder; 'top' by the folder directly under DATASETS.ROOT_DIR holding it at any "
                             "depth, as DATASETS.NAMES image_folder and torchvision's ImageFolder do")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def create_embeddings(argv: Sequence[str] | None) -> None:
    args = parse_tool_args(build_parser(), argv)
    embedder = Embedder("", args.opts, config_file=args.config_file)
    cfg = embedder.cfg
    out_dir = require_output_dir(cfg)
    images = list_images(cfg.DATASETS.ROOT_DIR, output_dir=out_dir)  # never this tool's own outputs
    skipped = list(images.skipped)
    identities: dict[str, str] = {}
    subfolders = args.images_in_subfolders or args.identity_from is not None
    if subfolders:
        for path in images.paths:
            identity = identity_of(path, images.base, top=args.identity_from == "top")
            if identity is None:
                skipped.append((path, "not inside an identity subfolder"))
            else:
                identities[path] = identity
        images.paths = [p for p in images.paths if p in identities]
    elif cfg.MODEL.USE_CENTROIDS:
        raise InferenceError("MODEL.USE_CENTROIDS True needs --images-in-subfolders or --identity-from (identities "
                             "are the images' folders).")
    log.info("Embedding %d images from %s with %s on %s", len(images.paths), cfg.DATASETS.ROOT_DIR,
             embedder.checkpoint_path, embedder.device)
    features, kept, failed = embedder.embed_files(images.paths, progress=not args.no_progress)
    skipped += failed
    warn_skipped(skipped)
    paths = [images.paths[i] for i in kept]
    if not paths:
        raise InferenceError(f"None of the {len(images.paths)} images in {cfg.DATASETS.ROOT_DIR} could be read.")

    kind, labels, members = "images", paths, None
    if cfg.MODEL.USE_CENTROIDS:
        kind = "centroids"
        labels, features = centroids(features, [identities[p] for p in paths])
        members = {name: [] for name in labels}
        for path in paths:
            members[identities[path]].append(path)

    data = npy_bytes(features.astype("float32", copy=False))
    meta = {
        "kind": kind, "count": len(labels), "dim": int(features.shape[1]), "normalized": False,
        "images_embedded": len(paths), "checkpoint": os.path.abspath(embedder.checkpoint_path),
        "source": os.path.abspath(cfg.DATASETS.ROOT_DIR), "images_in_subfolders": subfolders,
        "identity_from": (args.identity_from or "parent") if subfolders else None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "skipped": {"count": len(skipped), "files": [{"path": p, "reason": r} for p, r in skipped]},
        "config": cfg_to_dict(cfg),
    }
    write_outputs(out_dir, data, labels, meta, members)
    log.info("Wrote %d x %d embeddings (%s) to %s; %d files skipped.", len(labels), features.shape[1], kind,
             out_dir, len(skipped))


def write_outputs(out_dir: str, embeddings_npy: bytes, labels: Sequence[str], meta: dict,
                  members: dict | None) -> None:
    """Stale outputs go first and ``embeddings.npy`` comes last: a crash midway leaves no
    ``embeddings.npy``, never one that pairs with another run's paths."""
    if os.path.isfile(os.path.join(out_dir, "embeddings.npy")):
        try:
            with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as handle:
                old = json.load(handle)
            what = (f"{old.get('count', '?')} {old.get('kind', 'images')} of {old.get('source', '?')}, "
                    f"created {old.get('created', '?')}")
        except (OSError, ValueError, AttributeError):
            what = "no readable meta.json"
        log.info("Replacing the gallery in %s (%s).", out_dir, what)
    for name in OUTPUT_FILES:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)
    save_lines(os.path.join(out_dir, "paths.txt"), labels)
    if members is not None:
        save_json(os.path.join(out_dir, "members.json"), members)
    save_json(os.path.join(out_dir, "meta.json"), meta)
    atomic_write_bytes(os.path.join(out_dir, "embeddings.npy"), embeddings_npy)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(create_embeddings, argv)


if __name__ == "__main__":
    sys.exit(main())
