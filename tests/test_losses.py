"""Every loss against a slow, obvious reference written here (loops over items)."""
import math

import pytest
import torch

from losses import (CenterLoss, batch_hard_triplet_loss, centroid_triplet_loss, cosine_dist, euclidean_dist,
                    label_smoothing_cross_entropy)


def ref_dist(a, b, kind):
    if kind == "euclidean":
        return math.sqrt(max(sum((x - y) ** 2 for x, y in zip(a, b)), 1e-12))
    dot = sum(x * y for x, y in zip(a, b))
    na = max(math.sqrt(sum(x * x for x in a)), 1e-12)
    nb = max(math.sqrt(sum(y * y for y in b)), 1e-12)
    return max(abs(1 - dot / (na * nb)), 1e-12)


def ref_triplet(feats, labels, margin, kind, soft, anchors=None, candidates=None):
    n = len(feats)
    anchors = anchors or [True] * n
    candidates = candidates or [True] * n
    terms = []
    for a in range(n):
        if not anchors[a]:
            continue
        pos = [ref_dist(feats[a], feats[j], kind) for j in range(n)
               if labels[j] == labels[a] and (candidates[j] or j == a)]
        neg = [ref_dist(feats[a], feats[j], kind) for j in range(n) if labels[j] != labels[a] and candidates[j]]
        if not neg:
            continue
        d = max(pos) - min(neg)
        terms.append(math.log1p(math.exp(d)) if soft else max(0.0, d + margin))
    return sum(terms) / len(terms) if terms else 0.0


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize("soft", [False, True])
def test_batch_hard_triplet_matches_reference(kind, soft):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 5, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    loss, _, _ = batch_hard_triplet_loss(feats, labels, margin=0.5, distance=kind, soft_margin=soft)
    expected = ref_triplet(feats.tolist(), labels.tolist(), 0.5, kind, soft)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_triplet_masks_exclude_mocks_as_anchor_and_candidate():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(8, 4, generator=g)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    real = torch.tensor([True, True, True, False, True, True, False, False])
    loss, _, _ = batch_hard_triplet_loss(feats, labels, margin=0.3, anchor_mask=real, candidate_mask=real)
    expected = ref_triplet(feats.tolist(), labels.tolist(), 0.3, "euclidean", False, real.tolist(), real.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    moved = feats.clone()
    moved[~real] = 100.0  # a mock far away would be the hardest positive if it were a candidate
    again, _, _ = batch_hard_triplet_loss(moved, labels, margin=0.3, anchor_mask=real, candidate_mask=real)
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)


def test_distances_match_reference():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
    for fn, kind in ((euclidean_dist, "euclidean"), (cosine_dist, "cosine")):
        d = fn(x, y)
        for i in range(4):
            for j in range(5):
                assert d[i, j].item() == pytest.approx(ref_dist(x[i].tolist(), y[j].tolist(), kind), rel=1e-5)


def test_label_smoothing_cross_entropy_matches_formula():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, generator=g)
    targets = torch.tensor([0, 3, 1, 1, 2, 0])
    eps, c = 0.1, 4
    total = 0.0
    for b in range(6):
        logz = math.log(sum(math.exp(v) for v in logits[b].tolist()))
        for k in range(c):
            q = (1 - eps) * (k == targets[b].item()) + eps / c
            total += -q * (logits[b, k].item() - logz)
    assert label_smoothing_cross_entropy(logits, targets, eps).item() == pytest.approx(total / 6, rel=1e-5)


def test_center_loss_matches_loop_and_trains_centers():
    torch.manual_seed(4)
    loss_fn = CenterLoss(num_classes=3, feat_dim=2)
    feats = torch.randn(5, 2)
    labels = torch.tensor([0, 2, 2, 1, 0])
    expected = sum(((feats[i] - loss_fn.centers[labels[i]]) ** 2).sum().item() for i in range(5)) / 5
    loss = loss_fn(feats, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert loss_fn.centers.grad is not None and loss_fn.centers.grad.abs().sum() > 0


def ref_ctl(feats, labels, real, k, margin, kind="euclidean"):
    """Literal reading of the CTL definition: per slot, queries vs leave-one-out centroids."""
    p = len(feats) // k
    split_losses = []
    for slot in range(k):
        queries, centroids, ids = [], [], []
        for ident in range(p):
            rows = [ident * k + j for j in range(k)]
            if not real[rows[slot]]:
                continue
            others = [r for j, r in enumerate(rows) if j != slot and real[r]]
            if not others:
                continue
            queries.append(feats[rows[slot]])
            centroids.append([sum(feats[r][d] for r in others) / len(others) for d in range(len(feats[0]))])
            ids.append(labels[rows[slot]])
        if len(ids) < 2:
            continue
        split_losses.append(ref_triplet(queries + centroids, ids + ids, margin, kind, False))
    return sum(split_losses) / len(split_losses) if split_losses else 0.0


@pytest.mark.parametrize("k", [3, 4])
def test_centroid_triplet_loss_matches_reference_with_mocks(k):
    g = torch.Generator().manual_seed(5)
    p = 4
    feats = torch.randn(p * k, 6, generator=g)
    labels = torch.arange(p).repeat_interleave(k)
    real = torch.ones(p * k, dtype=torch.bool)
    real[k - 1] = False  # identity 0 misses its last image
    real[2 * k - 2:2 * k] = False  # identity 1 misses two
    out = centroid_triplet_loss(feats, labels, real, num_instances=k, margin=0.5)
    expected = ref_ctl(feats.tolist(), labels.tolist(), real.tolist(), k, 0.5)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.num_splits == k
    moved = feats.clone()
    moved[~real] = 50.0  # mock images must not matter at all
    assert centroid_triplet_loss(moved, labels, real, num_instances=k, margin=0.5).loss.item() == pytest.approx(
        out.loss.item(), rel=1e-6)


def test_centroid_triplet_loss_query_is_left_out_of_its_centroid():
    # Two identities, K=2: the centroid of a query is exactly the identity's other image.
    feats = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [12.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    out = centroid_triplet_loss(feats, labels, torch.ones(4, dtype=torch.bool), num_instances=2, margin=0.5)
    # slot 0: queries 0 and 10, centroids 1 and 12 -> d_ap = 1 and 2, all d_an large -> zero loss
    assert out.loss.item() == 0.0
    assert out.dist_ap.item() == pytest.approx(1.5, rel=1e-4)


def test_losses_follow_device_of_inputs():
    loss_fn = CenterLoss(3, 2).to("meta")
    feats = torch.randn(4, 2, device="meta")
    assert loss_fn(feats, torch.zeros(4, dtype=torch.long, device="meta")).device.type == "meta"


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
def test_all_real_centroid_triplet_loss_matches_reference_and_masked_path(k, kind):
    # is_real=None is the sync-free path the training step takes when a batch has no mock image.
    g = torch.Generator().manual_seed(k)
    p = 5
    feats = torch.randn(p * k, 6, generator=g, requires_grad=True)
    labels = torch.arange(10, 10 + p).repeat_interleave(k)
    real = torch.ones(p * k, dtype=torch.bool)
    fast = centroid_triplet_loss(feats, labels, None, num_instances=k, margin=0.3, distance=kind)
    masked = centroid_triplet_loss(feats, labels, real, num_instances=k, margin=0.3, distance=kind)
    expected = ref_ctl(feats.tolist(), labels.tolist(), real.tolist(), k, 0.3, kind)
    assert fast.loss.item() == pytest.approx(expected, rel=1e-5)
    assert fast.num_splits == masked.num_splits == k
    for a, b in zip(fast[:4], masked[:4]):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    grad_fast, = torch.autograd.grad(fast.loss, feats)
    grad_masked, = torch.autograd.grad(masked.loss, feats)
    torch.testing.assert_close(grad_fast, grad_masked)


def test_triplet_with_no_counted_anchor_is_zero_with_zero_gradient():
    feats = torch.randn(4, 3, requires_grad=True)
    loss, d_ap, d_an = batch_hard_triplet_loss(feats, torch.zeros(4, dtype=torch.long))  # no negatives
    assert loss.item() == 0.0 and d_ap.item() == 0.0 and d_an.item() == 0.0
    grad, = torch.autograd.grad(loss, feats)
    assert torch.equal(grad, torch.zeros_like(feats))


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
def test_distances_stay_float32_under_bf16_autocast(kind):
    # Post-ReLU 2048-d features (norms ~32): in bf16, ‖x‖² + ‖y‖² − 2x·y is off by ~4 and an item's
    # distance to itself comes out near 2 instead of 0.
    x = torch.relu(torch.randn(16, 2048, generator=torch.Generator().manual_seed(0)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dist = (euclidean_dist if kind == "euclidean" else cosine_dist)(x, x)
    assert dist.dtype == torch.float32
    exact = [[ref_dist(a, b, kind) for b in x.double().tolist()] for a in x.double().tolist()]
    exact = torch.tensor(exact, dtype=torch.float64)
    off_diagonal = ~torch.eye(16, dtype=torch.bool)
    assert ((dist.double() - exact).abs()[off_diagonal] / exact[off_diagonal]).max() < 1e-4
    assert dist.diagonal().max() < (0.05 if kind == "euclidean" else 1e-5)


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
def test_mock_features_get_no_gradient_from_triplet_or_ctl(kind):
    """A mock image's features take no part in either triplet loss: exactly zero gradient on them,
    whatever they hold, and the real features' gradients do not depend on them."""
    g = torch.Generator().manual_seed(11)
    p, k = 4, 4
    labels = torch.arange(p).repeat_interleave(k)
    real = torch.ones(p * k, dtype=torch.bool)
    real[[3, 6, 7, 15]] = False
    grads = []
    for mock_value in (0.0, 30.0):
        feats = torch.randn(p * k, 8, generator=torch.Generator().manual_seed(3))
        feats[~real] = mock_value + torch.randn(int((~real).sum()), 8, generator=g)
        feats.requires_grad_(True)
        triplet, _, _ = batch_hard_triplet_loss(feats, labels, margin=0.3, distance=kind, anchor_mask=real,
                                                candidate_mask=real)
        ctl = centroid_triplet_loss(feats, labels, real, num_instances=k, margin=0.3, distance=kind).loss
        grad, = torch.autograd.grad(triplet + ctl, feats)
        assert torch.count_nonzero(grad[~real]) == 0
        grads.append(grad[real])
    torch.testing.assert_close(grads[0], grads[1])
