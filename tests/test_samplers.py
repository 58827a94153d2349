"""Tests for data_pipelines.samplers: PK and graph batches and matching groups, chunked k-NN over class centres."""

import ml_collections
import numpy as np
import pytest

from data_pipelines import pipeline
from data_pipelines.samplers import GraphSampler, PKSampler, knn_classes


def _labels(num_classes=40, seed=0):
    """Identities with 1..12 images each (some fewer than K), records in shuffled order."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), rng.integers(1, 13, num_classes))
    return rng.permutation(labels)


def _check_pk_batches(batches, labels, p, k):
    for batch in batches:
        ids = labels[batch].reshape(p, k)
        assert (ids == ids[:, :1]).all(), "K-blocks must be contiguous and hold one identity"
        assert np.unique(ids[:, 0]).size == p, "P distinct identities per batch"


def test_pk_batches_hold_p_identities_times_k_images():
    labels = _labels()
    sampler = PKSampler(labels, p=6, k=4, seed=3)
    epoch = sampler.epoch(0)
    assert epoch.shape == (labels.size // 24, 24)
    assert sampler.num_batches == labels.size // 24
    _check_pk_batches(epoch, labels, 6, 4)
    # Identities appear equally often (within one) across the epoch.
    counts = np.bincount(labels[epoch[:, ::4]].ravel(), minlength=40)
    assert counts.max() - counts.min() <= 1 and counts.min() >= 1


def test_pk_images_of_an_identity_not_repeated_before_exhausted():
    labels = np.repeat(np.arange(10), 8)
    epoch = PKSampler(labels, p=5, k=4, seed=0).epoch(2)
    # 4 batches x 5 identities = 20 slots: every identity twice, so all 8 of its images exactly once.
    np.testing.assert_array_equal(np.sort(epoch.ravel()), np.arange(80))


def test_pk_small_identities_sampled_with_replacement():
    labels = np.array([0] * 2 + [1] * 2 + [2] * 2 + [3] * 2)
    epoch = PKSampler(labels, p=2, k=4, seed=1).epoch(0)
    _check_pk_batches(epoch, labels, 2, 4)


def test_pk_deterministic_per_seed_and_epoch():
    labels = _labels()
    a, b = PKSampler(labels, 6, 4, seed=3), PKSampler(labels, 6, 4, seed=3)
    np.testing.assert_array_equal(a.epoch(5), b.epoch(5))
    assert not np.array_equal(a.epoch(0), a.epoch(1))
    assert not np.array_equal(a.epoch(0), PKSampler(labels, 6, 4, seed=4).epoch(0))


def test_pk_too_few_identities():
    with pytest.raises(ValueError, match="at least p=5 identities, labels hold 3"):
        PKSampler(np.repeat(np.arange(3), 10), p=5, k=2, seed=0)


def _brute_force_knn(centres, k):
    unit = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_knn_chunked_equals_brute_force():
    centres = np.random.default_rng(0).normal(size=(103, 8)).astype(np.float32)
    expected = _brute_force_knn(centres, 6)
    for chunk in (16, 103, 4096):
        got = knn_classes(centres, 6, chunk=chunk)
        assert got.dtype == np.int32 and got.shape == (103, 6)
        np.testing.assert_array_equal(got, expected)


def test_knn_on_circle_and_errors():
    angles = 2 * np.pi * np.arange(12) / 12
    centres = np.stack([np.cos(angles), np.sin(angles)], axis=1) * 3.0  # norm must not matter
    nn = knn_classes(centres, 2, chunk=5)
    for c in range(12):
        assert set(nn[c]) == {(c - 1) % 12, (c + 1) % 12}
    with pytest.raises(ValueError, match=r"k must be in \[1, 11\]"):
        knn_classes(centres, 12)
    with pytest.raises(ValueError, match="zero norm"):
        knn_classes(np.zeros((4, 2)), 1)


def _circle_setup(num_classes=24, per_class=6):
    """Classes as points on a circle: the nearest classes of c are c+-1, c+-2, ..."""
    angles = 2 * np.pi * np.arange(num_classes) / num_classes
    centres = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(num_classes), per_class))
    return labels, centres


def test_graph_batches_hold_seed_and_its_nearest_classes():
    labels, centres = _circle_setup()
    p, k = 5, 3
    neighbours = knn_classes(centres, p - 1)
    sampler = GraphSampler(labels, p, k, seed=0)
    epoch = sampler.epoch(0, neighbours)
    assert epoch.shape == (labels.size // (p * k), p * k)
    _check_pk_batches(epoch, labels, p, k)
    seeds = []
    for batch in epoch:
        ids = labels[batch][::k]
        seed = ids[0]
        # Seed first, then its P-1 = 4 nearest classes on the circle: seed +- 1, seed +- 2.
        assert set(ids) == {(seed + d) % 24 for d in (-2, -1, 0, 1, 2)}
        seeds.append(seed)
    # A class used in an earlier batch of the epoch is not chosen as a seed again (until all are used).
    used = set()
    for batch, seed in zip(epoch, seeds):
        assert seed not in used
        used.update(labels[batch][::k])
        if len(used) == 24:
            break
    np.testing.assert_array_equal(epoch, sampler.epoch(0, neighbours))
    assert not np.array_equal(epoch, sampler.epoch(1, neighbours))


def test_graph_fills_short_or_invalid_neighbour_rows():
    labels, _ = _circle_setup(num_classes=10)
    p, k = 4, 2
    # Rows repeat themselves, point at the seed, or are out of range: batches still hold P classes.
    neighbours = np.tile(np.array([[0, 0, 99]], np.int32), (10, 1))
    epoch = GraphSampler(labels, p, k, seed=2).epoch(3, neighbours)
    _check_pk_batches(epoch, labels, p, k)
    with pytest.raises(ValueError, match=r"neighbours must be \[C >= 10, >= classes per group - 1 = 3\]"):
        GraphSampler(labels, p, k, seed=2).epoch(0, np.zeros((10, 2), np.int32))


def test_pk_groups_hold_whole_distinct_identities():
    labels = _labels()
    p, k, group_size = 6, 4, 8
    epoch = PKSampler(labels, p, k, seed=3, group_size=group_size).epoch(0)
    np.testing.assert_array_equal(epoch, PKSampler(labels, p, k, seed=3).epoch(0))  # groups change no batch
    for batch in epoch:
        groups = labels[batch].reshape(p * k // group_size, group_size)
        for group in groups:
            ids, counts = np.unique(group, return_counts=True)
            assert ids.size == group_size // k and np.all(counts == k)
        # No identity is split between two groups of a batch.
        assert np.unique(groups[:, ::k]).size == p


def test_graph_groups_are_class_neighbourhoods():
    """Groups of 6 images with K = 2: 3 classes each, a seed and its 2 nearest (seed +- 1 on the circle);
    the batch of 24 images holds 4 such groups, whose seeds follow the "not used yet" rule."""
    labels, centres = _circle_setup()
    p, k, group_size = 12, 2, 6
    sampler = GraphSampler(labels, p, k, seed=0, group_size=group_size)
    assert sampler.classes_per_group == 3
    neighbours = knn_classes(centres, 2)
    epoch = sampler.epoch(0, neighbours)
    assert epoch.shape == (labels.size // (p * k), p * k)
    blocks = labels[epoch].reshape(-1, k)
    assert (blocks == blocks[:, :1]).all()
    used = set()
    for batch in epoch:
        for group in labels[batch].reshape(-1, group_size):
            ids = group[::k]
            seed = ids[0]
            assert set(ids) == {(seed - 1) % 24, seed, (seed + 1) % 24}
            if len(used) < 24:
                assert seed not in used
            used.update(ids)
    with pytest.raises(ValueError, match=r"neighbours must be \[C >= 24, >= classes per group - 1 = 2\]"):
        sampler.epoch(0, neighbours[:, :1])


def test_group_size_errors():
    labels = _labels()
    for bad in (6, 5, -4):  # 24 = 6 * 4: 6 is no multiple of k = 4, 5 neither, -4 is negative
        with pytest.raises(ValueError, match=rf"group_size={bad} \(model.qaconv_group_size\) must be 0 or a "
                                             r"multiple of k=4 that divides the global batch p\*k = 24"):
            PKSampler(labels, 6, 4, seed=0, group_size=bad)
    with pytest.raises(ValueError, match="group_size=16"):
        GraphSampler(labels, 6, 4, seed=0, group_size=16)


class _LabelSource:
    def __init__(self, labels):
        self._labels = labels

    def labels(self):
        return self._labels


def test_epoch_indices_passes_the_group_size_to_the_samplers():
    labels, centres = _circle_setup()
    cfg = ml_collections.ConfigDict(dict(sampler="graph", k=2, seed=0))
    neighbours = knn_classes(centres, 2)
    got = pipeline.epoch_indices(_LabelSource(labels), cfg, 1, 24, neighbours, group_size=6)
    np.testing.assert_array_equal(got, GraphSampler(labels, 12, 2, seed=0, group_size=6).epoch(1, neighbours))
    with pytest.raises(ValueError, match=r"classes per group - 1 = 11"):  # group_size 0: one neighbourhood
        pipeline.epoch_indices(_LabelSource(labels), cfg, 1, 24, neighbours)
    cfg.sampler = "pk"
    with pytest.raises(ValueError, match="group_size=3"):
        pipeline.epoch_indices(_LabelSource(labels), cfg, 1, 24, group_size=3)
