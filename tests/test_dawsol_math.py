"""DA-WSOL numerics: K-means (§5.4), MMD (§5.5), L_u (§5.6), TSA (§5.2-5.3), DANN (§5.9)."""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch

from wsolbench.methods.dawsol.dann import (
    DomainClassifier,
    domain_adversarial_loss,
    grl_coefficient,
    reverse_gradient,
)
from wsolbench.methods.dawsol.kmeans import kmeans
from wsolbench.methods.dawsol.mmd import mmd_bandwidth, multi_kernel_mmd
from wsolbench.methods.dawsol.target_sample_assigner import TargetSampleAssigner
from wsolbench.methods.dawsol.universum import universum_loss


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Small tensors run far faster on one thread, above all on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
    else:
        with threadpool_limits(1):
            yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# K-means (spec §5.4)
# ----------------------------------------------------------------------------------------------


def _relu_features(generator: torch.Generator, num_points: int, num_features: int) -> torch.Tensor:
    offset = torch.randn(1, num_features, generator=generator)
    return torch.relu(torch.randn(num_points, num_features, generator=generator) + offset)


def _blob_features(generator: torch.Generator, num_points: int, num_features: int) -> torch.Tensor:
    blob_centres = 3 * torch.rand(4, num_features, generator=generator)
    member = torch.randint(0, 4, (num_points,), generator=generator)
    noise = 0.3 * torch.randn(num_points, num_features, generator=generator)
    return torch.relu(blob_centres[member] + noise)


def _duplicate_features(
    generator: torch.Generator, num_points: int, num_features: int
) -> torch.Tensor:
    distinct = _relu_features(generator, 12, num_features)
    distinct[0] = 0.0  # ReLU maps often have all-zero pixels
    return distinct[torch.randint(0, 12, (num_points,), generator=generator)]


def _tsa_like_init(
    points: torch.Tensor, generator: torch.Generator, first_visit: bool
) -> torch.Tensor:
    """[M0, z, class anchor] as the TSA builds them: zero, the GAP, and a perturbed pixel or z."""
    z = points.mean(dim=0)
    if first_visit:
        return torch.stack([torch.zeros_like(z), z, z])
    row = int(torch.randint(0, points.shape[0], (1,), generator=generator))
    anchor = points[row] + 0.1 * torch.rand(points.shape[1], generator=generator)
    return torch.stack([torch.zeros_like(z), z, anchor])


KMEANS_ORACLE_CASES = {
    # name: (feature maker, problems, N, C, first visit, max_iter)
    "relu": (_relu_features, 6, 196, 16, False, 300),
    "blobs": (_blob_features, 6, 196, 32, False, 300),
    "duplicates": (_duplicate_features, 6, 196, 8, False, 300),
    "first_visit_empty_cluster": (_blob_features, 6, 196, 16, True, 300),
    "max_iter_1": (_blob_features, 4, 196, 16, False, 1),
    "max_iter_2_first_visit": (_relu_features, 4, 196, 16, True, 2),
    "wide_2048": (_relu_features, 3, 196, 2048, False, 300),
    "wide_2048_28x28": (_blob_features, 1, 784, 2048, True, 300),
}


@pytest.mark.parametrize("case", sorted(KMEANS_ORACLE_CASES))
def test_kmeans_matches_sklearn_k_means(case):
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    make_features, num_problems, num_points, num_features, first_visit, max_iter = (
        KMEANS_ORACLE_CASES[case]
    )
    generator = torch.Generator().manual_seed(sorted(KMEANS_ORACLE_CASES).index(case))
    points = torch.stack(
        [make_features(generator, num_points, num_features) for _ in range(num_problems)]
    )
    initial = torch.stack([_tsa_like_init(p, generator, first_visit) for p in points])

    result = kmeans(points, initial, max_iter=max_iter, sync_every=3)

    agreeing = 0
    for problem in range(num_problems):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "fewer distinct clusters than n_clusters"
            centres, labels, _ = sklearn_cluster.k_means(
                points[problem].numpy(), 3, init=initial[problem].numpy(), n_init=1,
                random_state=0, max_iter=max_iter,
            )
        agreeing += int((result.labels[problem].numpy() == labels).sum())
        scale = max(1.0, float(np.abs(centres).max()))
        error = float(np.abs(result.centres[problem].numpy() - centres).max())
        assert error <= 1e-4 * scale, f"{case} problem {problem}: centres off by {error}"
    assert agreeing / (num_problems * num_points) >= 0.999


@pytest.mark.parametrize("tol", [1e-4, 3e-2])
def test_kmeans_batch_equals_one_problem_at_a_time_for_any_sync_interval(tol):
    generator = torch.Generator().manual_seed(11)
    points = torch.stack([_relu_features(generator, 150, 6) for _ in range(8)])
    initial = torch.stack([_tsa_like_init(p, generator, i % 3 == 0) for i, p in enumerate(points)])
    alone = [kmeans(points[i : i + 1], initial[i : i + 1], tol=tol, sync_every=1) for i in range(8)]
    n_iter_alone = torch.cat([r.n_iter for r in alone])
    strict_alone = torch.cat([r.strict_convergence for r in alone])
    assert len(set(n_iter_alone.tolist())) > 1, "problems should stop at different iterations"
    if tol > 1e-3:
        # Problems stopped by the tolerance are not fixed points: freezing them matters.
        assert not bool(strict_alone.all())
    for sync_every in (1, 3, 7, 50):
        batch = kmeans(points, initial, tol=tol, sync_every=sync_every)
        assert torch.equal(batch.n_iter, n_iter_alone)
        assert torch.equal(batch.strict_convergence, strict_alone)
        assert torch.equal(batch.labels, torch.cat([r.labels for r in alone]))
        assert torch.equal(batch.centres, torch.cat([r.centres for r in alone]))


def test_kmeans_with_no_problems_returns_empty_results():
    result = kmeans(torch.zeros(0, 10, 4), torch.zeros(0, 3, 4))
    assert result.centres.shape == (0, 3, 4) and result.labels.shape == (0, 10)


def _first_visit_map() -> tuple[torch.Tensor, torch.Tensor]:
    """60 background pixels at 0.5, 70 at a = (4,4,0,0), 66 at b = (0,0,4,4); z = (3,3,0,0)."""
    rows = torch.cat(
        [
            torch.full((60, 4), 0.5),
            torch.tensor([4.0, 4.0, 0.0, 0.0]).repeat(70, 1),
            torch.tensor([0.0, 0.0, 4.0, 4.0]).repeat(66, 1),
        ]
    )
    return rows, torch.tensor([3.0, 3.0, 0.0, 0.0])


def test_kmeans_first_visit_fills_cluster_one_and_relocates_cluster_two_to_farthest_point():
    rows, z = _first_visit_map()
    initial = torch.stack([torch.zeros(4), z, z])  # spec §5.3: c1 == c2 on a first visit
    one_step = kmeans(rows[None], initial[None], max_iter=1)
    # E-step: background and b go to c0 (distances 1 and 32 vs 13 and 50), a ties between
    # c1 and c2 and goes to c1. Cluster 2 is empty and takes the farthest point, the first b.
    assert torch.equal(one_step.centres[0, 2], rows[130])
    assert torch.equal(one_step.centres[0, 1], rows[60])
    expected_c0 = torch.cat([rows[:60], rows[131:]]).to(torch.float64).mean(dim=0).float()
    assert torch.allclose(one_step.centres[0, 0], expected_c0, rtol=0, atol=1e-6)
    assert not bool(one_step.strict_convergence[0])
    # Stopped by max_iter: the final E-step relabels with the final centres (b -> cluster 2).
    assert one_step.labels[0, 130:].eq(2).all()

    full = kmeans(rows[None], initial[None])
    assert full.labels[0].bincount(minlength=3).tolist() == [60, 70, 66]
    assert torch.equal(full.centres[0], torch.stack([rows[0], rows[60], rows[130]]))
    assert bool(full.strict_convergence[0])


def test_kmeans_ties_go_to_the_lowest_cluster_index():
    # Dyadic values keep the centring exact, so 0.0 is exactly halfway between -1 and 1.
    rows = torch.tensor([[-1.0], [0.0], [1.0], [8.0]])
    initial = torch.tensor([[[-1.0], [1.0], [8.0]]])
    result = kmeans(rows[None], initial, max_iter=1)
    assert result.labels[0].tolist() == [0, 0, 1, 2]


def test_kmeans_points_on_their_centres_skip_relocation():
    # Iteration 0: every point sits on c1 (tie with c2 -> c1), so max d_p = 0, nothing is
    # relocated and the empty clusters are placed on cluster 1. Iteration 1: the three equal
    # centres tie and everything goes to cluster 0; the shift is 0 <= tol_abs = 0: stop, then
    # the final E-step. sklearn 1.9 gives the same (labels 0, n_iter 2).
    rows = torch.full((20, 3), 2.0)
    initial = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]])
    result = kmeans(rows[None], initial)
    assert result.labels[0].eq(0).all()
    assert torch.equal(result.centres[0], torch.full((3, 3), 2.0))
    assert int(result.n_iter[0]) == 2 and not bool(result.strict_convergence[0])

    # Two distinct values on c0 and c1: cluster 2 stays empty, lands on the largest cluster (1).
    rows[:5] = 1.0
    initial = torch.tensor([[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]])
    result = kmeans(rows[None], initial)
    assert result.labels[0].tolist() == [0] * 5 + [1] * 15
    assert torch.equal(result.centres[0], initial[0])
    assert int(result.n_iter[0]) == 1


def test_kmeans_tolerance_is_relative_to_the_data_variance():
    generator = torch.Generator().manual_seed(5)
    points = _relu_features(generator, 196, 8)[None]
    initial = _tsa_like_init(points[0], generator, False)[None]
    loose = kmeans(points, initial, tol=1e9)
    assert int(loose.n_iter[0]) == 1 and not bool(loose.strict_convergence[0])
    # Scaling the data and the init scales tol_abs alike: same iterations and labels.
    for scale in (1e-3, 1e3):
        scaled = kmeans(points * scale, initial * scale, tol=1e-2)
        reference = kmeans(points, initial, tol=1e-2)
        assert torch.equal(scaled.n_iter, reference.n_iter)
        assert torch.equal(scaled.labels, reference.labels)


# ----------------------------------------------------------------------------------------------
# MMD (spec §5.5)
# ----------------------------------------------------------------------------------------------


def test_mmd_known_answers():
    source = torch.tensor([[[0.0], [1.0]]])
    target = torch.tensor([[[2.0], [3.0]]])
    assert float(mmd_bandwidth(source, target)[0]) / 4 == pytest.approx(0.8333333, abs=1e-6)
    assert float(multi_kernel_mmd(source, target)) == pytest.approx(2.5391363570, abs=1e-6)

    source = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[[2.0, 2.0], [3.0, 1.0], [1.0, 3.0]]])
    assert float(mmd_bandwidth(source, target)[0]) / 4 == pytest.approx(1.366667, abs=1e-6)
    assert float(multi_kernel_mmd(source, target)) == pytest.approx(3.1766412029, abs=1e-6)


def _mmd_by_loops(source: torch.Tensor, target: torch.Tensor) -> float:
    """Spec §5.5 written out with Python loops in float64."""
    total = 0.0
    for s, t in zip(source.double().tolist(), target.double().tolist()):
        n = len(s)
        z = s + t
        distance = [[sum((a - b) ** 2 for a, b in zip(za, zb)) for zb in z] for za in z]
        beta = sum(map(sum, distance)) / ((2 * n) ** 2 - 2 * n)

        def kernel(a: int, b: int) -> float:
            return sum(math.exp(-distance[a][b] / (beta * 2.0 ** (q - 2))) for q in range(5))

        estimate = 0.0
        for i in range(n):
            j = (i + 1) % n
            estimate += kernel(i, j) + kernel(n + i, n + j) - kernel(i, n + j) - kernel(j, n + i)
        total += estimate / n
    return total / len(source)


def test_mmd_matches_the_formula_evaluated_with_loops():
    generator = torch.Generator().manual_seed(3)
    source = torch.relu(torch.randn(3, 6, 5, generator=generator))
    target = torch.relu(torch.randn(3, 6, 5, generator=generator) + 0.5)
    expected = _mmd_by_loops(source, target)
    assert float(multi_kernel_mmd(source, target)) == pytest.approx(expected, rel=1e-5)


def test_mmd_gradients_reach_both_sets_but_not_through_the_bandwidth():
    generator = torch.Generator().manual_seed(4)
    source = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    target = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64) + 1.0
    source32 = source.float().requires_grad_()
    target32 = target.float().requires_grad_()
    multi_kernel_mmd(source32, target32).backward()

    def reference(s: torch.Tensor, t: torch.Tensor, detach_bandwidth: bool) -> torch.Tensor:
        z = torch.cat([s, t], dim=1)
        distance = (z[:, :, None] - z[:, None]).square().sum(-1)
        n = s.shape[1]
        beta = distance.sum(dim=(1, 2)) / ((2 * n) ** 2 - 2 * n)
        if detach_bandwidth:
            beta = beta.detach()
        bandwidths = [beta[:, None, None] * 2.0 ** (q - 2) for q in range(5)]
        kernel = sum(torch.exp(-distance / bandwidth) for bandwidth in bandwidths)
        i = torch.arange(n)
        j = (i + 1) % n
        terms = (
            kernel[:, i, j] + kernel[:, n + i, n + j] - kernel[:, i, n + j] - kernel[:, j, n + i]
        )
        return terms.mean()

    for detach, should_match in ((True, True), (False, False)):
        s = source.clone().requires_grad_()
        t = target.clone().requires_grad_()
        reference(s, t, detach).backward()
        matches = torch.allclose(source32.grad.double(), s.grad, atol=1e-5) and torch.allclose(
            target32.grad.double(), t.grad, atol=1e-5
        )
        assert matches == should_match
    assert source32.grad.abs().sum() > 0 and target32.grad.abs().sum() > 0


def test_mmd_without_valid_images_is_zero_and_backpropagates():
    source = torch.zeros(0, 32, 8, requires_grad=True)
    target = torch.zeros(0, 32, 8, requires_grad=True)
    loss = multi_kernel_mmd(source, target)
    assert loss.item() == 0.0
    loss.backward()
    assert source.grad is not None and source.grad.shape == source.shape


def test_mmd_of_identical_rows_is_zero_not_nan():
    rows = torch.ones(1, 4, 3)
    assert float(multi_kernel_mmd(rows, rows.clone())) == 0.0


# ----------------------------------------------------------------------------------------------
# Universum regularization (spec §5.6)
# ----------------------------------------------------------------------------------------------


def test_universum_loss_is_the_mean_over_all_elements_not_a_sum():
    rows = torch.full((5, 3), 2.0)
    assert float(universum_loss(rows)) == 2.0  # a sum of L1 norms (paper Eq. 4) would be 30
    generator = torch.Generator().manual_seed(0)
    rows = torch.rand(7, 11, generator=generator)
    assert float(universum_loss(rows)) == pytest.approx(float(rows.sum()) / 77, rel=1e-6)


def test_universum_loss_of_an_empty_set_is_zero():
    rows = torch.zeros(0, 16, requires_grad=True)
    loss = universum_loss(rows)
    assert loss.item() == 0.0
    loss.backward()


# ----------------------------------------------------------------------------------------------
# DANN (spec §5.9)
# ----------------------------------------------------------------------------------------------


def test_gradient_reversal_is_identity_forward_and_scaled_negation_backward():
    inputs = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    outputs = reverse_gradient(inputs, 0.25)
    assert torch.equal(outputs, inputs.detach())
    (outputs * torch.tensor([1.0, 2.0, 4.0])).sum().backward()
    assert torch.equal(inputs.grad, torch.tensor([-0.25, -0.5, -1.0]))


def test_grl_coefficient_schedule():
    assert grl_coefficient(0, 0, 100, 10) == 0.0
    # p = (4·100 + 50)/(10·100) = 0.45
    assert grl_coefficient(4, 50, 100, 10) == pytest.approx(2 / (1 + math.exp(-0.45)) - 1)
    assert grl_coefficient(5, 0, 100, 10) == pytest.approx(0.2449186624)
    last = grl_coefficient(9, 99, 100, 10)
    assert 0.46 < last < 0.4621 and last == pytest.approx(2 / (1 + math.exp(-0.999)) - 1)


def test_domain_classifier_initialization():
    classifier = DomainClassifier(64).requires_grad_(False)
    assert torch.equal(classifier.fc.bias, torch.zeros(1))
    bound = math.sqrt(6.0 / (64 + 1))  # xavier-uniform for a 64 -> 1 1×1 conv
    assert float(classifier.fc.weight.abs().max()) <= bound
    assert float(classifier.fc.weight.std()) > 0.3 * bound


def test_domain_adversarial_loss_on_a_hand_example():
    classifier = DomainClassifier(2)
    with torch.no_grad():
        classifier.fc.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
    source = torch.tensor([[[0.0, 5.0], [1.0, 5.0]]], requires_grad=True)  # D = σ(0), σ(1)
    target = torch.tensor([[[-1.0, 7.0], [2.0, 7.0]]], requires_grad=True)  # D = σ(−1), σ(2)

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    bce_source = -(math.log(sigmoid(0)) + math.log(sigmoid(1))) / 2
    bce_target = -(math.log(1 - sigmoid(-1)) + math.log(1 - sigmoid(2))) / 2
    loss = domain_adversarial_loss(classifier, source, target, coefficient=0.5)
    assert loss.item() == pytest.approx(0.5 * (bce_source + bce_target), rel=1e-6)

    loss.backward()
    # dL/dx0 for a source row is 0.5·(σ(x0) − 1)/2; the GRL flips it and scales it by 0.5.
    expected = [-0.5 * 0.5 * (sigmoid(x) - 1) / 2 for x in (0.0, 1.0)]
    assert source.grad[0, :, 0].tolist() == pytest.approx(expected, rel=1e-5)
    assert source.grad[0, :, 1].abs().max() == 0
    expected = [-0.5 * 0.5 * sigmoid(x) / 2 for x in (-1.0, 2.0)]
    assert target.grad[0, :, 0].tolist() == pytest.approx(expected, rel=1e-5)
    # The classifier itself is not reversed: it descends the domain loss.
    assert float(classifier.fc.bias.grad) == pytest.approx(
        0.5 * ((sigmoid(0) - 1 + sigmoid(1) - 1) / 2 + (sigmoid(-1) + sigmoid(2)) / 2), rel=1e-5
    )


def test_domain_adversarial_loss_without_valid_images_is_zero():
    classifier = DomainClassifier(8)
    empty = torch.zeros(0, 32, 8, requires_grad=True)
    assert domain_adversarial_loss(classifier, empty, empty, 0.3).item() == 0.0


# ----------------------------------------------------------------------------------------------
# Target sample assigner (spec §5.2-5.3)
# ----------------------------------------------------------------------------------------------

A = torch.tensor([4.0, 4.0, 0.0, 0.0])
B = torch.tensor([0.0, 0.0, 4.0, 4.0])
BACKGROUND = torch.full((4,), 0.5)


def _three_group_map(generator: torch.Generator, sizes=(60, 70, 66), noise: float = 0.0):
    """A 14×14, C=4 map with background ≈ 0.5, objects ≈ A, others ≈ B, scattered in space.

    Returns F (1, 4, 14, 14) and the group of each pixel (196,) in row-major order.
    """
    group = torch.cat([torch.full((size,), g) for g, size in enumerate(sizes)])
    group = group[torch.randperm(group.numel(), generator=generator)]
    rows = torch.stack([BACKGROUND, A, B])[group]
    rows = rows + noise * torch.rand(rows.shape, generator=generator)
    return rows.T.reshape(1, 4, 14, 14).contiguous(), group


def _visited_assigner(**kwargs) -> TargetSampleAssigner:
    assigner = TargetSampleAssigner(num_classes=3, feature_dim=4, **kwargs)
    assigner.class_anchors[2] = B.double()
    assigner.class_counts[2] = 5
    return assigner


def test_assigner_splits_a_hand_made_map_into_the_known_subsets():
    generator = torch.Generator().manual_seed(0)
    features, group = _three_group_map(generator, noise=0.1)
    features.requires_grad_()
    z = A.clone().view(1, 4).requires_grad_()
    samples = _visited_assigner()(features, z, torch.tensor([2]))

    rows = features.detach().flatten(2).transpose(1, 2)[0]
    assert samples.valid_count == 1 and samples.valid_images.tolist() == [0]
    assert samples.subset_sizes.tolist() == [[60, 70, 66]]
    assert samples.source.shape == (1, 32, 4) and samples.target.shape == (1, 32, 4)
    assert torch.equal(samples.source[0, 0], A)  # S_i = [z_i; 31 fake rows]

    def pixel_of(row: torch.Tensor) -> int:
        matches = (rows == row).all(dim=1).nonzero().flatten().tolist()
        assert len(matches) == 1
        return matches[0]

    fake = [pixel_of(r) for r in samples.source[0, 1:].detach()]
    real = [pixel_of(r) for r in samples.target[0].detach()]
    assert len(set(fake)) == 31 and all(group[p] == 1 for p in fake)
    assert len(set(real)) == 32 and all(group[p] == 2 for p in real)
    # U is every background row, in row-major order, sampled or not.
    assert torch.equal(samples.universum.detach(), rows[group == 0])

    (samples.source.sum() + samples.target.sum() + samples.universum.sum()).backward()
    assert torch.equal(z.grad, torch.ones(1, 4))
    touched = features.grad[0].flatten(1).T.abs().sum(dim=1) > 0
    background = (group == 0).nonzero().flatten().tolist()
    assert touched.nonzero().flatten().tolist() == sorted(fake + real + background)


def test_assigner_skips_images_without_enough_targets_but_keeps_their_universum():
    generator = torch.Generator().manual_seed(1)
    features, group = _three_group_map(generator, sizes=(120, 45, 31))  # 31 real < n_t = 32
    samples = _visited_assigner()(features, A.view(1, 4), torch.tensor([2]))
    assert samples.valid_count == 0
    assert samples.source.shape == (0, 32, 4) and samples.target.shape == (0, 32, 4)
    assert samples.universum.shape == (120, 4)
    assert float(multi_kernel_mmd(samples.source, samples.target)) == 0.0

    # The thresholds are inclusive: exactly 31 fake and 32 real rows make a valid image.
    features, group = _three_group_map(generator, sizes=(133, 31, 32))
    samples = _visited_assigner()(features, A.view(1, 4), torch.tensor([2]))
    assert samples.valid_count == 1 and samples.subset_sizes.tolist() == [[133, 31, 32]]


def test_assigner_first_visit_sets_the_anchor_to_z_then_averages_in_cluster_one():
    rows, z = _first_visit_map()
    features = rows.T.reshape(1, 4, 14, 14)
    assigner = TargetSampleAssigner(num_classes=3, feature_dim=4)
    samples = assigner(features, z.view(1, 4), torch.tensor([1]))
    # c1 == c2 == z: everything non-background first goes to cluster 1, cluster 2 is
    # relocated to a b pixel, and K-means ends with the three groups (see the K-means test).
    assert samples.subset_sizes.tolist() == [[60, 70, 66]]
    assert int(assigner.class_counts[1]) == 2  # z counts as the first sample
    assert torch.equal(assigner.class_anchors[1], (z.double() + A.double()) / 2)  # follows ĉ1
    assert assigner.universum_count == 1
    # M0 = ĉ0: the zero initialization is not counted.
    assert torch.equal(assigner.universum_anchor, BACKGROUND.double())
    assert int(assigner.class_counts[0]) == 0 and int(assigner.class_counts[2]) == 0


def test_assigner_anchor_updates_are_cumulative_means():
    generator = torch.Generator().manual_seed(2)
    assigner = _visited_assigner()
    expected_class_anchor = B.double()
    expected_universum = torch.zeros(4, dtype=torch.float64)
    for step, (background, a) in enumerate([(0.5, 4.0), (0.25, 5.0), (0.75, 3.0)], start=1):
        features, group = _three_group_map(generator)
        rows = features.flatten(2).transpose(1, 2)[0].clone()
        rows[group == 0] = background
        rows[group == 1] = torch.tensor([a, a, 0.0, 0.0])
        features = rows.T.reshape(1, 4, 14, 14)
        assigner(features, torch.tensor([[a, a, 0.0, 0.0]]), torch.tensor([2]))
        count = 5 + step
        expected_class_anchor = expected_class_anchor * (count - 1) / count + torch.tensor(
            [a, a, 0.0, 0.0], dtype=torch.float64
        ) / count
        expected_universum = expected_universum * (step - 1) / step + background / step
        assert int(assigner.class_counts[2]) == count and assigner.universum_count == step
        assert torch.allclose(assigner.class_anchors[2], expected_class_anchor, rtol=0, atol=1e-12)
        assert torch.allclose(assigner.universum_anchor, expected_universum, rtol=0, atol=1e-12)


def _line_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 8×8 maps with C = 3 whose second clustering depends on M0 (see the test)."""
    image_one = torch.cat(
        [
            torch.tensor([0.0, 0.0, 10.0]).repeat(20, 1),  # Universum, ĉ0 = (0, 0, 10)
            torch.tensor([50.0, 50.0, 0.0]).repeat(22, 1),
            torch.tensor([100.0, 0.0, 0.0]).repeat(22, 1),
        ]
    )
    image_two = torch.cat(
        [torch.tensor([x, 0.0, 0.0]).repeat(16, 1) for x in (0.0, 9.0, 20.0, 30.0)]
    )
    features = torch.stack([image_one.T.reshape(3, 8, 8), image_two.T.reshape(3, 8, 8)])
    z = torch.tensor([[50.0, 50.0, 0.0], [20.0, 0.0, 0.0]])
    return features, z, torch.tensor([0, 1])


def _line_assigner(mode: str, seed: int = 0) -> TargetSampleAssigner:
    assigner = TargetSampleAssigner(
        num_classes=2, feature_dim=3, mode=mode, seed=seed, source_samples=4, target_samples=4
    )
    assigner.class_anchors[0] = torch.tensor([100.0, 0.0, 0.0], dtype=torch.float64)
    assigner.class_anchors[1] = torch.tensor([30.0, 0.0, 0.0], dtype=torch.float64)
    assigner.class_counts[:] = 1
    return assigner


def test_sequential_and_batched_modes_differ_only_when_anchors_matter():
    features, z, labels = _line_batch()
    # Image 2 starts from M0 = 0 in batched mode: {0, 9} | {20} | {30}. In sequential mode it
    # sees M0 = (0, 0, 10) from image 1: {0} | {9, 20} | {30}.
    sequential = _line_assigner("sequential")(features, z, labels)
    batched = _line_assigner("batched")(features, z, labels)
    assert sequential.subset_sizes.tolist() == [[20, 22, 22], [16, 32, 16]]
    assert batched.subset_sizes.tolist() == [[20, 22, 22], [32, 16, 16]]

    # Move image 2's groups far from the origin and from each other: M0 no longer matters.
    features[1] = torch.cat(
        [torch.tensor([x, 0.0, 0.0]).repeat(16, 1) for x in (0.0, 0.0, 200.0, 300.0)]
    ).T.reshape(3, 8, 8)
    z[1] = torch.tensor([200.0, 0.0, 0.0])
    sequential_assigner, batched_assigner = _line_assigner("sequential"), _line_assigner("batched")
    sequential_assigner.class_anchors[1] = torch.tensor([300.0, 0.0, 0.0], dtype=torch.float64)
    batched_assigner.class_anchors[1] = torch.tensor([300.0, 0.0, 0.0], dtype=torch.float64)
    sequential = sequential_assigner(features, z, labels)
    batched = batched_assigner(features, z, labels)
    assert sequential.subset_sizes.tolist() == [[20, 22, 22], [32, 16, 16]]
    assert batched.subset_sizes.tolist() == [[20, 22, 22], [32, 16, 16]]
    for field in ("source", "target", "universum"):
        assert torch.equal(getattr(sequential, field), getattr(batched, field))
    assert sequential_assigner.state_dict()["universum_anchor"].equal(
        batched_assigner.state_dict()["universum_anchor"]
    )
    assert torch.equal(sequential_assigner.class_anchors, batched_assigner.class_anchors)


def test_batched_mode_starts_a_new_class_from_its_first_image_in_the_batch():
    features, z, _ = _line_batch()
    labels = torch.tensor([1, 1])
    assigner = TargetSampleAssigner(num_classes=2, feature_dim=3, mode="batched")
    assigner(features, z, labels)
    # Both images start from class anchor z_1 (first visit by image 1); then two updates.
    assert int(assigner.class_counts[1]) == 3 and int(assigner.class_counts[0]) == 0
    assert assigner.universum_count == 2


def _random_batch(generator: torch.Generator, batch_size: int = 3):
    maps = [_three_group_map(generator, noise=0.3)[0] for _ in range(batch_size)]
    features = torch.cat(maps)
    labels = torch.randint(0, 3, (batch_size,), generator=generator)
    return features, features.mean(dim=(2, 3)), labels


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_assigner_state_dict_round_trip_continues_identically(mode):
    generator = torch.Generator().manual_seed(9)
    first, second = _random_batch(generator), _random_batch(generator)
    original = TargetSampleAssigner(num_classes=3, feature_dim=4, mode=mode, seed=1)
    original(*first)
    state = copy.deepcopy(original.state_dict())
    expected = original(*second)
    assert expected.valid_count > 0

    resumed = TargetSampleAssigner(num_classes=3, feature_dim=4, mode=mode, seed=2)
    resumed.load_state_dict(state)
    again = resumed(*second)
    for field in ("source", "target", "universum", "valid_images", "subset_sizes"):
        assert torch.equal(getattr(again, field), getattr(expected, field))
    for key, value in original.state_dict().items():
        assert torch.equal(torch.as_tensor(resumed.state_dict()[key]), torch.as_tensor(value)), key

    # Without the state (other seed, fresh anchors) the samples differ: the test can fail.
    fresh = TargetSampleAssigner(num_classes=3, feature_dim=4, mode=mode, seed=2)(*second)
    assert not torch.equal(fresh.source, expected.source)


def test_assigner_with_the_same_seed_is_reproducible():
    generator = torch.Generator().manual_seed(10)
    batch = _random_batch(generator)
    one = TargetSampleAssigner(num_classes=3, feature_dim=4, seed=7)(*batch)
    two = TargetSampleAssigner(num_classes=3, feature_dim=4, seed=7)(*batch)
    assert torch.equal(one.source, two.source) and torch.equal(one.target, two.target)


def test_no_assigner_ablation_compares_sampled_pixels_with_z():
    generator = torch.Generator().manual_seed(12)
    features, z, labels = _random_batch(generator)
    features.requires_grad_()
    assigner = TargetSampleAssigner(num_classes=3, feature_dim=4, use_assigner=False)
    samples = assigner(features, z, labels)
    assert samples.valid_count == 3 and samples.subset_sizes is None
    assert samples.universum.shape == (0, 4)
    assert torch.equal(samples.source.detach(), z[:, None, :].expand(-1, 32, -1))
    rows = features.detach().flatten(2).transpose(1, 2)
    for image in range(3):
        matches = (samples.target[image].detach()[:, None, :] == rows[image][None]).all(dim=2)
        assert matches.sum(dim=1).eq(1).all()  # every target row is one pixel of its image
        assert matches.any(dim=0).sum() == 32  # 32 distinct pixels
    assert assigner.universum_count == 0 and int(assigner.class_counts.sum()) == 0
    multi_kernel_mmd(samples.source, samples.target).backward()
    assert features.grad.abs().sum() > 0
