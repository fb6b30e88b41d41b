"""Tests of utils/eval_reid.py: hand-computed cases, differential tests against the slow
references (eval_func, and a centroid reference written here), and bad inputs."""
import warnings

import numpy as np
import pytest
import torch

from conftest import expanded_by_hand
from utils import eval_reid
from utils.eval_reid import eval_func, evaluate, format_metrics, pairwise_distance, query_expansion


# ------------------------------------------------------------------ test helpers

def reference_minp(distmat, q_pids, g_pids, q_camids, g_camids):
    """(mINP, number of valid queries) by the definition: per valid query,
    R / (1-based position of the last true match in the filtered ranking)."""
    inps = []
    for q in range(len(distmat)):
        order = np.argsort(distmat[q], kind="stable")
        removed = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
        hits = g_pids[order][~removed] == q_pids[q]
        if hits.any():
            inps.append(hits.sum() / (np.flatnonzero(hits)[-1] + 1))
    return float(np.mean(inps)), len(inps)


def make_reid_data(seed, num_q=40, num_g=160, dim=8, num_ids=12, quantised=False):
    """Random labelled features with junk (same pid and camera), distractors (pid 0),
    queries without a valid match, a query id absent from the gallery, and exact ties."""
    rng = np.random.default_rng(seed)
    g_pids = rng.integers(0, num_ids, num_g)          # pid 0 = distractors
    q_pids = rng.integers(1, num_ids + 1, num_q)      # id num_ids: never in the gallery
    g_camids, q_camids = rng.integers(0, 3, num_g), rng.integers(0, 3, num_q)
    g_camids[g_pids == 5] = 1                        # pid 5 seen by camera 1 only ...
    q_pids[:3], q_camids[:3] = 5, 1                  # ... so these queries are invalid
    if quantised:  # few distinct values: many exactly equal distances
        g_feats = rng.integers(-1, 2, (num_g, dim)).astype(np.float32)
        q_feats = rng.integers(-1, 2, (num_q, dim)).astype(np.float32)
    else:
        g_feats = rng.standard_normal((num_g, dim)).astype(np.float32)
        q_feats = rng.standard_normal((num_q, dim)).astype(np.float32)
    g_feats[10:16] = g_feats[0]  # duplicated rows with other pids: exact ties
    return q_feats, g_feats, q_pids, g_pids, q_camids, g_camids


def metrics_from_hits(hits, max_rank):
    """AP, INP and the CMC row of one query from its filtered hit flags."""
    positions = np.flatnonzero(hits) + 1
    ap = np.mean(np.arange(1, len(positions) + 1) / positions)
    cmc = (np.arange(1, max_rank + 1) >= positions[0]).astype(np.float64)
    return ap, len(positions) / positions[-1], cmc


def reference_centroid_eval(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids,
                            metric, feat_norm, camera_aware, max_rank=50):
    """Slow, obvious centroid evaluation in float64: per query, build its gallery list."""
    ids = np.unique(g_pids[g_pids > 0])
    singles = np.flatnonzero(g_pids <= 0)
    aps, inps, cmcs = [], [], []
    for i in range(len(q_feats)):
        items, pids = [], []
        for pid in ids:                      # one centroid per identity, ascending pid
            rows = g_pids == pid
            if camera_aware and pid == q_pids[i]:
                rows &= g_camids != q_camids[i]
                if not rows.any():
                    continue
            items.append(g_feats[rows].astype(np.float64).mean(axis=0))
            pids.append(pid)
        for j in singles:                    # distractors stay individual items
            if camera_aware and g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i]:
                continue
            items.append(g_feats[j].astype(np.float64))
            pids.append(g_pids[j])
        items, q = np.array(items), q_feats[i].astype(np.float64)
        if feat_norm or metric == "cosine":
            items = items / np.maximum(np.linalg.norm(items, axis=1, keepdims=True), 1e-12)
            q = q / max(np.linalg.norm(q), 1e-12)
        dist = 1 - items @ q if metric == "cosine" else ((items - q) ** 2).sum(axis=1)
        hits = np.array(pids)[np.argsort(dist, kind="stable")] == q_pids[i]
        if hits.any():
            ap, inp, cmc = metrics_from_hits(hits, max_rank)
            aps.append(ap), inps.append(inp), cmcs.append(cmc)
    return float(np.mean(aps)), float(np.mean(inps)), np.mean(cmcs, axis=0), len(aps)


# --------------------------------------------------------------- hand-computed cases

def test_hand_computed_ap_cmc_minp():
    # Query pid 1 camera 0 at x=0; gallery at x=1..5, squared distances 1, 4, 9, 16, 25.
    # pids (1, 2, 1, 3, 1), cameras (0, 1, 1, 1, 1): item 0 is junk (same pid and camera)
    # and is removed. Filtered ranking: pid 2, pid 1, pid 3, pid 1 -> hits at positions 2
    # and 4: AP = (1/2 + 2/4) / 2 = 0.5, CMC = 0, 1, 1, ..., INP = 2 / 4 = 0.5.
    q_feats, g_feats = np.zeros((1, 1), np.float32), np.arange(1, 6, dtype=np.float32)[:, None]
    labels = ([1], [1, 2, 1, 3, 1], [0], [0, 1, 1, 1, 1])
    result = evaluate(q_feats, g_feats, *labels, feat_norm=False, max_rank=6)
    assert result["mAP"] == pytest.approx(0.5) and result["mINP"] == pytest.approx(0.5)
    np.testing.assert_array_equal(result["cmc"], [0, 1, 1, 1, 1, 1])
    cmc, mAP = eval_func(pairwise_distance(q_feats, g_feats), *map(np.array, labels), max_rank=6)
    assert mAP == pytest.approx(0.5)
    np.testing.assert_array_equal(cmc, [0, 1, 1, 1, 1, 1])  # 4 items kept: padded with 1


def test_ties_are_broken_by_gallery_index():
    # Squared distances 1, 1, 4, 4 (x = 1, -1, 2, -2); pids (2, 1, 3, 1), other cameras.
    # By index: pid 2, pid 1, pid 3, pid 1 -> AP = (1/2 + 2/4) / 2 = 0.5.
    # Any other tie order (1 before 0, 3 before 2) would give (1 + 2/3) / 2 = 0.833.
    q_feats = np.zeros((1, 1), np.float32)
    g_feats = np.array([[1], [-1], [2], [-2]], np.float32)
    labels = (np.array([1]), np.array([2, 1, 3, 1]), np.array([0]), np.array([1, 1, 1, 1]))
    _, mAP = eval_func(pairwise_distance(q_feats, g_feats), *labels)
    result = evaluate(q_feats, g_feats, *labels, feat_norm=False, return_topk=4)
    assert mAP == pytest.approx(0.5) and result["mAP"] == pytest.approx(0.5)
    assert result["cmc"][0] == 0.0 and result["mINP"] == pytest.approx(0.5)
    np.testing.assert_array_equal(result["topk_indices"], [[0, 1, 2, 3]])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("shape", [(300, 41, 16), (1200, 130, 70)])
def test_duplicate_gallery_images_tie_exactly(metric, shape):
    # numpy's OpenBLAS gives equal gallery rows distances that differ in the last bit for
    # some queries (at both shapes here); evaluation must still see an exact tie, so
    # the copy with the higher index ranks right after the first one.
    num_g, num_q, dim = shape
    rng = np.random.default_rng(5)
    g_feats = rng.standard_normal((num_g, dim)).astype(np.float32)
    copies = [7, 100, num_g - 5]
    g_feats[copies] = g_feats[3]
    q_feats = rng.standard_normal((num_q, dim)).astype(np.float32)
    q_feats[0] = g_feats[3] + 0.01
    dist = pairwise_distance(q_feats, g_feats, metric, feat_norm=True).numpy()
    for col in copies:
        np.testing.assert_array_equal(dist[:, col], dist[:, 3])
    g_pids = np.arange(1, num_g + 1)
    result = evaluate(q_feats, g_feats, np.full(num_q, 4), g_pids, np.zeros(num_q, int),
                      np.ones(num_g, int), metric=metric, return_topk=4)
    np.testing.assert_array_equal(result["topk_indices"][0], [3, 7, 100, num_g - 5])


def test_camera_unaware_standard_mode_removes_nothing():
    # Same as the hand-computed case, but nothing removed: hits at 1, 3, 5 ->
    # AP = (1 + 2/3 + 3/5) / 3 = 0.7556, INP = 3/5.
    q_feats, g_feats = np.zeros((1, 1), np.float32), np.arange(1, 6, dtype=np.float32)[:, None]
    result = evaluate(q_feats, g_feats, [1], [1, 2, 1, 3, 1], [0], [0, 1, 1, 1, 1],
                      feat_norm=False, camera_aware=False)
    assert result["mAP"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert result["mINP"] == pytest.approx(0.6) and result["cmc"][0] == 1.0


def test_format_metrics_uses_last_cmc_value_beyond_max_rank():
    metrics = format_metrics({"mAP": 0.5, "mINP": 0.25, "cmc": np.array([0.1, 0.2, 0.3])})
    assert metrics == {"mAP": 0.5, "mINP": 0.25, "rank1": 0.1, "rank5": 0.3,
                       "rank10": 0.3, "rank20": 0.3, "rank50": 0.3}
    assert all(type(v) is float for v in metrics.values())


# ------------------------------------------------------ standard mode, differential

@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("feat_norm", [False, True])
@pytest.mark.parametrize("quantised", [False, True])
def test_evaluate_matches_eval_func(metric, feat_norm, quantised):
    q_feats, g_feats, *labels = make_reid_data(seed=7, quantised=quantised)
    distmat = pairwise_distance(q_feats, g_feats, metric, feat_norm=feat_norm).numpy()
    if quantised:
        assert len(np.unique(distmat[0])) < distmat.shape[1] / 3  # the ties are really there
    cmc, mAP = eval_func(distmat, *labels)
    result = evaluate(q_feats, g_feats, *labels, metric=metric, feat_norm=feat_norm)
    assert abs(result["mAP"] - mAP) < 1e-6
    np.testing.assert_allclose(result["cmc"], cmc, atol=1e-6)
    assert result["cmc"].dtype == np.float64 and len(result["cmc"]) == 50
    mINP, num_valid = reference_minp(distmat, *labels)
    assert abs(result["mINP"] - mINP) < 1e-6
    assert result["num_valid_queries"] == num_valid <= 40 - 3 - np.sum(labels[0] == 12)


@pytest.mark.parametrize("seed", range(5))
def test_integer_features_rank_like_exact_distances(seed):
    """Integer-valued features have exact squared Euclidean distances: evaluate must rank
    them exactly as the float64 loop does, equal distances by gallery index (a squared norm
    taken as vector_norm() ** 2 is an ulp off and broke such ties)."""
    q_feats, g_feats, *labels = make_reid_data(seed=seed, quantised=True)
    q_feats, g_feats = 3 * q_feats + 1, 2 * g_feats - 1  # norms that are not powers of two
    exact = ((q_feats[:, None, :].astype(np.float64) - g_feats[None, :, :]) ** 2).sum(-1)
    cmc, mAP = eval_func(exact, *labels)
    result = evaluate(q_feats, g_feats, *labels, feat_norm=False)
    assert result["mAP"] == pytest.approx(mAP, abs=1e-9)
    np.testing.assert_allclose(result["cmc"], cmc, atol=1e-9)
    assert result["mINP"] == pytest.approx(reference_minp(exact, *labels)[0], abs=1e-9)


def test_two_equally_distant_items_rank_by_index():
    q = np.array([[-1.0, -1.0]], np.float32)
    g = np.array([[-2.0, 0.0], [0.0, 0.0]], np.float32)  # both at squared distance 2
    assert evaluate(q, g, [1], [1, 2], [0], [1, 1], feat_norm=False)["mAP"] == 1.0
    assert evaluate(q, g[::-1], [1], [2, 1], [0], [1, 1], feat_norm=False)["mAP"] == 0.5


def test_numpy_views_torch_cannot_wrap_are_accepted(tmp_path):
    """Reversed views, big-endian arrays and read-only memory maps give the same numbers
    as plain arrays, without a warning."""
    q_feats, g_feats, q_pids, g_pids, q_camids, g_camids = make_reid_data(seed=2)
    plain = evaluate(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids)
    np.save(tmp_path / "g.npy", g_feats)
    variants = {
        "reversed": (q_feats, g_feats[::-1].copy()[::-1], q_pids[::-1].copy()[::-1], g_pids, q_camids, g_camids),
        "big-endian": (q_feats.astype(">f4"), g_feats, q_pids.astype(">i8"), g_pids, q_camids, g_camids),
        "memmap": (q_feats, np.load(tmp_path / "g.npy", mmap_mode="r"), q_pids, g_pids, q_camids, g_camids),
    }
    for name, args in variants.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = evaluate(*args)
        assert result["mAP"] == plain["mAP"], name
        np.testing.assert_array_equal(result["cmc"], plain["cmc"])
    # A reversed gallery is another gallery order: same metrics as its copy.
    reversed_args = (q_feats, g_feats[::-1], q_pids, g_pids[::-1], q_camids, g_camids[::-1])
    copied_args = tuple(np.ascontiguousarray(a) for a in reversed_args)
    assert evaluate(*reversed_args)["mAP"] == evaluate(*copied_args)["mAP"]


@pytest.mark.parametrize("case, match", [
    ("long gallery labels", "does not fit"), ("short gallery labels", "does not fit"),
    ("nan", "NaN"), ("max_rank 0", "max_rank")])
def test_eval_func_rejects_bad_input(case, match):
    distmat = np.arange(6, dtype=np.float32).reshape(2, 3)
    args = [distmat, [1, 2], [1, 2, 2], [0, 0], [1, 1, 1]]
    kwargs = {}
    if case == "long gallery labels":
        args[2], args[4] = [1, 2, 2, 3], [1, 1, 1, 1]
    elif case == "short gallery labels":
        args[2], args[4] = [1, 2], [1, 1]
    elif case == "nan":
        distmat[1, 2] = np.nan
    else:
        kwargs["max_rank"] = 0
    with pytest.raises(ValueError, match=match):
        eval_func(*args, **kwargs)


@pytest.mark.parametrize("block_elements", [160 * 7, 2 ** 26])  # 6 padded products / 1
def test_query_chunk_size_does_not_change_results(monkeypatch, block_elements):
    monkeypatch.setattr(eval_reid, "BLOCK_ELEMENTS", block_elements)
    q_feats, g_feats, *labels = make_reid_data(seed=3, quantised=True)
    results = [evaluate(q_feats, g_feats, *labels, query_chunk_size=size, return_topk=5)
               for size in (1, 7, None)]
    for other in results[1:]:
        assert other["mAP"] == results[0]["mAP"] and other["mINP"] == results[0]["mINP"]
        np.testing.assert_array_equal(other["cmc"], results[0]["cmc"])
        np.testing.assert_array_equal(other["topk_indices"], results[0]["topk_indices"])
    cmc, mAP = eval_func(pairwise_distance(q_feats, g_feats, feat_norm=True).numpy(), *labels)
    assert abs(results[0]["mAP"] - mAP) < 1e-6
    np.testing.assert_allclose(results[0]["cmc"], cmc, atol=1e-6)


def test_torch_tensors_give_the_same_result_as_numpy():
    q_feats, g_feats, *labels = make_reid_data(seed=4)
    from_numpy = evaluate(q_feats, g_feats, *labels)
    from_torch = evaluate(torch.from_numpy(q_feats), torch.from_numpy(g_feats),
                          *(torch.from_numpy(x) for x in labels))
    assert from_torch["mAP"] == from_numpy["mAP"]
    np.testing.assert_array_equal(from_torch["cmc"], from_numpy["cmc"])


def test_topk_lists_the_filtered_ranking():
    q_feats, g_feats, q_pids, g_pids, q_camids, g_camids = make_reid_data(seed=5, quantised=True)
    distmat = pairwise_distance(q_feats, g_feats, feat_norm=True).numpy()
    topk = evaluate(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids,
                    return_topk=10)["topk_indices"]
    for q in range(len(q_feats)):
        order = np.argsort(distmat[q], kind="stable")
        junk = (g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])
        np.testing.assert_array_equal(topk[q], order[~junk][:10])


def test_short_gallery_pads_cmc_with_last_value():
    q_feats, g_feats, *labels = make_reid_data(seed=6, num_q=10, num_g=20)
    result = evaluate(q_feats, g_feats, *labels, max_rank=50)
    cmc, mAP = eval_func(pairwise_distance(q_feats, g_feats, feat_norm=True).numpy(), *labels)
    np.testing.assert_allclose(result["cmc"], cmc, atol=1e-12)
    assert result["cmc"][-1] == 1.0 and result["mAP"] == pytest.approx(mAP, abs=1e-12)


# ----------------------------------------------------------------- centroid mode

@pytest.mark.parametrize("metric,feat_norm", [("euclidean", True), ("euclidean", False),
                                              ("cosine", False)])
@pytest.mark.parametrize("camera_aware", [True, False])
def test_centroid_mode_matches_slow_reference(metric, feat_norm, camera_aware):
    q_feats, g_feats, *labels = make_reid_data(seed=11, num_q=50, num_g=200, dim=6)
    result = evaluate(q_feats, g_feats, *labels, metric=metric, feat_norm=feat_norm,
                      use_centroids=True, camera_aware=camera_aware)
    mAP, mINP, cmc, num_valid = reference_centroid_eval(
        q_feats, g_feats, *labels, metric=metric, feat_norm=feat_norm, camera_aware=camera_aware)
    assert result["num_valid_queries"] == num_valid
    assert abs(result["mAP"] - mAP) < 1e-6 and abs(result["mINP"] - mINP) < 1e-6
    np.testing.assert_allclose(result["cmc"], cmc, atol=1e-6)
    num_distractors = int(np.sum(labels[1] == 0))
    assert result["num_gallery_items"] == len(np.unique(labels[1][labels[1] > 0])) + num_distractors


@pytest.mark.parametrize("use_centroids", [False, True])
def test_evaluate_emits_no_warning(use_centroids):
    # torch 2.11 warned "Sparse invariant checks are implicitly disabled ... SEGFAULT" on
    # every centroid evaluation, from the sparse product that builds the centroids.
    q_feats, g_feats, *labels = make_reid_data(seed=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(q_feats, g_feats, *labels, use_centroids=use_centroids)


def test_camera_exclusion_uses_gallery_cameras():
    # The original looked gallery cameras up at gallery-local indices in the combined
    # query+gallery array, i.e. here it read the query cameras (1, 0) for g0 and g1, and
    # built each query's centroid from its SAME-camera image (distance 0): mAP 1.
    # Correct: q0 (x=10, cam 1) gets pid 1's cam-0 image g0 (x=-10, distance 400), and
    # pid 2's centroid (x=0, distance 100) ranks first: AP 0.5; q1 symmetrically.
    q_feats = np.array([[10], [-10]], np.float32)
    g_feats = np.array([[-10], [10], [0], [0]], np.float32)
    result = evaluate(q_feats, g_feats, [1, 1], [1, 1, 2, 2], [1, 0], [0, 1, 0, 1],
                      feat_norm=False, use_centroids=True, camera_aware=True)
    assert result["mAP"] == pytest.approx(0.5) and result["cmc"][0] == 0.0


def test_gallery_only_identity_keeps_its_centroid():
    # pid 7 has no query; its centroid (x=1) is nearer to the query (x=0) than the true
    # match (x=2), so the correct AP is 1/2. Dropping pid 7 would give AP 1.
    q_feats = np.zeros((1, 1), np.float32)
    g_feats = np.array([[2], [2], [1], [1]], np.float32)
    for camera_aware in (True, False):
        result = evaluate(q_feats, g_feats, [3], [3, 3, 7, 7], [0], [1, 2, 0, 1],
                          feat_norm=False, use_centroids=True, camera_aware=camera_aware,
                          return_topk=2)
        assert result["mAP"] == pytest.approx(0.5) and result["num_gallery_items"] == 2
        top_pids = result["gallery_item_pids"][result["topk_indices"][0]]
        np.testing.assert_array_equal(top_pids, [7, 3])


def test_distractors_stay_individual_items():
    # Distractors (pid 0) at x = 1, 50, 60 and a junk image (pid -1) at 70; the query
    # (x=0) has its match at x=3. The distractor at x=1 outranks it: AP 1/2. Pooled into
    # one "pid 0" centroid (x=37) they would not: AP 1.
    q_feats = np.zeros((1, 1), np.float32)
    g_feats = np.array([[3], [1], [50], [60], [70]], np.float32)
    result = evaluate(q_feats, g_feats, [4], [4, 0, 0, 0, -1], [0], [1, 0, 0, 0, 0],
                      feat_norm=False, use_centroids=True, return_topk=5)
    assert result["mAP"] == pytest.approx(0.5) and result["num_gallery_items"] == 5
    np.testing.assert_array_equal(result["gallery_item_pids"], [4, 0, 0, 0, -1])
    np.testing.assert_array_equal(result["gallery_item_representative"], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(result["topk_indices"][0], [1, 0, 2, 3, 4])


def test_query_without_other_camera_images_is_skipped_in_centroid_mode():
    # q0's pid 2 is only seen by q0's camera in the gallery: no true match, skipped.
    q_feats = np.array([[0], [5]], np.float32)
    g_feats = np.array([[1], [4], [6]], np.float32)
    result = evaluate(q_feats, g_feats, [2, 3], [2, 3, 3], [0, 0], [0, 1, 2],
                      feat_norm=False, use_centroids=True)
    assert result["num_valid_queries"] == 1 and np.isnan(result["query_ap"][0])
    assert result["mAP"] == 1.0


def test_camera_excluded_centroid_is_the_mean_of_the_other_images():
    """The own centroid without the query's camera is the mean of exactly those images: a
    full sum minus the camera's sum loses a small image beside a large one (here
    (1e7 + 0.0625) - 1e7 = 0 in float32) and ranked pid 2 first."""
    q_feats = np.array([[0.0625, 0.0]], np.float32)
    g_feats = np.array([[1e7, 1e7], [0.0625, 0.0], [0.09375, 0.0]], np.float32)
    result = evaluate(q_feats, g_feats, [1], [1, 1, 2], [0], [0, 1, 1], feat_norm=False, use_centroids=True)
    assert result["mAP"] == 1.0


# ----------------------------------------------------------------------- devices

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("use_centroids", [False, True])
def test_gpu_result_equals_cpu_result(use_centroids):
    q_feats, g_feats, *labels = make_reid_data(seed=12, num_q=300, num_g=2000, dim=64)
    cpu = evaluate(q_feats, g_feats, *labels, use_centroids=use_centroids, return_topk=5)
    gpu = evaluate(torch.from_numpy(q_feats).cuda(), torch.from_numpy(g_feats).cuda(),
                   *labels, use_centroids=use_centroids, return_topk=5)
    assert abs(gpu["mAP"] - cpu["mAP"]) < 1e-6 and abs(gpu["mINP"] - cpu["mINP"]) < 1e-6
    np.testing.assert_allclose(gpu["cmc"], cpu["cmc"], atol=1e-6)
    np.testing.assert_array_equal(gpu["topk_indices"], cpu["topk_indices"])


# -------------------------------------------------------------------- bad inputs

def _good_inputs():
    q_feats, g_feats, *labels = make_reid_data(seed=1, num_q=6, num_g=20)
    return [q_feats, g_feats, *labels]


@pytest.mark.parametrize("position,name,feats_name", [(2, "q_pids", "query_feats"),
                                                      (5, "g_camids", "gallery_feats")])
def test_length_mismatch_names_the_arrays(position, name, feats_name):
    args = _good_inputs()
    args[position] = args[position][:-1]
    with pytest.raises(ValueError, match=rf"{name} has \d+ entries but {feats_name} has \d+ rows"):
        evaluate(*args)


@pytest.mark.parametrize("side,position,value", [("query", 0, np.nan), ("gallery", 1, np.inf)])
def test_nonfinite_features_are_reported(side, position, value):
    args = _good_inputs()
    args[position] = args[position].copy()
    args[position][[2, 4], 1] = value
    with pytest.raises(ValueError, match=rf"{side} features contain NaN or inf in 2 of "
                                         rf"\d+ rows \(first bad row: 2\)"):
        evaluate(*args)


def test_empty_gallery_is_reported():
    args = _good_inputs()
    args[1], args[3], args[5] = args[1][:0], args[3][:0], args[5][:0]
    with pytest.raises(ValueError, match="gallery is empty"):
        evaluate(*args)


def test_no_valid_query_is_reported():
    q_feats, g_feats = np.zeros((2, 3), np.float32), np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="no valid query: none of the 2 queries"):
        evaluate(q_feats, g_feats, [1, 2], [1, 1, 3, 3], [0, 0], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="no query has a true match"):
        eval_func(np.zeros((2, 4)), np.array([1, 2]), np.array([1, 1, 3, 3]),
                  np.array([0, 0]), np.array([0, 0, 1, 1]))


def test_unknown_metric_is_reported():
    with pytest.raises(ValueError, match="unknown metric 'manhattan'.*euclidean, cosine"):
        evaluate(*_good_inputs(), metric="manhattan")


def test_rerank_in_centroid_mode_is_refused():
    with pytest.raises(ValueError, match="re-ranking applies to the standard mode only"):
        evaluate(*_good_inputs(), use_centroids=True, rerank=True)


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 64, 1003])
def test_flat_true_lists_the_true_entries(length):
    rng = np.random.default_rng(length)
    for density in (0.0, 0.01, 0.5, 1.0):
        mask = torch.from_numpy(rng.random(length) < density)
        np.testing.assert_array_equal(eval_reid._flat_true(mask).numpy(), np.flatnonzero(mask.numpy()))


def test_duplicate_items_are_found_exactly_even_when_keys_collide():
    rng = np.random.default_rng(2)
    items = torch.from_numpy(rng.standard_normal((50, 12)).astype(np.float32))
    items[10] = items[4]
    items[33] = items[4]
    items[20, [0, 4, 8, 10, 11]] = items[7, [0, 4, 8, 10, 11]]  # same key columns, other values
    items[41] = items[20]
    dup, src = eval_reid._duplicate_items(items)
    found = sorted(zip(dup.tolist(), src.tolist()))
    expected = sorted((i, j) for i in range(50) for j in range(i)
                      if torch.equal(items[i], items[j]) and not any(torch.equal(items[j], items[m]) for m in range(j)))
    assert found == expected == [(10, 4), (33, 4), (41, 20)]
    assert eval_reid._duplicate_items(items[:5]) is None


@pytest.mark.parametrize("shape", [(1000, 2050), (3, 7), (300, 1)])
def test_squared_norms_are_the_originals_sum_of_squares(shape):
    """Bit-equal to x.pow(2).sum(1), the original's formula (within 2 ulps of float64): a BLAS dot
    (bmm) is up to 20 ulps off and flipped a near-tie of the Market-sized benchmark against both
    the original and float64."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    assert torch.equal(eval_reid._row_sqnorms(x), x.pow(2).sum(1))


# ----------------------------------------------------------------------------- query expansion
@pytest.mark.parametrize("k,alpha", [(1, 0.0), (3, 3.0), (4, 0.5), (50, 3.0)])
def test_query_expansion_matches_a_by_hand_reference(k, alpha):
    rng = np.random.default_rng(k)
    query = rng.normal(size=(9, 6)).astype(np.float32)
    gallery = rng.normal(size=(12, 6)).astype(np.float32)
    gallery[7] = gallery[2]  # a tie: the lower index comes first
    gallery[5] = 3 * query[0]  # a neighbour at similarity 1 (scale does not matter)
    expanded, normalised = query_expansion(query, gallery, k, alpha)
    np.testing.assert_allclose(expanded.numpy(), expanded_by_hand(query.astype(np.float64),
                                                                    gallery.astype(np.float64), k, alpha), atol=1e-5)
    np.testing.assert_allclose(normalised.numpy(), gallery / np.linalg.norm(gallery, axis=1, keepdims=True), atol=1e-6)
    chunked, _ = query_expansion(query, gallery, k, alpha, query_chunk_size=2)
    np.testing.assert_allclose(chunked.numpy(), expanded.numpy(), atol=1e-6)  # chunks of 2 queries: the same


def test_query_expansion_rejects_bad_parameters():
    features = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="k >= 1"):
        query_expansion(features, features, 0)
    with pytest.raises(ValueError, match="alpha >= 0"):
        query_expansion(features, features, 2, alpha=-1.0)
