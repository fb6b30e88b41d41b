"""Embed query images and find their nearest neighbours in a gallery made by create_embeddings.py.

    python inference/get_similar.py --config_file=configs/256_resnet50.yml \
        MODEL.PRETRAIN_PATH logs/market1501/256_resnet50/run_0/checkpoints/best.ckpt \
        DATASETS.ROOT_DIR data/query OUTPUT_DIR outputs/query \
        --gallery_data outputs/gallery [--topk 10] [--normalize_features] [--index exact|ivf|hnsw] [--html] \
        [--query_expansion 5 [--qe_alpha 3]]

Distances follow SOLVER.DISTANCE_FUNC (from the checkpoint unless set): "euclidean" is the squared
Euclidean distance, "cosine" is 1 - cos. ``--index exact`` (default) ranks exactly as evaluation does
(ties by lower gallery index); ``ivf`` / ``hnsw`` are approximate FAISS indexes for large galleries,
saved beside the gallery (``index_<kind>.faiss`` + ``.json``) and reused while the gallery checksum
and the build parameters match.

Writes to OUTPUT_DIR: ``results.json`` (per query: path, top-k gallery paths or identities with
distances), ``results.npz`` (``indices`` (Q, k) int64, -1 = none; ``distances`` (Q, k) float32;
``query_paths`` fixed-width unicode), ``query_embeddings.npy``, and with ``--html`` ``index.html``
(with ``--html_thumbs`` its thumbnails in ``thumbs/``; those of earlier runs are deleted). Files under
OUTPUT_DIR are never queries. Nothing is pickled. Exit code 2 with a message for bad input.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from config import build_arg_parser  # noqa: E402
from inference.common import (Embedder, InferenceError, list_images, parse_tool_args,  # noqa: E402
                              require_output_dir, run_cli, save_json, save_npy, save_npz, warn_skipped)
from inference.html_report import Match, QueryRow, remove_stale_thumbnails, write_report  # noqa: E402
from inference.search import Gallery, IndexParams, load_gallery, search  # noqa: E402
from utils.eval_reid import query_expansion  # noqa: E402

log = logging.getLogger("centroids_reid.inference")

RESULT_FILES = ("results.json", "results.npz", "query_embeddings.npy", "index.html")


# ============================================================================ command line

def build_parser():
    defaults = IndexParams()
    parser = build_arg_parser("Find the nearest gallery images (or identities) of query images.")
    parser.add_argument("--gallery_data", "--gallery-data", default="",
                        help="folder written by create_embeddings.py (embeddings.npy, paths.txt)")
    parser.add_argument("--topk", type=int, default=10, help="results per query; 0 = the whole gallery")
    parser.add_argument("--normalize_features", "--normalize-features", action="store_true",
                        help="L2-normalise query and gallery embeddings before the distance (always done when "
                             "TEST.FEAT_NORM is True, the checkpoint's setting unless given: then search ranks "
                             "like evaluation)")
    parser.add_argument("--index", choices=("exact", "ivf", "hnsw"), default="exact",
                        help="exact search, or an approximate FAISS index (IVF-Flat, HNSW) for large galleries")
    parser.add_argument("--nlist", type=int, default=defaults.nlist, help="ivf: inverted lists (0 = auto)")
    parser.add_argument("--nprobe", type=int, default=defaults.nprobe, help="ivf: lists scanned per query")
    parser.add_argument("--hnsw_m", "--hnsw-m", type=int, default=defaults.hnsw_m, help="hnsw: links per node")
    parser.add_argument("--ef_construction", "--ef-construction", type=int, default=defaults.ef_construction,
                        help="hnsw: build-time candidate list")
    parser.add_argument("--ef_search", "--ef-search", type=int, default=defaults.ef_search,
                        help="hnsw: search-time candidate list")
    parser.add_argument("--query_expansion", "--query-expansion", type=int, default=0, metavar="K",
                        help="replace each query by the normalised weighted sum of itself and its K most similar "
                             "gallery embeddings (alpha-QE, as TEST.QUERY_EXPANSION_K) before the search; "
                             "implies --normalize_features; 0 = off")
    parser.add_argument("--qe_alpha", "--qe-alpha", type=float, default=3.0,
                        help="query expansion: a neighbour weighs max(cosine similarity, 0) ** alpha")
    parser.add_argument("--html", action="store_true", help="also write OUTPUT_DIR/index.html")
    parser.add_argument("--html_thumbs", "--html-thumbs", action="store_true",
                        help="the HTML page shows thumbnail copies (OUTPUT_DIR/thumbs) instead of the originals")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def get_similar(argv: Sequence[str] | None) -> None:
    args = parse_tool_args(build_parser(), argv)
    if args.topk < 0:
        raise InferenceError(f"--topk must be >= 0 (0 = the whole gallery), got {args.topk}.")
    if args.query_expansion < 0 or not (math.isfinite(args.qe_alpha) and args.qe_alpha >= 0):
        raise InferenceError(f"--query_expansion must be >= 0 (0 = off) and --qe_alpha a finite number >= 0, got "
                             f"{args.query_expansion} and {args.qe_alpha}.")
    for flag, value, least in (("--nlist", args.nlist, 0), ("--nprobe", args.nprobe, 1), ("--hnsw_m", args.hnsw_m, 2),
                               ("--ef_construction", args.ef_construction, 1), ("--ef_search", args.ef_search, 1)):
        if value < least:  # FAISS aborts the process (hnsw_m 0) or raises deep inside on these
            raise InferenceError(f"{flag} must be >= {least}{' (0 = auto)' if flag == '--nlist' else ''}, got {value}.")
    gallery = load_gallery(args.gallery_data)
    embedder = Embedder("", args.opts, config_file=args.config_file)
    cfg = embedder.cfg
    if gallery.embeddings.shape[1] != embedder.feat_dim:
        raise InferenceError(
            f"Gallery {gallery.embeddings_path} holds {gallery.embeddings.shape[1]}-d embeddings but "
            f"{embedder.checkpoint_path} ({cfg.MODEL.NAME}) makes {embedder.feat_dim}-d ones; embed the gallery "
            "with the same checkpoint.")
    if gallery.checkpoint and os.path.abspath(gallery.checkpoint) != os.path.abspath(embedder.checkpoint_path):
        log.warning("Gallery %s was embedded with %s, the queries are embedded with %s: distances between "
                    "embeddings of two models are meaningless unless the two files hold the same weights.",
                    gallery.folder, gallery.checkpoint, embedder.checkpoint_path)
    out_dir = require_output_dir(cfg)
    images = list_images(cfg.DATASETS.ROOT_DIR, output_dir=out_dir)  # never this tool's own outputs
    features, kept, failed = embedder.embed_files(images.paths, progress=not args.no_progress)
    skipped = images.skipped + failed
    warn_skipped(skipped)
    query_paths = [images.paths[i] for i in kept]
    if not query_paths:
        raise InferenceError(f"None of the {len(images.paths)} query images in {cfg.DATASETS.ROOT_DIR} "
                             "could be read.")

    metric = cfg.SOLVER.DISTANCE_FUNC
    normalize = bool(args.normalize_features or cfg.TEST.FEAT_NORM)  # as evaluation ranks
    kind = args.index
    if kind != "exact" and args.topk == 0:
        log.warning("--topk 0 ranks the whole gallery: using exact search instead of --index %s.", kind)
        kind = "exact"
    params = IndexParams(nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                         ef_construction=args.ef_construction, ef_search=args.ef_search)
    k = args.topk or len(gallery.labels)
    start = time.perf_counter()
    searched = features  # query_embeddings.npy keeps the embeddings themselves
    if args.query_expansion:  # its neighbours are found exactly (one pass over the gallery), then the search runs
        expanded, _ = query_expansion(features, gallery.embeddings, args.query_expansion, args.qe_alpha)
        searched, normalize = expanded.numpy(), True
        log.info("Queries expanded with their %d nearest gallery embeddings (alpha %g)", args.query_expansion,
                 args.qe_alpha)
    indices, distances = search(searched, gallery, k, metric, normalize=normalize, kind=kind,
                                params=params, device=embedder.device)
    log.info("Searched %d queries in a gallery of %d (%s, %s) in %.2f s", len(query_paths), len(gallery.labels),
             kind, metric, time.perf_counter() - start)

    label_key = "identity" if gallery.kind == "centroids" else "path"
    results = {
        "gallery": os.path.abspath(gallery.folder), "gallery_kind": gallery.kind, "metric": metric,
        "normalized": normalize, "index": kind,
        "query_expansion": {"k": args.query_expansion, "alpha": args.qe_alpha} if args.query_expansion else None,
        "index_params": params.describe(kind, len(gallery.labels)), "topk": int(indices.shape[1]),
        "checkpoint": os.path.abspath(embedder.checkpoint_path),
        "queries": [{"query": path, "results": [
            {"rank": rank, "index": int(i), label_key: gallery.labels[i], "distance": float(d)}
            for rank, (i, d) in enumerate(zip(row_idx, row_dist), 1) if i >= 0]}
            for path, row_idx, row_dist in zip(query_paths, indices, distances)],
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
    }
    for name in RESULT_FILES:  # no stale file of an earlier run stays beside this run's results
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    save_npy(os.path.join(out_dir, "query_embeddings.npy"), features)
    save_npz(os.path.join(out_dir, "results.npz"), indices=indices, distances=distances,
             query_paths=np.array(query_paths, dtype=str))
    save_json(os.path.join(out_dir, "results.json"), results)
    if args.html:  # at most TEST.VISUALIZE_MAX_NUMBER queries, TEST.VISUALIZE_TOPK matches each
        shown = min(indices.shape[1], cfg.TEST.VISUALIZE_TOPK)
        rows = [QueryRow(path, [Match(gallery.labels[i], float(d), _image_of(gallery, i))
                                for i, d in zip(row_idx[:shown], row_dist[:shown]) if i >= 0])
                for path, row_idx, row_dist in zip(query_paths, indices, distances)]
        rows = rows[:cfg.TEST.VISUALIZE_MAX_NUMBER]
        page = write_report(out_dir, rows, title="Query results", thumbnails=args.html_thumbs,
                            subtitle=f"gallery {gallery.folder} ({len(gallery.labels)} {gallery.kind}), "
                                     f"{metric} distance, {kind} search")
        log.info("Wrote %s", page)
    else:  # the page that showed them is gone (write_report prunes those its page does not show)
        remove_stale_thumbnails(out_dir)
    log.info("Wrote results for %d queries to %s", len(query_paths), out_dir)


def _image_of(gallery: Gallery, index: int) -> str | None:
    """The image shown for a gallery row: itself, or for an identity its first member image."""
    label = gallery.labels[index]
    if gallery.kind != "centroids":
        return label
    candidates = gallery.members.get(label) or []
    return next((p for p in candidates if os.path.isfile(p)), None)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(get_similar, argv)


if __name__ == "__main__":
    sys.exit(main())
