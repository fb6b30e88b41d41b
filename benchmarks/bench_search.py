"""Exact vs approximate top-k gallery search (inference/search.py, the code of get_similar.py) on synthetic data.

    python benchmarks/bench_search.py                       # 200,000 x 2,048 gallery, 1,000 queries
    python benchmarks/bench_search.py --gallery-size 20000  # a quick run

The gallery imitates re-ID embeddings: identities of ``--images-per-identity`` images each, whose
vectors vary around an identity centre in a ``--latent-dim`` subspace, mapped to ``--dim``
dimensions by a random linear map, plus isotropic noise. Queries are new images of random
gallery identities. Exact search = ``search.exact_topk`` (chunked matrix product, the same
ranking as evaluation); the approximate indexes are ``search.build_index`` (FAISS IVF-Flat,
HNSW-Flat). recall@k = |approximate top-k ∩ exact top-k| / k, averaged over queries. Index build
time is reported apart from search time. Prints a table and writes JSON (``--out``, alias ``--json``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks.common import machine_info, write_report  # noqa: E402
from inference.search import IndexParams, build_index, exact_topk, prepare, search_index  # noqa: E402


def synthetic_embeddings(n: int, queries: int, dim: int, per_identity: int, latent_dim: int, seed: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(gallery (n, dim), queries (queries, dim)) float32, clustered by identity."""
    rng = np.random.default_rng(seed)
    identities = max(1, n // per_identity)
    centres = rng.standard_normal((identities, latent_dim), dtype=np.float32)
    mapping = rng.standard_normal((latent_dim, dim), dtype=np.float32) / np.sqrt(latent_dim)

    def draw(count: int, ids: np.ndarray) -> np.ndarray:
        out = np.empty((count, dim), np.float32)
        for start in range(0, count, 20000):  # bounded temporaries
            chunk = ids[start:start + 20000]
            latent = centres[chunk] + 0.6 * rng.standard_normal((len(chunk), latent_dim), dtype=np.float32)
            out[start:start + len(chunk)] = latent @ mapping
            out[start:start + len(chunk)] += 0.3 * rng.standard_normal((len(chunk), dim), dtype=np.float32)
        return out

    gallery = draw(n, np.arange(n) % identities)
    query = draw(queries, rng.integers(0, identities, queries))
    return gallery, query


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a[a >= 0]) & set(e)) / k for a, e in zip(approx, exact)]))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def machine() -> dict:
    """The shared machine description (load average at the start) plus FAISS's version and threads."""
    import faiss

    return machine_info(faiss=faiss.__version__, faiss_threads=faiss.omp_get_max_threads())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery-size", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--metric", choices=("euclidean", "cosine"), default="euclidean")
    parser.add_argument("--images-per-identity", type=int, default=20)
    parser.add_argument("--latent-dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nlist", type=int, nargs="*", default=[0], help="IVF lists to try (0 = get_similar's auto)")
    parser.add_argument("--nprobe", type=int, nargs="*", default=[4, 8, 16, 32])
    parser.add_argument("--hnsw-m", type=int, nargs="*", default=[32])
    parser.add_argument("--ef-search", type=int, nargs="*", default=[32, 64, 128])
    parser.add_argument("--ef-construction", type=int, default=IndexParams().ef_construction)
    parser.add_argument("--skip", nargs="*", default=[], choices=("ivf", "hnsw"))
    parser.add_argument("--out", "--json", dest="out", default=os.path.join(ROOT, "outputs", "bench_search.json"),
                        help="JSON report")
    args = parser.parse_args(argv)

    info = {"machine": machine(), "args": vars(args)}
    (gallery, query), seconds = timed(synthetic_embeddings, args.gallery_size, args.queries, args.dim,
                                      args.images_per_identity, args.latent_dim, args.seed)
    print(f"data: gallery {gallery.shape}, queries {query.shape}, generated in {seconds:.1f} s", flush=True)
    gallery, query = prepare(gallery, args.metric, False), prepare(query, args.metric, False)

    (exact_idx, _), exact_s = timed(exact_topk, query, gallery, args.k, args.metric)
    rows = [{"method": "exact", "params": {}, "build_s": 0.0, "search_s": exact_s,
             "qps": len(query) / exact_s, "recall": 1.0}]
    print(f"exact: {exact_s:.2f} s, {len(query) / exact_s:.1f} queries/s", flush=True)

    configs = []
    if "ivf" not in args.skip:
        configs += [("ivf", IndexParams(nlist=nlist), [IndexParams(nlist=nlist, nprobe=p) for p in args.nprobe])
                    for nlist in args.nlist]
    if "hnsw" not in args.skip:
        configs += [("hnsw", IndexParams(hnsw_m=m, ef_construction=args.ef_construction),
                     [IndexParams(hnsw_m=m, ef_construction=args.ef_construction, ef_search=ef)
                      for ef in args.ef_search]) for m in args.hnsw_m]
    for kind, build_params, search_params in configs:
        index, build_s = timed(build_index, gallery, kind, args.metric, build_params)
        print(f"{kind} {build_params.build_key(kind, len(gallery))}: built in {build_s:.1f} s", flush=True)
        for params in search_params:
            (idx, _), search_s = timed(search_index, index, query, args.k, kind, args.metric, params)
            row = {"method": kind, "params": params.describe(kind, len(gallery)), "build_s": build_s,
                   "search_s": search_s, "qps": len(query) / search_s, "recall": recall_at_k(idx, exact_idx)}
            row["speedup"] = row["qps"] / rows[0]["qps"]
            rows.append(row)
            print(f"  {row['params']}: {search_s:.3f} s, {row['qps']:.0f} q/s ({row['speedup']:.1f}x exact), "
                  f"recall@{args.k} {row['recall']:.4f}", flush=True)
        del index

    print(f"\n| method | parameters | build (s) | search (s) | queries/s | x exact | recall@{args.k} |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
        print(f"| {row['method']} | {params} | {row['build_s']:.1f} | {row['search_s']:.2f} | {row['qps']:.0f} | "
              f"{row['qps'] / rows[0]['qps']:.1f} | {row['recall']:.4f} |")
    info["results"] = rows
    write_report(args.out, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
