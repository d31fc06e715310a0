"""Sampler weights and partners, the two-view transform, and the dataset wrappers."""
import numpy as np
import pytest
import torch

from datasets import (
    ClassBalancedSampler, EvalTransform, PairedTwoViewDataset, SingleViewTransform, SyntheticChestXrays,
    TwoViewTransform, class_sampling_weights, image_sampling_weights, unpack_pairs,
)
from settings import preset_config

# 6 images, 2 diseases + No Finding (last).
TARGETS = np.array([
    [1, 0, 0],
    [1, 1, 0],
    [0, 1, 0],
    [0, 0, 1],
    [0, 0, 1],
    [0, 0, 1],
], dtype=np.float32)


def test_class_weights_follow_the_formula():
    # counts: A=2, B=2, NF=3; all positives = 7; w_c = 7 / count_c; NF multiplied; cap applies.
    weights = class_sampling_weights(TARGETS, cap=100.0, no_finding_multiplier=2.0)
    np.testing.assert_allclose(weights, [7 / 2, 7 / 2, 2 * 7 / 3])
    capped = class_sampling_weights(TARGETS, cap=3.0, no_finding_multiplier=1.0)
    np.testing.assert_allclose(capped, [3.0, 3.0, 7 / 3])


def test_image_weight_is_mean_over_its_positive_classes():
    class_weights = class_sampling_weights(TARGETS, cap=100.0, no_finding_multiplier=3.0)
    weights = image_sampling_weights(TARGETS, cap=100.0, no_finding_multiplier=3.0)
    for image, row in enumerate(TARGETS):
        positive = [class_weights[c] for c in range(3) if row[c] == 1]
        assert weights[image] == pytest.approx(sum(positive) / len(positive))


def test_pairs_share_a_class_and_draws_are_reproducible():
    rng = np.random.default_rng(0)
    diseases = (rng.random((200, 4)) < 0.25).astype(np.float32)
    targets = np.concatenate([diseases, (diseases.sum(1, keepdims=True) == 0)], axis=1).astype(np.float32)
    sampler = ClassBalancedSampler(targets, 500, cap=50, no_finding_multiplier=3, paired=True, seed=7)
    sampler.set_epoch(3)
    pairs = list(sampler)
    assert len(pairs) == 500
    for anchor, partner, _seed in pairs:
        assert (targets[anchor] * targets[partner]).sum() >= 1, "partner must share a positive class"
    assert len({seed for _, _, seed in pairs}) == 500, "every sample gets its own augmentation seed"
    again = ClassBalancedSampler(targets, 500, cap=50, no_finding_multiplier=3, paired=True, seed=7)
    again.set_epoch(3)
    assert list(again) == pairs
    again.set_epoch(4)
    assert list(again) != pairs


def test_balanced_sampler_raises_rare_class_frequency():
    targets = np.zeros((1000, 3), dtype=np.float32)
    targets[:20, 0] = 1  # rare disease
    targets[20:300, 1] = 1
    targets[300:, 2] = 1  # No Finding
    sampler = ClassBalancedSampler(targets, 20000, cap=1000, no_finding_multiplier=1, paired=False, seed=0)
    drawn = targets[[index for index, _seed in sampler]].mean(0)
    assert drawn[0] == pytest.approx(1 / 3, abs=0.03)  # equal class mass without a cap
    assert drawn[2] == pytest.approx(1 / 3, abs=0.03)


def test_replica_shards_are_disjoint_and_cover_one_global_draw():
    targets = TARGETS
    full = ClassBalancedSampler(targets, 10, cap=10, no_finding_multiplier=1, paired=True, seed=1)
    shards = [ClassBalancedSampler(targets, 10, cap=10, no_finding_multiplier=1, paired=True, seed=1, rank=r, num_replicas=2)
              for r in range(2)]
    merged = [pair for couple in zip(*(list(s) for s in shards)) for pair in couple]
    assert merged == list(full)


def test_two_views_are_nearly_aligned_but_not_identical():
    config = preset_config("synthetic", image_size=64)
    dataset = SyntheticChestXrays("train", 4, 64, seed=0)
    transform = TwoViewTransform(config)
    torch.manual_seed(0)
    view, view_prime = transform(dataset.load_image(0))
    other, _ = transform(dataset.load_image(1))
    assert view.shape == view_prime.shape == (3, 64, 64)
    assert not torch.equal(view, view_prime)

    def correlation(a, b):
        return float(torch.corrcoef(torch.stack([a[0].flatten(), b[0].flatten()]))[0, 1])

    assert correlation(view, view_prime) > 0.8
    assert correlation(view, view_prime) > correlation(view, other) + 0.1


def test_strong_augmentation_switch_keeps_or_drops_the_shared_geometry():
    dataset = SyntheticChestXrays("train", 8, 64, seed=0)
    plain = EvalTransform(64)

    def mean_correlation(strong: bool) -> float:
        transform = TwoViewTransform(preset_config("synthetic", image_size=64, strong_augmentation=strong))
        torch.manual_seed(1)
        values = []
        for index in range(8):
            view, _ = transform(dataset.load_image(index))
            reference = plain(dataset.load_image(index))
            values.append(float(torch.corrcoef(torch.stack([view[0].flatten(), reference[0].flatten()]))[0, 1]))
        return float(np.mean(values))

    # Without the shared transform a view is the image up to photometric jitter and a tiny crop.
    assert mean_correlation(False) > 0.85
    assert mean_correlation(True) < mean_correlation(False) - 0.1


def test_eval_transform_is_deterministic_and_normalised():
    image = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    a = EvalTransform(64)(image)
    b = EvalTransform(64)(image)
    assert a.shape == (3, 64, 64) and torch.equal(a, b)
    # Grey replicated to 3 channels, each normalised with its own ImageNet mean and std.
    torch.testing.assert_close(a[0] * 0.229 + 0.485, a[1] * 0.224 + 0.456)
    torch.testing.assert_close(a[2] * 0.225 + 0.406, a[1] * 0.224 + 0.456)
    assert float((a[0] * 0.229 + 0.485).min()) >= 0 and float((a[0] * 0.229 + 0.485).max()) <= 1


def test_paired_dataset_batches_unpack_anchors_then_partners():
    config = preset_config("synthetic", image_size=64)
    base = SyntheticChestXrays("train", 6, 64, seed=0)
    dataset = PairedTwoViewDataset(base, TwoViewTransform(config))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=[(0, 3, 11), (1, 4, 12)])
    views, views_prime, targets, indices = unpack_pairs(next(iter(loader)))
    assert views.shape == (4, 3, 64, 64) and views_prime.shape == (4, 3, 64, 64)
    assert indices.tolist() == [0, 1, 3, 4]
    torch.testing.assert_close(targets, torch.from_numpy(base.targets[[0, 1, 3, 4]]))


def test_single_view_transform_output():
    config = preset_config("synthetic", image_size=48)
    image = SyntheticChestXrays("val", 1, 48, seed=0).load_image(0)
    assert SingleViewTransform(config)(image).shape == (3, 48, 48)


def test_augmentation_depends_on_the_sample_seed_not_on_the_loader():
    config = preset_config("synthetic", image_size=48)
    base = SyntheticChestXrays("train", 6, 48, seed=0)
    dataset = PairedTwoViewDataset(base, TwoViewTransform(config))
    items = [(0, 3, 101), (1, 4, 102), (2, 5, 103), (0, 3, 104)]
    in_process = [dataset[item]["views"] for item in items]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=items, num_workers=2)
    with_workers = torch.cat([batch["views"] for batch in loader])
    torch.testing.assert_close(torch.stack(in_process), with_workers, rtol=0, atol=0)
    assert not torch.equal(in_process[0], in_process[3])  # same pair, other seed: other views
