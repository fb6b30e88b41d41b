"""Tests of utils/reranking.py against a dense float64 reference written from the paper, with the
authors' released code's three choices (strict > 2/3, h = k1/2 half to even, no expansion at k2 = 1)."""
import numpy as np
import pytest
import torch

from utils.eval_reid import eval_func, evaluate
from utils.reranking import re_ranking


def dense_re_ranking(q_feats, g_feats, k1, k2, lambda_value, metric="euclidean"):
    """Slow, obvious k-reciprocal re-ranking with dense N × N matrices (float64)."""
    x = np.concatenate([q_feats, g_feats]).astype(np.float64)
    n, num_q = len(x), len(q_feats)
    if metric == "cosine":
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        dist = 1 - unit @ unit.T
    else:
        dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    dist = np.maximum(dist, 0) / dist.max(axis=1, keepdims=True)
    ranking = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i, k):
        return [j for j in ranking[i, :k + 1] if i in ranking[j, :k + 1]]

    half = int(np.around(k1 / 2))
    v = np.zeros((n, n))
    for i in range(n):
        r_i = reciprocal(i, k1)
        expanded = set(r_i)
        for j in r_i:
            r_j = reciprocal(j, half)
            if len(set(r_j) & set(r_i)) > 2 / 3 * len(r_j):
                expanded |= set(r_j)
        members = sorted(expanded)
        v[i, members] = np.exp(-dist[i, members])
        v[i] /= v[i].sum()
    if k2 > 1:
        v = np.array([v[ranking[i, :k2]].mean(axis=0) for i in range(n)])
    vq, vg = v[:num_q, None, :], v[None, num_q:, :]
    jaccard = 1 - np.minimum(vq, vg).sum(axis=2) / np.maximum(vq, vg).sum(axis=2)
    return (1 - lambda_value) * jaccard + lambda_value * dist[:num_q, num_q:]


def clustered(rng, num, dim, num_ids):
    pids = rng.integers(0, num_ids, num)
    centres = rng.standard_normal((num_ids, dim))
    return (centres[pids] + 0.7 * rng.standard_normal((num, dim))).astype(np.float32), pids


@pytest.mark.parametrize("metric,k1,k2,lambda_value", [("euclidean", 20, 6, 0.3),
                                                       ("euclidean", 7, 3, 0.0),
                                                       ("euclidean", 9, 2, 0.3),  # h: 4.5 -> 4
                                                       ("cosine", 11, 1, 0.5)])
def test_re_ranking_matches_dense_reference(metric, k1, k2, lambda_value):
    rng = np.random.default_rng(0)
    q_feats, _ = clustered(rng, 30, 16, 8)
    g_feats, _ = clustered(rng, 80, 16, 8)
    expected = dense_re_ranking(q_feats, g_feats, k1, k2, lambda_value, metric)
    got = re_ranking(q_feats, g_feats, k1, k2, lambda_value, metric=metric)
    assert got.shape == (30, 80) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_re_ranking_on_tensors_returns_a_tensor_with_the_same_values():
    rng = np.random.default_rng(1)
    q_feats, _ = clustered(rng, 12, 8, 4)
    g_feats, _ = clustered(rng, 40, 8, 4)
    from_numpy = re_ranking(q_feats, g_feats, k1=6, k2=3)
    from_torch = re_ranking(torch.from_numpy(q_feats), torch.from_numpy(g_feats), k1=6, k2=3)
    assert isinstance(from_torch, torch.Tensor)
    np.testing.assert_array_equal(from_torch.numpy(), from_numpy)


def test_evaluate_with_rerank_scores_the_re_ranked_distances():
    rng = np.random.default_rng(2)
    q_feats, q_pids = clustered(rng, 30, 16, 8)
    g_feats, g_pids = clustered(rng, 80, 16, 8)
    q_camids, g_camids = rng.integers(0, 2, 30), rng.integers(0, 2, 80)
    labels = (q_pids, g_pids, q_camids, g_camids)
    result = evaluate(q_feats, g_feats, *labels, feat_norm=False, rerank=True,
                      rerank_k1=9, rerank_k2=3, rerank_lambda=0.3)
    distmat = re_ranking(q_feats, g_feats, 9, 3, 0.3)
    cmc, mAP = eval_func(distmat, *labels)
    assert abs(result["mAP"] - mAP) < 1e-6
    np.testing.assert_allclose(result["cmc"], cmc, atol=1e-6)
    plain = evaluate(q_feats, g_feats, *labels, feat_norm=False)
    assert result["mAP"] != plain["mAP"]  # re-ranking really changed the ranking


def test_bad_parameters_are_reported():
    feats = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="k1 >= 1, k2 >= 1 and 0 <= lambda_value <= 1"):
        re_ranking(feats, feats, k1=0)


def test_items_without_reciprocal_neighbours_are_at_jaccard_distance_one_not_nan():
    """With k2 = 1 (no expansion) an item whose k1 + 1 nearest are all earlier copies of itself has
    an empty R*(x, k1). Two such rows share nothing: the authors' code gives Jaccard distance 1;
    0 / 0 gave NaN, and `evaluate(rerank=True)` then failed in torch.bincount."""
    same = np.ones((1, 2), np.float32)
    q_feats = np.concatenate([np.repeat(same, 4, axis=0), [[1.0, -1.0]]]).astype(np.float32)
    g_feats = np.concatenate([np.repeat(same, 2, axis=0), [[-1.0, 1.0], [1.0, -1.0]]]).astype(np.float32)
    got = re_ranking(q_feats, g_feats, k1=2, k2=1, lambda_value=0.0)
    assert np.isfinite(got).all()
    # query 3 and gallery 0, 1: equal features, both without any k-reciprocal neighbour
    np.testing.assert_array_equal(got[3, :2], [1.0, 1.0])
    result = evaluate(q_feats, g_feats, [1, 1, 1, 1, 2], [1, 1, 3, 2], [0] * 5, [1] * 4, feat_norm=False,
                      rerank=True, rerank_k1=2, rerank_k2=1, rerank_lambda=0.3)
    assert 0.0 < result["mAP"] <= 1.0 and result["num_valid_queries"] == 5
