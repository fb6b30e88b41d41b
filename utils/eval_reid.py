"""Re-ID retrieval metrics (CMC, mAP, mINP) in standard and centroid mode.

Conventions shared by everything in this file:

- Distances are float32. "euclidean" is the *squared* Euclidean distance
  ‖q‖² + ‖g‖² − 2 q·g (no sqrt, no clamp, as the original; same ranking); "cosine" is
  1 − cos(q, g). Computed with torch on the features' device, in fixed-shape blocks so
  that chunking never changes a bit (see `_gemm_rows`). On GPU, when TF32 is enabled for
  matmuls, the products are taken in float64 instead (the TF32 switch is left alone).
- Ranking: ascending distance; ties are broken by the lower gallery index, as a *stable*
  argsort does. Both the reference `eval_func` and `evaluate` follow this exactly. (In
  camera-aware centroid mode, a query's camera-excluded own centroid gets its distance from
  a row-wise product, which can differ from the block product in the last bit.)
- camera_aware=True (re-ID): for each query, gallery items with the query's pid AND camera
  are removed from its ranking. camera_aware=False (fashion): nothing is removed; query and
  gallery "cameras" (user/shop) never coincide there anyway.
- A query left with no true match is skipped; if no query is left a ValueError is raised.
- AP = (1/R) Σ over the 1-based positions j of the R true matches in the filtered ranking of
  (matches up to j) / j. INP = R / (position of the last true match) (Ye et al., AGW).
  CMC[k-1] = fraction of valid queries with a true match in the top k.
"""
import math
import warnings

import numpy as np
import torch

METRICS = ("euclidean", "cosine")
RANK_KEYS = (1, 5, 10, 20, 50)


def eval_func(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """Slow, readable reference: one Python iteration per query.

    distmat: (Q, G) distances; pids/camids: (Q,) and (G,) integer arrays.
    Returns (cmc, mAP): cmc is a float64 array of length max_rank, mAP a float in [0, 1].
    Ties in a row are ranked by gallery index (stable argsort). Gallery items with the
    query's pid and camera are removed; queries without a remaining true match are skipped.
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids).reshape(-1), np.asarray(g_pids).reshape(-1)
    q_camids, g_camids = np.asarray(q_camids).reshape(-1), np.asarray(g_camids).reshape(-1)
    if distmat.ndim != 2 or distmat.shape != (len(q_pids), len(g_pids)) or len(q_camids) != len(q_pids) \
            or len(g_camids) != len(g_pids):
        raise ValueError(f"distmat {distmat.shape} does not fit q_pids ({len(q_pids)},), g_pids ({len(g_pids)},), "
                         f"q_camids ({len(q_camids)},) and g_camids ({len(g_camids)},)")
    if np.isnan(distmat).any():
        raise ValueError(f"distmat holds {int(np.isnan(distmat).sum())} NaN distances")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    all_cmc, all_ap = [], []
    for q in range(distmat.shape[0]):
        order = np.argsort(distmat[q], kind="stable")
        removed = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
        hits = g_pids[order][~removed] == q_pids[q]
        if not hits.any():
            continue
        cmc = np.minimum(np.cumsum(hits), 1).astype(np.float64)
        # A filtered gallery shorter than max_rank: the last value (1) holds thereafter.
        cmc = np.pad(cmc[:max_rank], (0, max(0, max_rank - len(cmc))), mode="edge")
        all_cmc.append(cmc)
        hit_positions = np.flatnonzero(hits) + 1
        all_ap.append(np.mean(np.arange(1, len(hit_positions) + 1) / hit_positions))
    if not all_ap:
        raise ValueError("no query has a true match in the gallery (all queries skipped)")
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap))


# ---------------------------------------------------------------------------- distances

def _tf32_matmul_enabled(device):
    """Whether float32 matmuls on `device` may use TF32 now.

    Read only: switching TF32 off for a moment would mix torch's legacy and new TF32 APIs
    when the caller uses the other one, and torch then raises in later reads.
    """
    if device.type != "cuda":
        return False
    matmul = torch.backends.cuda.matmul
    try:
        if not hasattr(matmul, "fp32_precision"):
            return bool(matmul.allow_tf32)
        precision = matmul.fp32_precision
        if precision == "none":  # not set for matmuls: the global setting applies
            precision = getattr(torch.backends, "fp32_precision", "ieee")
        return precision == "tf32"
    except RuntimeError:  # torch could not tell (mixed APIs): assume the worst
        return True


def _row_sqnorms(feats):
    """(N,) float32 squared L2 norms: torch's sum of the squares, as the original's
    `x.pow(2).sum(1)` (within 2 ulps of float64; exact for integer-valued features), taken in
    row chunks that stay in cache (7x faster on CPU, no (N, D) temporary).

    Not `vector_norm(x) ** 2` (rounds through the square root: integer distances that are equal
    stop being equal and ranking by index) nor a BLAS dot (`bmm`, `einsum`: up to 20 ulps off,
    which flips near-ties that float64 and the original rank alike)."""
    rows = 256 if feats.device.type == "cpu" else 8192
    out = feats.new_empty(len(feats))
    buffer = feats.new_empty(min(rows, len(feats)), feats.shape[1])
    for start in range(0, len(feats), rows):
        chunk = feats[start:start + rows]
        squares = torch.mul(chunk, chunk, out=buffer[:len(chunk)])
        torch.sum(squares, dim=1, out=out[start:start + rows])
    return out


def _row_norms(feats):
    """(N,) float32 L2 norms of the rows."""
    return torch.linalg.vector_norm(feats, dim=1)


def _l2_normalize(feats, norms=None):
    """Rows scaled to unit L2 norm (zero rows stay zero); norms: `_row_norms(feats)`."""
    norms = (_row_norms(feats) if norms is None else norms)[:, None].clamp_min(1e-12)
    return feats / norms


def _prepare(feats, metric, side, normalize=False, norms=None):
    """Rows whose product *is* the distance: `_prepare(q, m, "query") @ _prepare(g, m, "item")ᵀ`.

    euclidean: query rows [-2q, 1, ‖q‖²], item rows [g, ‖g‖², 1] → ‖q‖² + ‖g‖² − 2 q·g;
    cosine:    query rows [-q̂, 1],        item rows [ĝ, 1]        → 1 − q̂·ĝ (q̂ = q / ‖q‖).
    Folding the norms into the product saves every elementwise pass over the (Q, G) result
    (three passes, ~70 ms at Market-1501 scale on 2 CPU cores) for two extra columns.
    normalize: L2-normalise the rows first (norms: their `_row_norms`, when known).
    Returns a new (N, D + 2) or (N, D + 1) float32 tensor: the one copy of the features
    that evaluation makes.
    """
    dim = feats.shape[1]
    shape = (len(feats), dim + (2 if metric == "euclidean" else 1))
    if feats.device.type == "cpu":
        # numpy asks the kernel for huge pages for big arrays (torch's allocator does not):
        # filling a fresh 130 MB buffer then costs ~25 ms instead of ~85 ms.
        out = torch.from_numpy(np.empty(shape, np.float32))
    else:
        out = feats.new_empty(shape)
    body = out[:, :dim]
    if normalize or metric == "cosine":
        norms = _row_norms(feats) if norms is None else norms
        torch.div(feats, norms.clamp_min(1e-12)[:, None], out=body)
    else:
        body.copy_(feats)
    if metric == "cosine":
        out[:, dim] = 1.0
        if side == "query":
            body.neg_()
        return out
    sqnorms = _row_sqnorms(body)
    out[:, dim], out[:, dim + 1] = (1.0, sqnorms) if side == "query" else (sqnorms, 1.0)
    if side == "query":
        body.mul_(-2.0)  # exact: a power of two
    return out


BLOCK_ELEMENTS = 2 ** 26  # distances per matrix-product block: 256 MB of float32


def _gemm_rows(num_queries, num_items):
    """Query rows per matrix product: the fewest equal blocks of <= BLOCK_ELEMENTS.

    BLAS kernels may round differently for different matrix shapes (measured: MKL and
    OpenBLAS change the last bit when the number of rows changes), so for a given problem
    size every product has exactly this many rows (the last block zero-padded). A
    distance's bits then never depend on `query_chunk_size`, and ties stay ties.
    """
    cap = max(1, BLOCK_ELEMENTS // max(num_items, 1))
    num_blocks = -(-num_queries // cap)
    return max(1, -(-num_queries // max(num_blocks, 1)))


def _duplicate_items(items):
    """Rows of the `_prepare`d `items` that equal an earlier row: (dup, src) int64 index
    tensors with items[dup[i]] == items[src[i]], src the first such row; None if none.

    BLAS kernels do not promise equal results for equal rows (measured: numpy's OpenBLAS
    gives two identical gallery rows distances that differ in the last bit for some
    queries), so `_distance` copies the distances of `src` onto `dup`: duplicate gallery
    images then tie exactly and rank by index. A key from a few columns finds the rows that
    may have a twin (about a millisecond); only those are compared in full.
    """
    if len(items) < 2:
        return None
    dim = items.shape[1]
    # Equal rows have equal keys (same operations); unequal rows rarely do.
    weights = torch.tensor([1.0, 3.14159, 2.71828, 1.41421, 1.61803], dtype=torch.float64,
                           device=items.device)
    keys = items[:, [0, dim // 3, 2 * dim // 3, dim - 2, dim - 1]].double() @ weights
    _, key_group, key_count = torch.unique(keys, return_inverse=True, return_counts=True)
    maybe = (key_count[key_group] > 1).nonzero().squeeze(1)
    if len(maybe) == 0:
        return None
    _, group = torch.unique(items[maybe], dim=0, return_inverse=True)  # exact row equality
    first = torch.full((int(group.max()) + 1,), len(items), dtype=torch.long, device=items.device)
    src = first.scatter_reduce(0, group, maybe, "amin")[group]
    is_dup = src != maybe
    return (maybe[is_dup], src[is_dup]) if bool(is_dup.any()) else None


def _distance(query, items, gemm_rows, duplicates=None):
    """(C, N) float32 distances between C <= gemm_rows query rows and the items, both
    `_prepare`d, from one product of exactly `gemm_rows` rows (zero-padded).

    duplicates: `_duplicate_items(items)`; their columns are made equal to their first copy.
    The result is the transpose of a contiguous (N, C) buffer: gallery @ queryᵀ ran 1.5x
    faster than query @ galleryᵀ with torch's CPU BLAS, and transposing the 200 MB result
    would cost a third of the product, so callers work on this layout directly.
    """
    block = query
    if len(query) < gemm_rows:
        block = torch.cat([query, query.new_zeros(gemm_rows - len(query), query.shape[1])])
    if _tf32_matmul_enabled(items.device):
        # TF32 keeps ~10 mantissa bits and would reorder near neighbours: use float64.
        dot = (items.double() @ block.double().T).float()
    elif items.device.type == "cpu":
        # numpy's OpenBLAS ran this product 1.3-1.4x faster than torch's MKL on the AMD
        # CPUs measured (and within 10% of the cores' peak FLOP rate).
        dot = torch.from_numpy(items.detach().numpy() @ block.detach().numpy().T)
    else:
        dot = items @ block.T
    if duplicates is not None:
        dot[duplicates[0]] = dot[duplicates[1]]
    return dot[:, :len(query)].T


def distance_blocks(query_feats, gallery_feats, metric="euclidean", feat_norm=False):
    """Yield (first query row, (C, G) float32 distances) over all queries, in the blocks that
    `evaluate` computes: bit for bit its standard-mode distances, at most BLOCK_ELEMENTS each.

    query_feats (Q, D), gallery_feats (G, D): tensors or arrays (on the query's device).
    feat_norm: L2-normalise both first, as `evaluate(feat_norm=True)` does.
    """
    _check_metric(metric)
    q = _as_float_tensor(query_feats, None)
    g = _as_float_tensor(gallery_feats, q.device)
    q, g = _prepare(q, metric, "query", feat_norm), _prepare(g, metric, "item", feat_norm)
    rows, duplicates = _gemm_rows(len(q), len(g)), _duplicate_items(g)
    for start in range(0, len(q), rows):
        yield start, _distance(q[start:start + rows], g, rows, duplicates)


def pairwise_distance(query_feats, gallery_feats, metric="euclidean", feat_norm=False):
    """(Q, G) float32 distance matrix, bit for bit as `evaluate` computes it (see
    `distance_blocks`, which yields it block by block)."""
    return torch.cat([dist for _, dist in distance_blocks(query_feats, gallery_feats, metric, feat_norm)])


# ------------------------------------------------------------------- ranking primitives

SLAB_ELEMENTS = 2 ** 22  # distances scored at once: bounds the scoring temporaries


def _orderable(values):
    """int64 keys in [0, 2**32) ordered like the float32 `values` (-0.0 counts as +0.0)."""
    bits = (values + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2 ** 31


def _sorted_items(dist, thresholds):
    """The entries with dist <= their row's threshold, in exact ranking order.

    dist (C, N), thresholds (C,). Returns (rows, cols, ranks), 1-D int64, sorted by row
    then rank; rank is the 0-based position among the row's selected entries (ties broken
    by column).
    """
    if dist.T.is_contiguous() and not dist.is_contiguous():  # gallery-major, see _distance
        cols, rows = (dist.T <= thresholds[None, :]).nonzero(as_tuple=True)
    else:
        rows, cols = (dist <= thresholds[:, None]).nonzero(as_tuple=True)
    # Either way the columns of one row come out ascending, which the stable sort keeps.
    keys = (rows << 32) | _orderable(dist[rows, cols])
    order = torch.sort(keys, stable=True).indices  # stable: equal distances keep column order
    rows, cols = rows[order], cols[order]
    counts = torch.bincount(rows, minlength=dist.shape[0])
    row_start = counts.cumsum(0) - counts
    return rows, cols, torch.arange(len(rows), device=dist.device) - row_start[rows]


def stable_topk(dist, k):
    """The k smallest entries per row, ties broken by column; +inf entries are never taken.

    dist (C, N) float. Returns (C, k) int64 column indices, padded with -1 where a row has
    fewer than k finite entries.
    """
    k_eff = min(k, dist.shape[1])
    kth = torch.topk(dist, k_eff, dim=1, largest=False).values[:, -1]
    kth = kth.clamp(max=torch.finfo(dist.dtype).max)  # keeps +inf (removed) items out
    rows, cols, ranks = _sorted_items(dist, kth)
    out = torch.full((dist.shape[0], k), -1, dtype=torch.long, device=dist.device)
    take = ranks < k
    out[rows[take], ranks[take]] = cols[take]
    return out


def query_expansion(query_feats, gallery_feats, k, alpha=0.0, query_chunk_size=1024):
    """Average query expansion (AQE, Chum et al., ICCV 2007) with similarity weights (alpha-QE, Radenovic
    et al., TPAMI 2019): each L2-normalised query becomes the normalised sum of itself and its k gallery
    features of highest cosine similarity (ties: lower gallery index), each neighbour weighted by
    max(similarity, 0) ** alpha (alpha 0: the plain mean). No label is looked at.

    Returns (expanded queries (Q, D), the L2-normalised gallery (G, D)), float32 on the features' device:
    score them against each other. Works in chunks of ``query_chunk_size`` queries (one (chunk, G)
    similarity block at a time)."""
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"query expansion needs k >= 1 neighbours, got {k!r}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"query expansion needs a finite alpha >= 0, got {alpha!r}")
    q = _l2_normalize(_as_float_tensor(query_feats, None))
    g = _l2_normalize(_as_float_tensor(gallery_feats, q.device))
    expanded = torch.empty_like(q)
    for start in range(0, q.shape[0], query_chunk_size):
        block = q[start:start + query_chunk_size]
        sims = block @ g.T
        neighbours = stable_topk(-sims, k)  # (chunk, k); k > G leaves -1 columns
        taken = neighbours >= 0
        index = neighbours.clamp_min(0)
        weights = sims.gather(1, index).clamp_min(0) ** alpha * taken
        expanded[start:start + query_chunk_size] = block + torch.einsum("ck,ckd->cd", weights, g[index])
    return _l2_normalize(expanded), g


def _match_columns(q_pids, item_pids):
    """Columns of the gallery items that share each query's pid.

    Returns (cols, valid), both (C, M) with M the largest such count; cols is 0 where
    `valid` is False. Costs O(C·M), not O(C·N).
    """
    order = torch.argsort(item_pids, stable=True)
    sorted_pids = item_pids[order]
    start = torch.searchsorted(sorted_pids, q_pids, side="left")
    count = torch.searchsorted(sorted_pids, q_pids, side="right") - start
    width = max(int(count.max()), 1) if len(count) else 1
    offsets = torch.arange(width, device=q_pids.device)
    valid = offsets[None, :] < count[:, None]
    cols = order[(start[:, None] + offsets[None, :]).clamp(max=len(order) - 1)]
    return torch.where(valid, cols, torch.zeros_like(cols)), valid


def _sorted_matches(dist, match_cols, kept):
    """Each row's kept matches in ranking order: (values, cols), both (C, M).

    Padding (non-kept slots) comes last with value +inf and column N (past the end).
    """
    cols = torch.where(kept, match_cols, dist.shape[1])
    by_col = torch.sort(cols, dim=1).indices
    cols = cols.gather(1, by_col)
    values = torch.where(kept.gather(1, by_col), dist.gather(1, match_cols.gather(1, by_col)),
                         float("inf"))
    by_value = torch.sort(values, dim=1, stable=True).indices  # stable: ties keep column order
    return values.gather(1, by_value), cols.gather(1, by_value)


def _flat_true(mask):
    """Indices of the True entries of a 1-D bool tensor, ascending.

    Looks at 8 entries at a time (as one int64) and expands only the non-zero words:
    1.7x faster than `nonzero` on the sparse masks of `_hit_ranks` (2 CPU cores).
    """
    pad = -len(mask) % 8
    if len(mask) == 0:
        return torch.zeros(0, dtype=torch.long, device=mask.device)
    if pad:
        mask = torch.cat([mask, mask.new_zeros(pad)])
    words = mask.view(torch.int64).nonzero().squeeze(1)
    cand = (words[:, None] * 8 + torch.arange(8, device=mask.device)).view(-1)
    return cand[mask[cand]]


def _hit_ranks(dist, match_cols, kept):
    """0-based filtered ranks of every kept true match, by counting (no row is sorted).

    dist (C, N) float32, removed items +inf; match_cols/kept (C, M) as in `_score_chunk`.
    An item precedes the j-th match (in (distance, column) order) iff at most j matches
    precede the item. So every item that can precede some match (distance <= the row's
    last match) is put in the bucket "number of matches before it", and the j-th match's
    rank is (#items in buckets <= j) - 1 (the match itself sits in bucket j).
    Returns (rows, ranks) of the matches, sorted by row then rank.
    """
    num_rows, width = match_cols.shape
    values, cols = _sorted_matches(dist, match_cols, kept)
    num_matches = kept.sum(dim=1)
    last = values.gather(1, (num_matches - 1).clamp(min=0)[:, None])
    last = torch.where(num_matches[:, None] > 0, last, float("-inf"))
    # One global search: keys (row, distance) are sorted row-major in match_keys.
    row_base = torch.arange(num_rows, device=dist.device)[:, None] << 32
    match_keys = (row_base | _orderable(values)).view(-1)
    counts = torch.zeros(num_rows * (width + 1), dtype=torch.long, device=dist.device)
    # Walk the gallery in contiguous slabs of the gallery-major layout (see `_distance`).
    dist_t = dist.T
    slab_rows = max(8, SLAB_ELEMENTS // num_rows // 8 * 8)
    for first_col in range(0, dist_t.shape[0], slab_rows):
        slab = dist_t[first_col:first_col + slab_rows].contiguous()  # no copy if already so
        flat = _flat_true((slab <= last.T).view(-1))  # typically a small prefix
        item_rows, item_cols = flat % num_rows, flat // num_rows + first_col
        item_values = slab.view(-1)[flat]
        item_keys = (item_rows << 32) | _orderable(item_values)
        found = torch.searchsorted(match_keys, item_keys)
        buckets = found - item_rows * width
        # An item at exactly a match's distance follows that match iff its column is higher.
        tie = (match_keys[found.clamp(max=len(match_keys) - 1)] == item_keys).nonzero().squeeze(1)
        tie_rows = item_rows[tie]
        same_value = values[tie_rows] == item_values[tie, None]
        precedes = same_value & (cols[tie_rows] < item_cols[tie, None])
        buckets.index_add_(0, tie, precedes.sum(dim=1))
        counts += torch.bincount(item_rows * (width + 1) + buckets, minlength=len(counts))
    before = counts.view(num_rows, width + 1)[:, :width].cumsum(dim=1) - 1
    slots = torch.arange(width, device=dist.device)
    rows, nth = (slots < num_matches[:, None]).nonzero(as_tuple=True)
    return rows, before[rows, nth]


def _score_chunk(dist, match_cols, kept):
    """Per-query match statistics for one chunk of queries.

    dist (C, N) float32 with removed items already set to +inf; match_cols/kept (C, M):
    the columns of each query's true matches and whether each is a real, kept match.
    Returns num_matches, first_rank, last_rank (C,) int64 (0-based filtered ranks; -1 when
    no match) and ap (C,) float64.
    """
    num_matches = kept.sum(dim=1)
    rows, ranks = _hit_ranks(dist, match_cols, kept)
    # The n-th hit of a row (1-based) sits at 0-based rank r: precision n / (r + 1).
    hits_per_row = torch.bincount(rows, minlength=len(dist))
    first_hit = hits_per_row.cumsum(0) - hits_per_row
    nth = torch.arange(1, len(rows) + 1, device=dist.device) - first_hit[rows]
    ap_sum = torch.zeros(len(dist), dtype=torch.float64, device=dist.device)
    ap_sum.index_add_(0, rows, nth.double() / (ranks + 1).double())
    ap = ap_sum / num_matches.clamp(min=1).double()
    no_rank = torch.full_like(num_matches, -1)
    first_rank = no_rank.scatter_reduce(0, rows, ranks, "amin", include_self=False)
    last_rank = no_rank.scatter_reduce(0, rows, ranks, "amax", include_self=False)
    return num_matches, first_rank, last_rank, ap


# -------------------------------------------------------------------- input handling

def _check_metric(metric):
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: expected one of {', '.join(METRICS)}")


def _from_numpy(x, dtype):
    """Tensor sharing the memory of `x` converted to `dtype` where torch can share it.

    Copies arrays torch cannot wrap (negative strides, e.g. `a[::-1]`; non-native byte
    order). A read-only array (e.g. `np.load(..., mmap_mode="r")`) is wrapped without a copy
    and without torch's warning: evaluation never writes into its inputs.
    """
    a = np.asarray(x, dtype=dtype)
    if any(step < 0 for step in a.strides):
        a = a.copy()
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(a)


def _as_float_tensor(x, device):
    """float32 tensor view of an array or tensor (copies only when dtype/device change)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        a = np.asarray(x)
        t = _from_numpy(a, a.dtype.newbyteorder("=") if a.dtype.kind == "f" else np.float32)
    return t.to(device=device if device is not None else t.device, dtype=torch.float32)


def _as_long_tensor(x, device):
    t = x.detach() if isinstance(x, torch.Tensor) else _from_numpy(x, np.int64)
    return t.reshape(-1).to(device=device, dtype=torch.long)


def _check_inputs(q, g, q_pids, g_pids, q_camids, g_camids):
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"features must be 2-D (items, dim) with the same dim; got "
                         f"query_feats {tuple(q.shape)} and gallery_feats {tuple(g.shape)}")
    if len(g) == 0:
        raise ValueError("the gallery is empty: gallery_feats has 0 rows")
    if len(q) == 0:
        raise ValueError("there are no queries: query_feats has 0 rows")
    for name, labels, feats_name, feats in (("q_pids", q_pids, "query_feats", q),
                                            ("q_camids", q_camids, "query_feats", q),
                                            ("g_pids", g_pids, "gallery_feats", g),
                                            ("g_camids", g_camids, "gallery_feats", g)):
        if len(labels) != len(feats):
            raise ValueError(f"length mismatch: {name} has {len(labels)} entries but "
                             f"{feats_name} has {len(feats)} rows")
    norms = []
    for side, feats in (("query", q), ("gallery", g)):
        # A row's norm is NaN/inf iff it holds NaN/inf (or overflows): one pass finds both.
        norms.append(_row_norms(feats))
        bad = (~torch.isfinite(norms[-1])).nonzero().squeeze(1)
        nonfinite = bad[~torch.isfinite(feats[bad]).all(dim=1)]
        if len(nonfinite):
            raise ValueError(f"{side} features contain NaN or inf in {len(nonfinite)} of "
                             f"{len(feats)} rows (first bad row: {int(nonfinite[0])})")
        # |q - g|² <= 4·max‖x‖²: keep every float32 distance finite.
        if len(bad) or float(norms[-1].max()) > 9e18:
            raise ValueError(f"{side} features are too large for float32 distances "
                             f"(a norm exceeds 9e18); rescale them")
    return norms


# ------------------------------------------------------------------ centroid gallery

def _group_sums(feats, rows, groups, num_groups):
    """(num_groups, D) float32 sums of feats[rows] grouped by `groups`.

    A sparse one-hot (groups × gallery) product: ~10x faster than index_add_ on CPU and
    it never copies the selected rows. The indices are in range by construction, so the
    invariant check is switched off explicitly (torch 2.11 warns about "implicitly
    disabled" checks otherwise).
    """
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        one_hot = torch.sparse_coo_tensor(torch.stack([groups, rows]),
                                          torch.ones(len(rows), device=feats.device),
                                          (num_groups, len(feats)), check_invariants=False)
        return torch.sparse.mm(one_hot, feats)


def _centroid_gallery(g, g_pids, g_camids, q_pids, q_camids, camera_aware):
    """Replace the gallery by one mean (raw, un-normalised) embedding per identity.

    Identities are pids >= 1. Distractor/junk images (pid 0 and negative pids) are not an
    identity: each stays an individual item. Items are ordered: centroids by ascending pid,
    then the individual images by gallery index.
    Returns a dict: feats (N, D), pids, camids (N,) (centroids get a camera that matches
    nothing), representative (N,) lowest gallery index of each item, is_centroid (N,), and
    in camera-aware mode own_col (Q,) the column of each query's own centroid (-1: none),
    excl_feats (E, D) the "pid minus camera c" centroids and q_excl (Q,) the row of
    excl_feats for each query (-1 when all of its pid's gallery images share its camera).
    """
    device = g.device
    is_identity = g_pids > 0
    id_rows = is_identity.nonzero().squeeze(1)
    single_rows = (~is_identity).nonzero().squeeze(1)
    ids, id_of_row = torch.unique(g_pids[id_rows], return_inverse=True)
    counts = torch.bincount(id_of_row, minlength=len(ids))
    sums = _group_sums(g, id_rows, id_of_row, len(ids))
    first_row = torch.full_like(ids, len(g_pids)).scatter_reduce(0, id_of_row, id_rows, "amin")
    no_camera = torch.iinfo(torch.long).min
    out = {
        "feats": torch.cat([sums / counts[:, None], g[single_rows]]),
        "pids": torch.cat([ids, g_pids[single_rows]]),
        "camids": torch.cat([torch.full_like(ids, no_camera), g_camids[single_rows]]),
        "representative": torch.cat([first_row, single_rows]),
        "is_centroid": torch.cat([torch.ones_like(ids, dtype=torch.bool),
                                  torch.zeros_like(single_rows, dtype=torch.bool)]),
    }
    if not camera_aware:
        return out
    if len(ids) == 0:  # only distractors: no query has an own centroid
        none = torch.full_like(q_pids, -1)
        out.update(own_col=none, q_excl=none, excl_feats=g[:0])
        return out
    pos = torch.searchsorted(ids, q_pids).clamp(max=len(ids) - 1)
    found = ids[pos] == q_pids
    q_rows = found.nonzero().squeeze(1)
    # Number the (pid, camera) pairs of queries and gallery identity images together.
    pairs = torch.stack([torch.cat([q_pids[q_rows], g_pids[id_rows]]),
                         torch.cat([q_camids[q_rows], g_camids[id_rows]])], dim=1)
    unique_pairs, pair_of = torch.unique(pairs, dim=0, return_inverse=True)
    q_pair = pair_of[:len(q_rows)]
    used = torch.zeros(len(unique_pairs), dtype=torch.bool, device=device)
    used[q_pair] = True
    compact = used.cumsum(0) - 1  # only pairs some query needs get a centroid
    num_pairs = int(used.sum())
    pair_cam = unique_pairs[used, 1]
    pair_id = torch.zeros(num_pairs, dtype=torch.long, device=device)
    pair_id[compact[q_pair]] = pos[q_rows]  # ascending: pairs are sorted by pid
    # Sum each pair's images directly (each image of an identity, once per pair of that
    # identity whose camera differs): the same sums, in the same order, as a full centroid
    # of the same images, so duplicates give bit-equal centroids (a sum minus the camera's
    # sum would not).
    pairs_of_id = torch.bincount(pair_id, minlength=len(ids))
    reps = pairs_of_id[id_of_row]
    image = torch.repeat_interleave(torch.arange(len(id_rows), device=device), reps)
    within = torch.arange(len(image), device=device) - torch.repeat_interleave(reps.cumsum(0) - reps, reps)
    pair = (pairs_of_id.cumsum(0) - pairs_of_id)[id_of_row[image]] + within
    keep = g_camids[id_rows[image]] != pair_cam[pair]
    excl_sums = _group_sums(g, id_rows[image[keep]], pair[keep], num_pairs)
    excl_counts = torch.bincount(pair[keep], minlength=num_pairs)
    out["excl_feats"] = excl_sums / excl_counts.clamp(min=1)[:, None]
    out["own_col"] = torch.where(found, pos, torch.full_like(pos, -1))
    q_excl = torch.full_like(q_pids, -1)
    q_excl[q_rows] = torch.where(excl_counts[compact[q_pair]] > 0, compact[q_pair], -1)
    out["q_excl"] = q_excl
    return out


def _rowwise_distance(query, items):
    """Distance between row i of `query` and row i of `items` (both `_prepare`d)."""
    return (query * items).sum(dim=1)


# ------------------------------------------------------------------------- evaluate

def _score_rows(dist, rows, q_part, q_pids, q_camids, items, excl_prep, camera_aware):
    """Apply the removal rules to one chunk of distances (in place) and score it.

    dist (C, N) float32 for the query rows `rows` (a slice); q_part: their `_prepare`d
    features. Removed items are set to +inf. Returns `_score_chunk`'s tuple.
    """
    row_ids = torch.arange(dist.shape[0], device=dist.device)
    cols, valid = _match_columns(q_pids[rows], items["pids"])
    removed = torch.zeros_like(valid)
    if camera_aware:
        removed = valid & (items["camids"][cols] == q_camids[rows, None])
    if excl_prep is not None:
        own, excl = items["own_col"][rows], items["q_excl"][rows]
        has = excl >= 0  # own centroid rebuilt without the query's camera
        dist[row_ids[has], own[has]] = _rowwise_distance(q_part[has], excl_prep[excl[has]])
        # No image of the pid in another camera: the own centroid is removed.
        removed |= valid & (cols == own[:, None]) & (own >= 0)[:, None] & ~has[:, None]
    dist[row_ids[:, None].expand_as(cols)[removed], cols[removed]] = float("inf")
    return _score_chunk(dist, cols, valid & ~removed)


def evaluate(query_feats, gallery_feats, q_pids, g_pids, q_camids, g_camids, *,
             metric="euclidean", feat_norm=True, use_centroids=False, camera_aware=True,
             max_rank=50, query_chunk_size=None, return_topk=0,
             rerank=False, rerank_k1=20, rerank_k2=6, rerank_lambda=0.3):
    """CMC, mAP and mINP from features, computed blockwise on the features' device.

    query_feats (Q, D), gallery_feats (G, D): numpy arrays or tensors (used as float32).
    q_pids, q_camids (Q,), g_pids, g_camids (G,): integer labels.
    metric: "euclidean" (squared) or "cosine". feat_norm: L2-normalise first (in centroid
    mode after averaging, as the original).
    use_centroids: the gallery becomes one mean embedding per identity (pid >= 1); images
    with pid 0 (distractors) or pid < 0 (junk) stay individual items. Identities without
    a query keep their centroid.
    camera_aware: re-ID protocol. Standard mode: drop gallery items with the query's pid
    and camera. Centroid mode: the query's own centroid is built only from its pid's
    images in other cameras (the images the standard protocol keeps); without any, the
    query is skipped. camera_aware=False (fashion): nothing is removed in either mode.
    max_rank: length of the returned CMC.
    query_chunk_size: queries scored at once (default: a whole distance block). Distances
    are computed in blocks of <= BLOCK_ELEMENTS (256 MB) whose shape depends only on Q and
    G, so the chunk size never changes a result; scoring walks each block in 16 MB slabs.
    return_topk: also return the k best-ranked non-removed gallery items of each query.
    rerank: score the k-reciprocal re-ranked distances of `utils.reranking.re_ranking`
    (k1, k2, lambda from rerank_k1/k2/lambda; standard mode only) instead of the plain ones.
    Peak extra memory: one prepared copy of the query and gallery features (two extra
    columns, see `_prepare`), one distance block, and the scoring temporaries of one slab (measured: benchmarks/EVAL_RESULTS.md).

    Returns a dict: mAP, mINP (float), cmc (float64 array, length max_rank),
    num_valid_queries, num_queries, num_gallery_items (int), query_ap (Q,) float64 (NaN for
    skipped queries), and when return_topk > 0: topk_indices (Q, k) int64 indices of
    gallery items (-1 padded), gallery_item_pids (N,), gallery_item_representative (N,)
    (a gallery index for each item: itself, or the first image of a centroid's identity),
    gallery_item_is_centroid (N,) and camera_aware. In standard mode items are the gallery
    images; in centroid mode centroids (ascending pid) then distractor images.
    """
    _check_metric(metric)
    if not (isinstance(max_rank, int) and max_rank >= 1):
        raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
    if rerank and use_centroids:
        raise ValueError("re-ranking applies to the standard mode only (use_centroids=False)")
    q = _as_float_tensor(query_feats, None)
    device = q.device
    g = _as_float_tensor(gallery_feats, device)
    q_pids, g_pids = _as_long_tensor(q_pids, device), _as_long_tensor(g_pids, device)
    q_camids, g_camids = _as_long_tensor(q_camids, device), _as_long_tensor(g_camids, device)
    q_norms, g_norms = _check_inputs(q, g, q_pids, g_pids, q_camids, g_camids)

    if use_centroids:
        items = _centroid_gallery(g, g_pids, g_camids, q_pids, q_camids, camera_aware)
    else:
        items = {"feats": g, "pids": g_pids, "camids": g_camids,
                 "representative": torch.arange(len(g), device=device),
                 "is_centroid": torch.zeros(len(g), dtype=torch.bool, device=device)}
    # Centroids are averaged before normalisation, as the original does.
    q_prep = _prepare(q, metric, "query", feat_norm, q_norms)
    reranked = item_prep = None
    if rerank:
        from utils.reranking import re_ranking  # local: reranking imports this module
        if feat_norm:
            q, g = _l2_normalize(q, norms=q_norms), _l2_normalize(g, norms=g_norms)
        reranked = torch.as_tensor(re_ranking(q, g, rerank_k1, rerank_k2, rerank_lambda,
                                              metric=metric), device=device)
    else:
        item_prep = _prepare(items.pop("feats"), metric, "item", feat_norm,
                             None if use_centroids else g_norms)
    duplicates = None if item_prep is None else _duplicate_items(item_prep)
    excl_prep = None
    if "excl_feats" in items:
        excl_prep = _prepare(items.pop("excl_feats"), metric, "item", feat_norm)

    item_pids, num_items = items["pids"], len(items["pids"])
    gemm_rows = _gemm_rows(len(q), num_items)
    chunk = query_chunk_size or gemm_rows
    stats, topk = [], []
    for block_start in range(0, len(q), gemm_rows):
        block = slice(block_start, block_start + gemm_rows)
        if reranked is not None:
            block_dist = reranked[block].float().clone()
        else:
            block_dist = _distance(q_prep[block], item_prep, gemm_rows, duplicates)
        for start in range(0, len(block_dist), chunk):
            dist = block_dist[start:start + chunk]
            rows = slice(block_start + start, block_start + start + len(dist))
            stats.append(_score_rows(dist, rows, q_prep[rows], q_pids, q_camids, items,
                                     excl_prep, camera_aware))
            if return_topk:
                topk.append(stable_topk(dist, return_topk))

    num_matches, first_rank, last_rank, ap = (torch.cat(s) for s in zip(*stats))
    is_valid = num_matches > 0
    num_valid = int(is_valid.sum())
    if num_valid == 0:
        after = " after same-pid same-camera removal" if camera_aware else ""
        raise ValueError(f"no valid query: none of the {len(q)} queries has a true match "
                         f"in the gallery{after}")
    hist = torch.bincount(first_rank[is_valid].clamp(max=max_rank), minlength=max_rank + 1)
    result = {
        "mAP": float(ap[is_valid].mean()),
        "mINP": float((num_matches[is_valid] / (last_rank[is_valid] + 1).double()).mean()),
        "cmc": (hist[:max_rank].cumsum(0).double() / num_valid).cpu().numpy(),
        "num_valid_queries": num_valid,
        "num_queries": len(q),
        "num_gallery_items": num_items,
        "query_ap": torch.where(is_valid, ap, float("nan")).cpu().numpy(),
    }
    if return_topk:
        result.update({
            "topk_indices": torch.cat(topk).cpu().numpy(),
            "gallery_item_pids": item_pids.cpu().numpy(),
            "gallery_item_representative": items["representative"].cpu().numpy(),
            "gallery_item_is_centroid": items["is_centroid"].cpu().numpy(),
            "camera_aware": camera_aware,
        })
    return result


def format_metrics(result):
    """{"mAP", "mINP", "rank1", ..., "rank50"} as Python floats in [0, 1] from `evaluate`.

    rank-k is cmc[k-1]; when the cmc is shorter than k, its last value.
    """
    cmc = np.asarray(result["cmc"], dtype=np.float64)
    metrics = {"mAP": float(result["mAP"]), "mINP": float(result["mINP"])}
    for k in RANK_KEYS:
        metrics[f"rank{k}"] = float(cmc[min(k, len(cmc)) - 1])
    return metrics
