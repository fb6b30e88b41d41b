"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), written from the paper's definitions. Where the paper and
the authors' released code differ, this follows the code, which every peer framework reuses,
so that re-ranked numbers compare: a strict "> 2/3" overlap test (the paper writes >=), h =
k1/2 rounded half to even, and no query expansion at k2 = 1.

Everything is over the N = Q + G items (queries first, then gallery). x's *ranking* is all
items by ascending original distance, ties by index (x itself normally comes first).

- d(x, y): the metric distance (see utils.eval_reid), clamped at 0 and divided by the
  maximum of x's row, so that it lies in [0, 1] like the Jaccard distance.
- N(x, k): the first k + 1 items of x's ranking (x and its k nearest neighbours).
- R(x, k) = {y in N(x, k) : x in N(y, k)}: the k-reciprocal neighbours.
- R*(x, k1) = R(x, k1) ∪ R(y, h) for every y in R(x, k1) with
  |R(y, h) ∩ R(x, k1)| > 2/3 |R(y, h)|, where h = round(k1 / 2), half to even.
- V_x[y] = exp(-d(x, y)) for y in R*(x, k1), else 0; each row scaled to sum 1.
- Local query expansion (k2 > 1): V_x <- mean of V_y over the first k2 items of x's ranking.
- Jaccard distance d_J(x, y) = 1 - Σ_j min(V_x[j], V_y[j]) / Σ_j max(V_x[j], V_y[j]).
- Result for a query q and gallery item g: (1 - λ) d_J(q, g) + λ d(q, g).

V is kept sparse (a row has at most (k1 + 1)(h + 2) non-zeros before expansion), the
Jaccard sums visit only the shared non-zeros, and distances are computed in row blocks, so
memory stays at two (Q × G) float32 matrices (d(q, g) and the result) and a few copies of the
features: 1.5 GB peak at Market-1501 scale.
"""
import torch

from utils.eval_reid import (_as_float_tensor, _check_metric, _distance, _duplicate_items,
                             _gemm_rows, _prepare, _rowwise_distance, stable_topk)


def _reciprocal(ranked, k):
    """(N, k+1) bool: is ranked[x, t] in R(x, k), i.e. is x among its first k + 1 items."""
    nearest = ranked[:, :k + 1]
    me = torch.arange(len(ranked), device=ranked.device)[:, None, None]
    return (nearest[nearest] == me).any(dim=2)


def _expanded_sets(ranked, k1, block=2048):
    """R*(x, k1) for every x as flat (row, col) int64 pairs, sorted and without repeats."""
    n, half = len(ranked), round(k1 / 2)  # Python's round: half to even, as np.around
    near, near_ok = ranked[:, :k1 + 1], _reciprocal(ranked, k1)
    half_near, half_ok = ranked[:, :half + 1], _reciprocal(ranked, half)
    half_size = half_ok.sum(dim=1)
    rows, cols = [], []
    for start in range(0, n, block):
        x = torch.arange(start, min(start + block, n), device=ranked.device)
        y = near[x]                                     # (b, K) candidates y in N(x, k1)
        members = torch.where(near_ok[x], near[x], -1)  # R(x, k1), -1 where not a member
        # |R(y, h) ∩ R(x, k1)| for each y: compare R(y, h) with R(x, k1) elementwise.
        y_half = torch.where(half_ok[y], half_near[y], -2)  # (b, K, h+1)
        overlap = (y_half[..., None] == members[:, None, None, :]).any(dim=3).sum(dim=2)
        take = near_ok[x] & (3 * overlap > 2 * half_size[y])
        extra = torch.where(take[..., None] & half_ok[y], half_near[y], -1)
        candidates = torch.cat([members, extra.flatten(1)], dim=1)
        candidates = torch.sort(candidates, dim=1).values
        keep = candidates >= 0
        keep[:, 1:] &= candidates[:, 1:] != candidates[:, :-1]
        rows.append(x[:, None].expand_as(candidates)[keep])
        cols.append(candidates[keep])
    return torch.cat(rows), torch.cat(cols)


def _pair_distance(q_prep, item_prep, ranked, ranked_dist, rows, cols, block=65536):
    """d(rows[i], cols[i]) (unscaled): looked up in the stored top of each ranking, and
    computed from the `_prepare`d features only for the few pairs found deeper."""
    out = torch.empty(len(rows), device=q_prep.device)
    for i in range(0, len(rows), block):
        r, c = rows[i:i + block], cols[i:i + block]
        hit = ranked[r] == c[:, None]
        found = hit.any(dim=1)
        out[i:i + block] = ranked_dist[r].gather(1, hit.int().argmax(dim=1, keepdim=True))[:, 0]
        deep = (~found).nonzero().squeeze(1)
        r, c = r[deep], c[deep]
        out[i + deep] = _rowwise_distance(q_prep[r], item_prep[c])
    return out


def _csr_offsets(rows, n):
    """Start offset of each row in a row-sorted entry list, plus the counts."""
    counts = torch.bincount(rows, minlength=n)
    return counts.cumsum(0) - counts, counts


def _gather_segments(starts, counts):
    """For segments [starts[i], starts[i] + counts[i]): (segment id, position) per element."""
    seg = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    first = counts.cumsum(0) - counts
    pos = starts[seg] + torch.arange(len(seg), device=counts.device) - first[seg]
    return seg, pos


def _query_expansion(rows, cols, vals, ranked, k2, n):
    """V_x <- mean of V_y over the first k2 items of x's ranking; sparse in, sparse out."""
    starts, counts = _csr_offsets(rows, n)
    nearest = ranked[:, :k2]                                 # (N, k2) rows to average
    seg, pos = _gather_segments(starts[nearest.flatten()], counts[nearest.flatten()])
    new_rows = seg // nearest.shape[1]
    keys = new_rows * n + cols[pos]
    keys, inverse = torch.unique(keys, return_inverse=True)  # sorted by (row, col)
    new_vals = torch.zeros(len(keys), dtype=vals.dtype, device=vals.device)
    new_vals.index_add_(0, inverse, vals[pos] / nearest.shape[1])
    return keys // n, keys % n, new_vals


def _jaccard(rows, cols, vals, num_query, n, max_pairs=1 << 22):
    """(Q, G) float32 Jaccard distances between query rows and gallery rows of sparse V."""
    num_gallery = n - num_query
    is_query = rows < num_query
    q_rows, q_cols, q_vals = rows[is_query], cols[is_query], vals[is_query]
    g_rows, g_cols, g_vals = rows[~is_query] - num_query, cols[~is_query], vals[~is_query]
    by_col = torch.argsort(g_cols, stable=True)  # inverted index: gallery entries per column
    g_rows, g_cols, g_vals = g_rows[by_col], g_cols[by_col], g_vals[by_col]
    col_starts, col_counts = _csr_offsets(g_cols, n)
    min_sum = torch.zeros(num_query * num_gallery, dtype=torch.float32, device=vals.device)
    # Chunk the query entries so that at most ~max_pairs shared non-zeros live at once.
    pairs_per_entry = col_counts[q_cols]
    chunk_id = torch.div(pairs_per_entry.cumsum(0), max_pairs, rounding_mode="floor")
    for c in torch.unique(chunk_id):
        sel = (chunk_id == c).nonzero().squeeze(1)
        seg, pos = _gather_segments(col_starts[q_cols[sel]], col_counts[q_cols[sel]])
        shared = torch.minimum(q_vals[sel][seg], g_vals[pos])
        min_sum.index_add_(0, q_rows[sel][seg] * num_gallery + g_rows[pos], shared)
    min_sum = min_sum.view(num_query, num_gallery)
    q_sums = torch.zeros(num_query, device=vals.device).index_add_(0, q_rows, q_vals)
    g_sums = torch.zeros(num_gallery, device=vals.device).index_add_(0, g_rows, g_vals)
    # In place, a slab of rows at a time: a whole (Q, G) Σ max would be one more matrix of the
    # result's size (3.8 GB at MSMT17 scale).
    rows = max(1, (1 << 24) // max(1, num_gallery))
    for start in range(0, num_query, rows):
        slab = min_sum[start:start + rows]
        # Σ max = Σ V_q + Σ V_g − Σ min, since max(a, b) + min(a, b) = a + b.
        max_sum = slab.neg().add_(q_sums[start:start + rows, None]).add_(g_sums[None, :])
        # Two empty rows (no k-reciprocal neighbour: k2 = 1 and more than k1 + 1 equal features)
        # share nothing: distance 1, as the authors' code gives, not 0 / 0 = NaN.
        slab.div_(max_sum.clamp_min_(torch.finfo(max_sum.dtype).tiny)).neg_().add_(1.0)
    return min_sum


def re_ranking(query_feats, gallery_feats, k1=20, k2=6, lambda_value=0.3, *,
               metric="euclidean"):
    """k-reciprocal re-ranked (Q, G) distances (see the module docstring).

    query_feats (Q, D), gallery_feats (G, D): arrays or tensors, used as given (normalise
    them first if wanted). Runs on the features' device. Returns float32: a numpy array
    for numpy input, else a tensor on that device.
    """
    _check_metric(metric)
    if k1 < 1 or k2 < 1 or not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"re-ranking needs k1 >= 1, k2 >= 1 and 0 <= lambda_value <= 1; "
                         f"got k1={k1}, k2={k2}, lambda_value={lambda_value}")
    as_numpy = not isinstance(query_feats, torch.Tensor)
    q = _as_float_tensor(query_feats, None)
    feats = torch.cat([q, _as_float_tensor(gallery_feats, q.device)])
    n, num_query = len(feats), len(q)
    k1, k2 = min(k1, n - 1), min(k2, n)
    q_prep, item_prep = _prepare(feats, metric, "query"), _prepare(feats, metric, "item")
    del feats

    # Pass over row blocks: the top of every ranking (3(k1+1) deep, which holds nearly all
    # of R*(x, k1)) with its distances, row maxima, and d(q, g).
    depth = min(n, max(3 * (k1 + 1), k2))
    ranked, ranked_dist, row_max, query_dist = [], [], [], []
    rows_per_block, duplicates = _gemm_rows(n, n), _duplicate_items(item_prep)
    for start in range(0, n, rows_per_block):
        block = slice(start, start + rows_per_block)
        dist = _distance(q_prep[block], item_prep, rows_per_block, duplicates)
        ranked.append(stable_topk(dist, depth))
        ranked_dist.append(dist.gather(1, ranked[-1]))
        row_max.append(dist.amax(dim=1).clamp_min(1e-12))
        if start < num_query:
            query_dist.append(dist[:num_query - start, num_query:].clamp_min(0)
                              / row_max[-1][:num_query - start, None])
    ranked, ranked_dist, row_max = torch.cat(ranked), torch.cat(ranked_dist), torch.cat(row_max)
    query_dist = torch.cat(query_dist)

    rows, cols = _expanded_sets(ranked, k1)
    pair_dist = _pair_distance(q_prep, item_prep, ranked, ranked_dist, rows, cols)
    del q_prep, item_prep  # two copies of all N features (1.5 GB at MSMT17 scale): not needed any more
    weights = torch.exp(-(pair_dist.clamp_min(0) / row_max[rows]))
    row_sums = torch.zeros(n, device=ranked.device).index_add_(0, rows, weights)
    vals = weights / row_sums[rows]
    if k2 > 1:
        rows, cols, vals = _query_expansion(rows, cols, vals, ranked, k2, n)
    final = _jaccard(rows, cols, vals, num_query, n).mul_(1.0 - lambda_value)
    final.add_(query_dist, alpha=lambda_value)
    return final.cpu().numpy() if as_numpy else final
