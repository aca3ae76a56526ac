"""The sequential assigner's speculative engine gives the per-image reference's results exactly
(issue 12): on random and real-feature batches, with ties, empty clusters, the relocation path and
the checks' redo path, for the CPU's every-iteration checks and the GPU's sparser ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wsolbench.datasets.synthetic import render_sample
from wsolbench.methods.backbones import build_backbone
from wsolbench.methods.dawsol import kmeans as kmeans_module
from wsolbench.methods.dawsol import target_sample_assigner as tsa_module
from wsolbench.methods.dawsol.kmeans import kmeans, kmeans_prepared, prepare_points
from wsolbench.methods.dawsol.target_sample_assigner import TargetSampleAssigner

SYNC_INTERVALS = (None, 3, 5)  # None: the CPU default, every iteration


def _pair(num_classes, channels, sync_every, **options):
    made = [TargetSampleAssigner(num_classes, channels, seed=3, sequential_engine=engine,
                                 kmeans_sync_every=sync_every, **options)
            for engine in ("speculative", "per_image")]
    return made


def _assert_same(speculative, reference, out, expected, where):
    assert out.valid_count == expected.valid_count, where
    for field in ("valid_images", "subset_sizes", "source", "target", "universum"):
        a, b = getattr(out, field), getattr(expected, field)
        assert a.shape == b.shape and torch.equal(a, b), f"{where}: {field}"
    assert torch.equal(speculative.universum_anchor, reference.universum_anchor), where
    assert speculative.universum_count == reference.universum_count, where
    assert torch.equal(speculative.class_anchors, reference.class_anchors), where
    assert torch.equal(speculative.class_counts, reference.class_counts), where


class _Calls:
    """Counts the speculative engine's K-means calls and its checks' mismatches."""

    def __init__(self, monkeypatch):
        self.runs, self.mismatches, self.set_aside = 0, 0, 0
        run, check = tsa_module.kmeans_prepared, tsa_module._same_first_steps
        definition = kmeans_module._lloyd_definition

        def counted_run(*args, **kwargs):
            self.runs += 1
            return run(*args, **kwargs)

        def counted_check(*args):
            agree = check(*args)
            self.mismatches += agree.count(False)
            return agree

        def counted_definition(prepared, initial, max_iter, sync_every, record):
            # The definition loop with sparse checks is only ever the fixed loop's redo.
            self.set_aside += sync_every != 1
            return definition(prepared, initial, max_iter, sync_every, record)

        monkeypatch.setattr(tsa_module, "kmeans_prepared", counted_run)
        monkeypatch.setattr(tsa_module, "_same_first_steps", counted_check)
        monkeypatch.setattr(kmeans_module, "_lloyd_definition", counted_definition)


def _random_batch(generator, batch, side, channels, drawn_classes, num_classes):
    labels = torch.randint(0, drawn_classes, (batch,), generator=generator) % num_classes
    directions = torch.randn(num_classes, channels, generator=generator)
    features = torch.randn(batch, channels, side, side, generator=generator) * 0.5
    for i in range(batch):
        r0, c0 = torch.randint(0, side // 2, (2,), generator=generator).tolist()
        features[i, :, r0:r0 + side // 2, c0:c0 + side // 2] += directions[labels[i]][:, None, None]
    features = features.relu()
    return features, features.mean(dim=(2, 3)), labels


@pytest.mark.parametrize("sync_every", SYNC_INTERVALS)
def test_speculative_equals_per_image_on_random_batches_in_a_row(sync_every, monkeypatch):
    calls = _Calls(monkeypatch)
    generator = torch.Generator().manual_seed(5)
    speculative, reference = _pair(12, 24, sync_every)
    for step in range(6):  # the state carries over: first visits, then cumulative means
        batch = _random_batch(generator, 16, 10, 24, drawn_classes=6 if step % 2 else 12, num_classes=12)
        _assert_same(speculative, reference, speculative(*batch), reference(*batch), f"batch {step}")
    # The engine ran generations (classes repeat within a batch), not one call per image.
    assert 6 * 2 <= calls.runs < 6 * 16


@pytest.mark.parametrize("sync_every", SYNC_INTERVALS)
def test_a_failed_check_is_run_again_from_the_true_centres(sync_every, monkeypatch):
    """Two images of different classes whose second clustering depends on M0 as the first leaves
    it (test_dawsol_math's hand case): the first pass starts image 2 from the batch-start M0, the
    check finds its first iteration differs, and it is run again from the true centres."""
    calls = _Calls(monkeypatch)
    made = []
    for engine in ("speculative", "per_image"):
        assigner = TargetSampleAssigner(2, 3, seed=0, source_samples=4, target_samples=4, sequential_engine=engine,
                                        kmeans_sync_every=sync_every)
        assigner.class_anchors[0] = torch.tensor([100.0, 0.0, 0.0], dtype=torch.float64)
        assigner.class_anchors[1] = torch.tensor([30.0, 0.0, 0.0], dtype=torch.float64)
        assigner.class_counts[:] = 1
        made.append(assigner)
    speculative, reference = made
    features, z, labels = _line_batch()
    out, expected = speculative(features, z, labels), reference(features, z, labels)
    _assert_same(speculative, reference, out, expected, "line batch")
    assert expected.subset_sizes.tolist() == [[20, 22, 22], [16, 32, 16]]  # the sequential answer
    assert calls.mismatches == 1 and calls.runs == 2


def _line_batch():
    """Two 8×8 maps with C = 3; image 2's clustering depends on M0 (test_dawsol_math._line_batch)."""
    image_one = torch.cat([torch.tensor([0.0, 0.0, 10.0]).repeat(20, 1), torch.tensor([50.0, 50.0, 0.0]).repeat(22, 1),
                           torch.tensor([100.0, 0.0, 0.0]).repeat(22, 1)])
    image_two = torch.cat([torch.tensor([x, 0.0, 0.0]).repeat(16, 1) for x in (0.0, 9.0, 20.0, 30.0)])
    features = torch.stack([image_one.T.reshape(3, 8, 8), image_two.T.reshape(3, 8, 8)])
    z = torch.tensor([[50.0, 50.0, 0.0], [20.0, 0.0, 0.0]])
    return features, z, torch.tensor([0, 1])


@pytest.mark.parametrize("sync_every", SYNC_INTERVALS)
def test_ties_points_on_their_centres_and_duplicate_pixels(sync_every):
    """First visits (c1 == c2: every pixel ties between them), images whose pixels are all equal
    (every point on its centre: relocation skipped), duplicated pixel rows and integer-valued
    features (exact distance ties)."""
    generator = torch.Generator().manual_seed(8)
    speculative, reference = _pair(4, 6, sync_every, source_samples=4, target_samples=4)
    for step in range(4):
        features = torch.randint(0, 3, (8, 6, 6, 6), generator=generator).float()
        features[1] = 2.0  # constant image
        features[3] = features[2]  # the same image twice
        features[4, :, :3] = features[4, :, 3:]  # duplicated rows
        labels = torch.tensor([0, 1, 1, 1, 2, 0, 3, 0]) if step % 2 else torch.tensor([3, 3, 2, 2, 1, 1, 0, 0])
        z = features.mean(dim=(2, 3))
        _assert_same(speculative, reference, speculative(features, z, labels), reference(features, z, labels),
                     f"batch {step}")


def test_an_empty_cluster_after_the_first_iteration_is_set_aside_and_redone_exactly(monkeypatch):
    """The plain M-step after iteration 1 meets an empty cluster; that problem is run again with
    the relocation in every iteration, and the results equal the every-iteration run's."""
    calls = _Calls(monkeypatch)
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(64, 12, 2, generator=generator)
    initial = torch.randn(64, 3, 2, generator=generator) * 3
    initial[:, 2] = initial[:, 1] + 1e-3  # two close centres: one of them tends to lose its points
    expected = kmeans(points, initial, sync_every=1)
    prepared = prepare_points(points)
    for sync_every in (2, 3, 5):
        got, _ = kmeans_prepared(prepared, initial, sync_every=sync_every)
        for field in expected._fields:
            assert torch.equal(getattr(got, field), getattr(expected, field)), (sync_every, field)
    assert calls.set_aside == 3  # one redo call per interval, so the path was taken


def _real_features(batch_images, side=112, seed=0, num_classes=8):
    """A randomly initialised resnet10_half's last feature map on rendered synthetic images."""
    torch.manual_seed(seed)
    backbone = build_backbone("resnet10_half", large_feature_map=True).eval()
    images, labels = [], []
    for index, class_index in enumerate(batch_images):
        sample = render_sample(0, "train", class_index, index, num_classes=num_classes)
        pixels = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1).float()[None] / 255.0
        images.append(torch.nn.functional.interpolate(pixels, size=(side, side), mode="bilinear",
                                                      align_corners=False)[0])
        labels.append(class_index)
    with torch.no_grad():
        features, _ = backbone((torch.stack(images) - 0.45) / 0.225)
    return features.relu(), torch.tensor(labels)


@pytest.mark.parametrize("sync_every", SYNC_INTERVALS)
def test_speculative_equals_per_image_on_real_feature_batches(sync_every):
    speculative, reference = _pair(8, 256, sync_every)
    classes = [[0, 1, 0, 2, 1, 0, 3, 3, 4, 0, 5, 1], [2, 2, 2, 6, 7, 0, 0, 1, 2, 6, 5, 5]]
    for step, batch_classes in enumerate(classes * 2):
        features, labels = _real_features(batch_classes, seed=step)
        assert features.shape[1] == 256
        z = features.mean(dim=(2, 3))
        _assert_same(speculative, reference, speculative(features, z, labels), reference(features, z, labels),
                     f"batch {step}")


def test_the_engine_is_checked():
    with pytest.raises(ValueError, match="sequential_engine must be one of"):
        TargetSampleAssigner(2, 3, sequential_engine="fast")


def test_auto_takes_the_per_image_engine_on_the_cpu(monkeypatch):
    """On the CPU the speculative engine is the slower one (benchmarks/RESULTS.md); "auto" avoids it."""
    calls = _Calls(monkeypatch)
    assigner = TargetSampleAssigner(4, 8, seed=0)
    assert assigner.sequential_engine == "auto"
    features, z, labels = _random_batch(torch.Generator().manual_seed(0), 6, 6, 8, drawn_classes=4, num_classes=4)
    assigner(features, z, labels)
    assert calls.runs == 0  # kmeans_prepared is the speculative engine's; per_image calls kmeans


def test_a_settled_state_takes_one_kmeans_call_for_the_whole_batch(monkeypatch):
    """Every image is run at once from the batch-start state (no waiting on class predecessors):
    where the anchors hardly move within a batch (large counts, as late in a run), every first step
    survives the check and the batch, repeated classes and all, is one K-means call."""
    generator = torch.Generator().manual_seed(9)
    speculative, reference = _pair(6, 24, 3)
    for step in range(3):  # anchors for every class
        batch = _random_batch(generator, 16, 10, 24, drawn_classes=6, num_classes=6)
        _assert_same(speculative, reference, speculative(*batch), reference(*batch), f"warm-up {step}")
    for assigner in (speculative, reference):
        assigner.universum_count = 10**6
        assigner.class_counts[:] = 10**6
    calls = _Calls(monkeypatch)
    batch = _random_batch(generator, 16, 10, 24, drawn_classes=3, num_classes=6)
    assert len(set(batch[2].tolist())) < 16  # classes repeat
    _assert_same(speculative, reference, speculative(*batch), reference(*batch), "settled")
    assert (calls.runs, calls.mismatches) == (1, 0)
