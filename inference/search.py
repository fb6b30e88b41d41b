"""Gallery search for get_similar.py: load a gallery written by create_embeddings.py, and find each
query's top-k gallery rows exactly (ranked as evaluation ranks: ties by lower gallery index) or with
a saved FAISS IVF / HNSW index for large galleries.

    gallery = load_gallery("outputs/gallery")
    indices, distances = search(query_embeddings, gallery, k=10, metric="euclidean", kind="hnsw")
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from inference.common import InferenceError, save_json
from utils.eval_reid import distance_blocks, stable_topk
from utils.io import atomic_write_bytes, sha256_of

log = logging.getLogger("centroids_reid.inference")


# ============================================================================ gallery

@dataclass
class Gallery:
    folder: str
    embeddings: np.ndarray  # (G, D) float32
    labels: list[str]  # image paths, or identities for a centroid gallery
    kind: str  # "images" or "centroids"
    members: dict[str, list[str]]  # identity -> image paths (centroid galleries; may be empty)
    checkpoint: str = ""  # the checkpoint that embedded it (meta.json), "" when unknown

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
    with open(paths_path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        labels = handle.read().split("\n")  # not splitlines(): a file name may hold \x85 or \u2028
    # An edited (Windows) copy ends lines with \r\n; no listed name holds \r (list_images skips those).
    labels = [label[:-1] if label.endswith("\r") else label for label in labels]
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
        meta = _read_json(meta_path)
    if os.path.isfile(members_path):
        members = _read_json(members_path)
    if not isinstance(meta, dict):
        raise InferenceError(f"{meta_path} holds no JSON object; re-run create_embeddings.py for this gallery.")
    return Gallery(folder, embeddings, labels, meta.get("kind", "images"), members, str(meta.get("checkpoint", "")))


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise InferenceError(f"Cannot read {path}: {err}; re-run create_embeddings.py for this gallery.") from err


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


def exact_topk(query: np.ndarray, gallery: np.ndarray, k: int, metric: str, *, normalize: bool = False,
               device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over the distances of ``utils.eval_reid.distance_blocks``: bit for bit those
    that evaluation ranks, in the same blocks, so the order (ties by lower index) is evaluation's.

    query (Q, D), gallery (G, D): the raw embeddings (normalised here when ``normalize`` or the
    metric is cosine, as evaluation does). Returns (indices (Q, k) int64, distances (Q, k)
    float32), k = min(k, G).
    """
    k = min(k, len(gallery))
    query_t = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32)).to(device)
    gallery_t = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32)).to(device)
    out_idx, out_dist = [np.zeros((0, k), np.int64)], [np.zeros((0, k), np.float32)]
    for _, dist in distance_blocks(query_t, gallery_t, metric, normalize):
        cols = stable_topk(dist, k)  # the gallery is finite: no -1 padding
        out_idx.append(cols.cpu().numpy())
        out_dist.append(dist.gather(1, cols).cpu().numpy())
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
        try:
            saved = _read_json(key_path)
        except InferenceError as err:  # only a cache: rebuild it
            log.warning("%s", err)
            saved = {}
        if isinstance(saved, dict) and saved.get("key") == key:
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
    if kind == "exact":  # normalises as evaluation does: the same distances, bit for bit
        return exact_topk(query, gallery.embeddings, k, metric, normalize=normalize, device=device)
    gallery_vectors = prepare(gallery.embeddings, metric, normalize)
    query_vectors = prepare(query, metric, normalize)
    index = load_or_build_index(gallery, gallery_vectors, kind, metric, normalize, params)
    return search_index(index, query_vectors, k, kind, metric, params)
