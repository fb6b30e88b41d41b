"""PK sampler invariants: P distinct ids x K per batch, coverage, disjoint ranks, determinism."""
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.bases import ImageRecord
from datasets.datamodule import PKDataset, collate_pk
from datasets.samplers import MOCK, PKBatchSampler, group_by_pid


def _pid_groups(seed=0, num_pids=30):
    rng = np.random.default_rng(seed)
    pids = []
    for pid in range(num_pids):
        pids += [pid] * int(rng.integers(1, 11))  # 1..10 images, some with fewer than K
    return group_by_pid(pids), pids


@pytest.mark.parametrize("k", [2, 3, 4, 6])
@pytest.mark.parametrize("resample", [True, False])
def test_every_batch_has_p_distinct_ids_times_k(k, resample):
    groups, pids = _pid_groups()
    sampler = PKBatchSampler(groups, p=5, k=k, seed=3, use_resampling=resample)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == 5 and len({pid for pid, _, _ in batch}) == 5
        for pid, indices, _ in batch:
            assert len(indices) == k
            real = [i for i in indices if i != MOCK]
            assert all(pids[i] == pid for i in real)
            assert len(real) >= 2  # never a lonely image
            if resample:
                assert MOCK not in indices


def test_epoch_uses_each_image_at_most_once_and_covers_ids():
    groups, pids = _pid_groups()
    sampler = PKBatchSampler(groups, p=4, k=4, seed=0, use_resampling=False)
    used = Counter(i for batch in sampler for _, idx, _ in batch for i in idx if i != MOCK)
    assert max(used.values()) == 1
    seen = {pids[i] for i in used}
    eligible = {pid for pid, idx in groups.items() if len(idx) > 1}
    # the epoch stops when fewer than P ids have slots left: at most P - 1 ids can be unseen
    assert len(eligible - seen) < 4 and seen <= eligible


def test_deterministic_per_seed_and_epoch_without_touching_global_rng():
    groups, _ = _pid_groups()
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    a = PKBatchSampler(groups, p=4, k=4, seed=7)
    b = PKBatchSampler(groups, p=4, k=4, seed=7)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(PKBatchSampler(groups, p=4, k=4, seed=8)) != first
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])


def test_ranks_get_disjoint_ids_and_equal_lengths():
    groups, _ = _pid_groups(num_pids=60)
    ranks = [PKBatchSampler(groups, p=4, k=4, seed=1, rank=r, world_size=3, use_resampling=False)
             for r in range(3)]
    for r in ranks:
        r.set_epoch(2)
    per_rank = [list(r) for r in ranks]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) > 0
    for step in zip(*per_rank):
        ids = [pid for batch in step for pid, _, _ in batch]
        assert len(ids) == len(set(ids)) == 12
    # no image is used twice across ranks in one epoch
    used = [i for batches in per_rank for b in batches for _, idx, _ in b for i in idx if i != MOCK]
    assert len(used) == len(set(used))


def test_too_few_identities_is_a_clear_error():
    with pytest.raises(ValueError, match="IMS_PER_BATCH"):
        PKBatchSampler({0: [0, 1], 1: [2, 3]}, p=4, k=2, seed=0)


def test_a_single_usable_identity_asks_for_identities_not_a_smaller_p():
    # P cannot go below 2 (config check): "Lower SOLVER.IMS_PER_BATCH" sent the user into that error.
    with pytest.raises(ValueError, match=r"has 1\. Add identities of two or more images: SOLVER\.IMS_PER_BATCH "
                                         r"cannot go below 2"):
        PKBatchSampler({0: [0, 1], 1: [2]}, p=4, k=2, seed=0)
    with pytest.raises(ValueError, match=r"has 3\. Add identities"):  # 2 ranks need 2 x 2
        PKBatchSampler({p: [2 * p, 2 * p + 1] for p in range(3)}, p=2, k=2, seed=0, world_size=2)


def _grey_records(tmp_path) -> list[ImageRecord]:
    """Three 8x4 images of identity 0, grey levels 0, 50, 100, cameras 0, 1, 2."""
    records = []
    for i in range(3):
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 4, 3), 50 * i, np.uint8)).save(path)
        records.append(ImageRecord(path, 0, i))
    return records


def test_pk_dataset_marks_mocks_and_never_mutates(tmp_path):
    import torchvision.transforms as T

    records = _grey_records(tmp_path)
    dataset = PKDataset(records, T.ToTensor(), (8, 4))
    snapshot = list(dataset.records)
    slot = (0, (2, 0, MOCK, MOCK), 7)
    for _ in range(3):
        images, pids, camids, is_real = collate_pk([dataset[slot]])
        assert images.shape == (4, 3, 8, 4)
        assert is_real.tolist() == [True, True, False, False]
        assert camids.tolist() == [2, 0, -1, -1] and pids.tolist() == [0, 0, 0, 0]
        assert torch.all(images[2:] == 0)
        assert torch.allclose(images[0], torch.full((3, 8, 4), 100 / 255))
    assert dataset.records == snapshot


def test_slot_seeds_fix_the_augmentation_whatever_the_processs_rng(tmp_path):
    """The train transforms draw from each slot's seed, not from the (restartable) global streams, and
    leave those streams as they were."""
    import torchvision.transforms as T

    path = str(tmp_path / "a.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 8, 3), dtype=np.uint8)).save(path)
    records = [ImageRecord(path, 0, 0)] * 4
    flip_and_erase = T.Compose([T.RandomCrop((16, 8), padding=2), T.ToTensor(),
                                T.Lambda(lambda x: x * random.uniform(0.5, 1.5))])
    dataset = PKDataset(records, flip_and_erase, (16, 8))
    groups = {0: [0, 1], 1: [2, 3]}
    sampler = PKBatchSampler(groups, p=2, k=2, seed=5)
    first = [dataset[slot][0] for slot in next(iter(sampler))]
    torch.manual_seed(123)
    random.seed(456)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    again = [dataset[slot][0] for slot in next(iter(sampler))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    seeds = [seed for batch in sampler for _, _, seed in batch]
    sampler.set_epoch(1)
    assert len(set(seeds)) == len(seeds) and not set(seeds) & {seed for batch in sampler for _, _, seed in batch}


def test_masked_copies_fill_the_slots_resampling_would_fill():
    """MOCK_IMAGES copy: the plan is resampling's, with every filled slot masked (a masked_copy entry)."""
    from datasets.samplers import masked_copy, slot_record

    groups, pids = _pid_groups()
    resampled = list(PKBatchSampler(groups, p=5, k=4, seed=3, use_resampling=True))
    copies = list(PKBatchSampler(groups, p=5, k=4, seed=3, use_resampling=False, mock_images="copy"))
    assert len(copies) == len(resampled) > 0
    masked = 0
    for batch_r, batch_c in zip(resampled, copies):
        for (pid_r, idx_r, seed_r), (pid_c, idx_c, seed_c) in zip(batch_r, batch_c):
            assert (pid_r, seed_r) == (pid_c, seed_c)
            decoded = [slot_record(e) for e in idx_c]
            assert [index for index, _ in decoded] == list(idx_r)
            flags = [real for _, real in decoded]
            assert flags == sorted(flags, reverse=True) and sum(flags) >= 2  # masked ones last, two real at least
            masked += flags.count(False)
            assert all(pids[i] == pid_c for i in idx_r)
    assert masked > 0 and MOCK not in {e for b in copies for _, idx, _ in b for e in idx}
    assert slot_record(MOCK) == (None, False) and slot_record(masked_copy(0)) == (0, False)
    assert slot_record(masked_copy(17)) == (17, False) and slot_record(17) == (17, True)
    with pytest.raises(ValueError, match="mock_images"):
        PKBatchSampler(groups, p=5, k=4, seed=3, mock_images="noise")


def test_pk_dataset_loads_a_masked_copy_as_its_image_flagged_not_real(tmp_path):
    import torchvision.transforms as T

    from datasets.samplers import masked_copy

    records = _grey_records(tmp_path)
    images, pids, camids, is_real = collate_pk([PKDataset(records, T.ToTensor(), (8, 4))[
        (0, (2, 1, masked_copy(2), MOCK), 7)]])
    assert is_real.tolist() == [True, True, False, False] and camids.tolist() == [2, 1, 2, -1]
    assert torch.equal(images[2], images[0]) and torch.all(images[3] == 0)
