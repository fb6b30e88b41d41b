"""Embed query images and find their nearest neighbours in a gallery made by create_embeddings.py.

    python inference/get_similar.py --config_file=configs/256_resnet50.yml \
        MODEL.PRETRAIN_PATH logs/market1501/checkpoints/last.ckpt \
        DATASETS.ROOT_DIR data/query OUTPUT_DIR outputs/query \
        --gallery_data outputs/gallery [--topk 10] [--normalize_features] [--index exact|ivf|hnsw] [--html]

Distances follow SOLVER.DISTANCE_FUNC (from the checkpoint unless set): "euclidean" is the squared
Euclidean distance, "cosine" is 1 - cos. ``--index exact`` (default) ranks exactly as evaluation does
(ties by lower gallery index); ``ivf`` / ``hnsw`` are approximate FAISS indexes for large galleries,
saved beside the gallery (``index_<kind>.faiss`` + ``.json``) and reused while the gallery checksum
and the build parameters match.

Writes to OUTPUT_DIR: ``results.json`` (per query: path, top-k gallery paths or identities with
distances), ``results.npz`` (``indices`` (Q, k) int64, -1 = none; ``distances`` (Q, k) float32;
``query_paths`` fixed-width unicode), ``query_embeddings.npy``, and with ``--html`` ``index.html``.
Nothing is pickled. Exit code 2 with a message for bad input.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from config import build_arg_parser  # noqa: E402
from inference.common import (Embedder, InferenceError, list_images, parse_tool_args,  # noqa: E402
                              require_output_dir, run_cli, save_json, save_npy, save_npz, sha256_of, warn_skipped)
from inference.html_report import Match, QueryRow, write_report  # noqa: E402
from utils.eval_reid import pairwise_distance  # noqa: E402
from utils.io import atomic_write_bytes  # noqa: E402

log = logging.getLogger("centroids_reid.inference")

RESULT_FILES = ("results.json", "results.npz", "query_embeddings.npy", "index.html")


# ============================================================================ gallery

@dataclass
class Gallery:
    folder: str
    embeddings: np.ndarray  # (G, D) float32
    labels: list[str]  # image paths, or identities for a centroid gallery
    kind: str  # "images" or "centroids"
    members: dict[str, list[str]]  # identity -> image paths (centroid galleries; may be empty)

    @property
    def embeddings_path(self) -> str:
        return os.path.join(self.folder, "embeddings.npy")


def load_gallery(folder: str) -> Gallery:
    """Read and check a folder written by create_embeddings.py; every problem names the file."""
    if not folder:
        raise InferenceError("--gallery_data is required: the OUTPUT_DIR of create_embeddings.py.")
    emb_path, paths_path = os.path.join(folder, "embeddings.npy"), os.path.join(folder, "paths.txt")
    for path in (emb_path, paths_path):
        if not os.path.isfile(path):
            raise InferenceError(f"Gallery file not found: {path} (--gallery_data must be the OUTPUT_DIR of "
                                 "create_embeddings.py).")
    try:
        embeddings = np.load(emb_path, allow_pickle=False)
    except ValueError as err:
        raise InferenceError(f"Cannot read gallery {emb_path}: {err}") from err
    if embeddings.ndim != 2 or embeddings.dtype.kind != "f":
        raise InferenceError(f"Gallery {emb_path} holds a {embeddings.dtype} array of shape {embeddings.shape}; "
                             "expected float (N, D).")
    with open(paths_path, encoding="utf-8", newline="") as handle:
        labels = handle.read().split("\n")  # not splitlines(): a file name may hold \x85 or \u2028
    if labels and labels[-1] == "":
        labels.pop()
    if len(labels) != len(embeddings):
        raise InferenceError(f"Gallery {paths_path} lists {len(labels)} entries but {emb_path} has "
                             f"{len(embeddings)} rows; re-run create_embeddings.py.")
    if len(labels) == 0:
        raise InferenceError(f"Gallery {emb_path} is empty.")
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    bad = int((~np.isfinite(embeddings).all(axis=1)).sum())
    if bad:
        raise InferenceError(f"Gallery {emb_path} has {bad} rows with NaN or inf values.")
    meta, members = {}, {}
    meta_path, members_path = os.path.join(folder, "meta.json"), os.path.join(folder, "members.json")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
    if os.path.isfile(members_path):
        with open(members_path, encoding="utf-8") as handle:
            members = json.load(handle)
    return Gallery(folder, embeddings, labels, meta.get("kind", "images"), members)


# ============================================================================ search

@dataclass(frozen=True)
class IndexParams:
    """FAISS index parameters; defaults tuned on 200k x 2048 (benchmarks/INFERENCE_RESULTS.md): hnsw meets
    recall@10 >= 0.95 at >= 10x the exact search's speed there, ivf reaches the recall at about 5x."""
    nlist: int = 0  # ivf: inverted lists; 0 = auto (about 2 * sqrt(N), at least 39 vectors per list)
    nprobe: int = 32  # ivf: lists scanned per query
    train_size: int = 0  # ivf: vectors sampled for k-means; 0 = min(N, 40 * nlist)
    train_iterations: int = 10  # ivf: k-means iterations
    hnsw_m: int = 32  # hnsw: links per node
    ef_construction: int = 40  # hnsw: candidate list size while building
    ef_search: int = 32  # hnsw: candidate list size while searching (raised to k if smaller)
    seed: int = 0  # ivf: training sample and k-means seed

    def resolved_nlist(self, n: int) -> int:
        if self.nlist > 0:
            return min(self.nlist, n)
        return max(1, min(int(round(2 * math.sqrt(n))), n // 39))

    def build_key(self, kind: str, n: int) -> dict:
        """What shapes a built index (search-time settings excluded)."""
        if kind == "ivf":
            nlist = self.resolved_nlist(n)
            return {"nlist": nlist, "train_size": min(n, self.train_size or 40 * nlist),
                    "train_iterations": self.train_iterations, "seed": self.seed}
        return {"hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction}

    def describe(self, kind: str, n: int) -> dict:
        """Every setting in effect for a search of ``kind`` over ``n`` vectors."""
        if kind == "exact":
            return {}
        search = {"nprobe": self.nprobe} if kind == "ivf" else {"ef_search": self.ef_search}
        return {**self.build_key(kind, n), **search}


def prepare(vectors: np.ndarray, metric: str, normalize: bool) -> np.ndarray:
    """float32 C-contiguous copy, L2-normalised for the cosine metric or when asked."""
    out = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if metric == "cosine" or normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def stable_topk(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row of ``dist`` (C, N), ordered by distance then column (as a
    stable argsort would rank them). Returns (distances (C, k), columns (C, k) int64)."""
    if k >= dist.shape[1]:
        return torch.sort(dist, dim=1, stable=True)
    values, cols = torch.topk(dist, k, dim=1, largest=False, sorted=False)
    by_col = torch.argsort(cols, dim=1)
    values, cols = values.gather(1, by_col), cols.gather(1, by_col)
    by_value = torch.sort(values, dim=1, stable=True).indices
    values, cols = values.gather(1, by_value), cols.gather(1, by_value)
    # A tie at the k-th distance may have let topk keep a later column than the ranking would.
    kth = values[:, -1:]
    unsure = ((dist == kth).sum(1) != (values == kth).sum(1)).nonzero().flatten()
    for row in unsure.tolist():
        row_values, row_cols = torch.sort(dist[row], stable=True)
        values[row], cols[row] = row_values[:k], row_cols[:k]
    return values, cols


def exact_topk(query: np.ndarray, gallery: np.ndarray, k: int, metric: str, *,
               device: torch.device | str = "cpu", rows_per_chunk: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with ``utils.eval_reid.pairwise_distance`` in query chunks.

    query (Q, D), gallery (G, D) float32 (already prepared). Returns (indices (Q, k) int64,
    distances (Q, k) float32), k = min(k, G).
    """
    k = min(k, len(gallery))
    g = torch.from_numpy(gallery).to(device)
    rows = rows_per_chunk or max(1, (1 << 26) // max(1, len(gallery)))  # ~256 MB of distances per chunk
    out_idx, out_dist = [np.zeros((0, k), np.int64)], [np.zeros((0, k), np.float32)]
    for start in range(0, len(query), rows):
        q = torch.from_numpy(query[start:start + rows]).to(device)
        values, cols = stable_topk(pairwise_distance(q, g, metric), k)
        out_idx.append(cols.cpu().numpy())
        out_dist.append(values.float().cpu().numpy())
    return np.concatenate(out_idx), np.concatenate(out_dist)


def build_index(gallery: np.ndarray, kind: str, metric: str, params: IndexParams):
    """A FAISS IVF-Flat or HNSW-Flat index over ``gallery`` (prepared: normalised for cosine)."""
    import faiss

    n, dim = gallery.shape
    space = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, space)
        index.hnsw.efConstruction = params.ef_construction
        index.add(gallery)
        return index
    key = params.build_key("ivf", n)
    quantizer = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, key["nlist"], space)
    index.cp.seed, index.cp.niter = params.seed, key["train_iterations"]
    sample = np.random.default_rng(params.seed).choice(n, size=key["train_size"], replace=False)
    index.train(gallery[np.sort(sample)])
    index.add(gallery)
    return index


def search_index(index, query: np.ndarray, k: int, kind: str, metric: str, params: IndexParams
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(indices (Q, k) int64, -1 where none; distances (Q, k) float32, inf where none)."""
    if kind == "ivf":
        index.nprobe = params.nprobe
    else:
        index.hnsw.efSearch = max(params.ef_search, k)
    scores, indices = index.search(query, k)
    distances = (1.0 - scores) if metric == "cosine" else scores
    distances = np.where(indices >= 0, distances, np.inf).astype(np.float32)
    return indices.astype(np.int64), distances


def load_or_build_index(gallery: Gallery, vectors: np.ndarray, kind: str, metric: str, normalize: bool,
                        params: IndexParams):
    """The index saved beside the gallery if its parameters and gallery checksum match, else a new one
    (saved atomically; a read-only gallery folder only costs the rebuild next time)."""
    import faiss

    key = {"kind": kind, "metric": metric, "normalized": bool(normalize or metric == "cosine"),
           "count": len(vectors), "dim": int(vectors.shape[1]), "gallery_sha256": sha256_of(gallery.embeddings_path),
           "params": params.build_key(kind, len(vectors)), "faiss": faiss.__version__}
    index_path = os.path.join(gallery.folder, f"index_{kind}.faiss")
    key_path = os.path.join(gallery.folder, f"index_{kind}.json")
    if os.path.isfile(index_path) and os.path.isfile(key_path):
        with open(key_path, encoding="utf-8") as handle:
            saved = json.load(handle)
        if saved.get("key") == key:
            log.info("Reusing index %s", index_path)
            return faiss.deserialize_index(np.fromfile(index_path, dtype=np.uint8))
        log.info("Index %s was built with other parameters or another gallery: rebuilding.", index_path)
    start = time.perf_counter()
    index = build_index(vectors, kind, metric, params)
    seconds = time.perf_counter() - start
    log.info("Built a %s index of %d vectors in %.1f s", kind, len(vectors), seconds)
    try:
        atomic_write_bytes(index_path, faiss.serialize_index(index).tobytes())
        save_json(key_path, {"key": key, "build_seconds": round(seconds, 3)})
    except OSError as err:
        log.warning("Could not save the index beside the gallery (%s); it will be rebuilt next time.", err)
    return index


def search(query: np.ndarray, gallery: Gallery, k: int, metric: str, *, normalize: bool = False,
           kind: str = "exact", params: IndexParams = IndexParams(), device: torch.device | str = "cpu"
           ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows for each query row: (indices (Q, k), distances (Q, k)), k = min(k, G)."""
    k = min(k, len(gallery.embeddings))
    gallery_vectors = prepare(gallery.embeddings, metric, normalize)
    query_vectors = prepare(query, metric, normalize)
    if kind == "exact":
        return exact_topk(query_vectors, gallery_vectors, k, metric, device=device)
    index = load_or_build_index(gallery, gallery_vectors, kind, metric, normalize, params)
    return search_index(index, query_vectors, k, kind, metric, params)


# ============================================================================ command line

def build_parser():
    defaults = IndexParams()
    parser = build_arg_parser("Find the nearest gallery images (or identities) of query images.")
    parser.add_argument("--gallery_data", "--gallery-data", default="",
                        help="folder written by create_embeddings.py (embeddings.npy, paths.txt)")
    parser.add_argument("--topk", type=int, default=10, help="results per query; 0 = the whole gallery")
    parser.add_argument("--normalize_features", "--normalize-features", action="store_true",
                        help="L2-normalise query and gallery embeddings before the distance")
    parser.add_argument("--index", choices=("exact", "ivf", "hnsw"), default="exact",
                        help="exact search, or an approximate FAISS index (IVF-Flat, HNSW) for large galleries")
    parser.add_argument("--nlist", type=int, default=defaults.nlist, help="ivf: inverted lists (0 = auto)")
    parser.add_argument("--nprobe", type=int, default=defaults.nprobe, help="ivf: lists scanned per query")
    parser.add_argument("--hnsw_m", "--hnsw-m", type=int, default=defaults.hnsw_m, help="hnsw: links per node")
    parser.add_argument("--ef_construction", "--ef-construction", type=int, default=defaults.ef_construction,
                        help="hnsw: build-time candidate list")
    parser.add_argument("--ef_search", "--ef-search", type=int, default=defaults.ef_search,
                        help="hnsw: search-time candidate list")
    parser.add_argument("--html", action="store_true", help="also write OUTPUT_DIR/index.html")
    parser.add_argument("--html_thumbs", "--html-thumbs", action="store_true",
                        help="the HTML page shows thumbnail copies (OUTPUT_DIR/thumbs) instead of the originals")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def get_similar(argv: Sequence[str] | None) -> None:
    args = parse_tool_args(build_parser(), argv)
    if args.topk < 0:
        raise InferenceError(f"--topk must be >= 0 (0 = the whole gallery), got {args.topk}.")
    gallery = load_gallery(args.gallery_data)
    embedder = Embedder("", args.opts, config_file=args.config_file)
    cfg = embedder.cfg
    if gallery.embeddings.shape[1] != embedder.feat_dim:
        raise InferenceError(
            f"Gallery {gallery.embeddings_path} holds {gallery.embeddings.shape[1]}-d embeddings but "
            f"{embedder.checkpoint_path} ({cfg.MODEL.NAME}) makes {embedder.feat_dim}-d ones; embed the gallery "
            "with the same checkpoint.")
    out_dir = require_output_dir(cfg)
    images = list_images(cfg.DATASETS.ROOT_DIR)
    features, kept, failed = embedder.embed_files(images.paths, progress=not args.no_progress)
    skipped = images.skipped + failed
    warn_skipped(skipped)
    query_paths = [images.paths[i] for i in kept]
    if not query_paths:
        raise InferenceError(f"None of the {len(images.paths)} query images in {cfg.DATASETS.ROOT_DIR} "
                             "could be read.")

    metric = cfg.SOLVER.DISTANCE_FUNC
    kind = args.index
    if kind != "exact" and args.topk == 0:
        log.warning("--topk 0 ranks the whole gallery: using exact search instead of --index %s.", kind)
        kind = "exact"
    params = IndexParams(nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                         ef_construction=args.ef_construction, ef_search=args.ef_search)
    k = args.topk or len(gallery.labels)
    start = time.perf_counter()
    indices, distances = search(features, gallery, k, metric, normalize=args.normalize_features, kind=kind,
                                params=params, device=embedder.device)
    log.info("Searched %d queries in a gallery of %d (%s, %s) in %.2f s", len(query_paths), len(gallery.labels),
             kind, metric, time.perf_counter() - start)

    label_key = "identity" if gallery.kind == "centroids" else "path"
    results = {
        "gallery": os.path.abspath(gallery.folder), "gallery_kind": gallery.kind, "metric": metric,
        "normalized": bool(args.normalize_features), "index": kind,
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
