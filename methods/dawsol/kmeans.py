"""Batched Lloyd K-means with the exact stopping and empty-cluster rules of spec §5.4.

The target sample assigner (spec §5.3) clusters every image's pixels into 3 groups, starting
from given centres. The reference calls `sklearn.cluster.k_means(X, 3, init=..., n_init=1)`;
this module reproduces those semantics on torch tensors, for many independent problems at once
and on the data's own device.

Precision: the data and the centres are float32 as in sklearn (spec §5.4). Distances for the
E-step and the cluster sums for the M-step are accumulated in float64: this keeps the result
independent of TF32 matmul settings on GPUs and is at least as accurate as sklearn's float32.
The relocation distances are explicit float32 differences, as in sklearn, so that "all points sit
on their centres" is detected exactly.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class KMeansResult(NamedTuple):
    """Output of `kmeans`, one entry per problem."""

    centres: Tensor  # (P, K, C) float32: the final centres
    labels: Tensor  # (P, N) int64: the cluster of each point, consistent with `centres`
    n_iter: Tensor  # (P,) int64: Lloyd iterations run (sklearn's n_iter)
    strict_convergence: Tensor  # (P,) bool: stopped because the labels stopped changing


def kmeans(
    points: Tensor,
    initial_centres: Tensor,
    *,
    max_iter: int = 300,
    tol: float = 1e-4,
    sync_every: int | None = None,
) -> KMeansResult:
    """Run P independent K-means problems from given centres, as sklearn's Lloyd would.

    points: (P, N, C); initial_centres: (P, K, C). Both are detached and cast to float32.
    sync_every: Lloyd iterations between host checks for finished problems. It changes only
    speed, never results: a finished problem is frozen on the device until the next check.
    Default: every iteration on the CPU (a check costs nothing there), every 5 on a GPU.
    """
    if points.dim() != 3 or initial_centres.dim() != 3:
        raise ValueError(
            f"kmeans expects points (P, N, C) and initial_centres (P, K, C), got "
            f"{tuple(points.shape)} and {tuple(initial_centres.shape)}"
        )
    num_problems, num_points, num_features = points.shape
    num_clusters = initial_centres.shape[1]
    if initial_centres.shape[0] != num_problems or initial_centres.shape[2] != num_features:
        raise ValueError(
            f"initial_centres {tuple(initial_centres.shape)} do not match points "
            f"{tuple(points.shape)}"
        )
    if num_points < num_clusters:
        # sklearn refuses this too (n_samples must be >= n_clusters).
        raise ValueError(f"kmeans needs at least K={num_clusters} points, got N={num_points}")
    on_host = points.device.type == "cpu"
    if sync_every is None:
        sync_every = 1 if on_host else 5
    if max_iter < 1 or sync_every < 1:
        raise ValueError("kmeans needs max_iter >= 1 and sync_every >= 1")

    device = points.device
    if num_problems == 0:
        return KMeansResult(
            torch.empty(0, num_clusters, num_features, device=device),
            torch.empty(0, num_points, dtype=torch.int64, device=device),
            torch.empty(0, dtype=torch.int64, device=device),
            torch.empty(0, dtype=torch.bool, device=device),
        )
    data = points.detach().to(torch.float32)
    # Spec §5.4: sklearn centres the data first (neutral mathematically, better float32 rounding);
    # the init is cast to float32 and shifted by the same mean.
    data_mean = data.mean(dim=1, keepdim=True)
    centred = data - data_mean
    centred64 = centred.to(torch.float64)
    centres = initial_centres.detach().to(device=device, dtype=torch.float32) - data_mean
    # Spec §5.4: tol_abs = tol x mean over features of the population variance of the columns.
    tolerance = tol * centred64.var(dim=1, unbiased=False).mean(dim=1)

    out_centres = torch.empty_like(centres)
    out_labels = torch.empty(num_problems, num_points, dtype=torch.int64, device=device)
    out_n_iter = torch.empty(num_problems, dtype=torch.int64, device=device)
    out_strict = torch.empty(num_problems, dtype=torch.bool, device=device)

    # Working set: the problems still iterating. It shrinks at host checks, so stragglers do
    # not make finished problems pay for more iterations.
    working = torch.arange(num_problems, device=device)
    previous_labels = torch.full((num_problems, num_points), -1, dtype=torch.int64, device=device)
    n_iter = torch.zeros(num_problems, dtype=torch.int64, device=device)
    strict = torch.zeros(num_problems, dtype=torch.bool, device=device)
    done = torch.zeros(num_problems, dtype=torch.bool, device=device)

    for iteration in range(max_iter):
        labels = _nearest_centre(centred64, centres, on_host)
        new_centres = _update_centres(centred, centred64, centres, labels, on_host)
        centre_shift = (new_centres.to(torch.float64) - centres.to(torch.float64)).square().sum(
            dim=(1, 2)
        )

        # Per-problem stopping rules (spec §5.4); finished problems are frozen with where().
        active = ~done
        labels_unchanged = (labels == previous_labels).all(dim=1)
        centres = torch.where(active[:, None, None], new_centres, centres)
        previous_labels = torch.where(active[:, None], labels, previous_labels)
        n_iter = n_iter + active.to(torch.int64)
        strict = strict | (active & labels_unchanged)
        done = done | (active & (labels_unchanged | (centre_shift <= tolerance)))

        last_iteration = iteration == max_iter - 1
        if not last_iteration and (iteration + 1) % sync_every != 0:
            continue
        finished = torch.ones_like(done) if last_iteration else done
        finished_host = finished.cpu()  # the only host sync of the loop
        if not bool(finished_host.any()):
            continue
        finished_index = finished_host.nonzero().squeeze(1).to(device)
        _write_results(
            finished_index, working, centred64, centres, previous_labels, n_iter, strict,
            out_centres, out_labels, out_n_iter, out_strict,
        )
        if bool(finished_host.all()):
            break
        keep = (~finished_host).nonzero().squeeze(1).to(device)
        working = working[keep]
        centred, centred64 = centred[keep], centred64[keep]
        centres, previous_labels = centres[keep], previous_labels[keep]
        n_iter, strict, done, tolerance = n_iter[keep], strict[keep], done[keep], tolerance[keep]

    return KMeansResult(out_centres + data_mean, out_labels, out_n_iter, out_strict)


def _write_results(
    finished_index: Tensor,
    working: Tensor,
    centred64: Tensor,
    centres: Tensor,
    previous_labels: Tensor,
    n_iter: Tensor,
    strict: Tensor,
    out_centres: Tensor,
    out_labels: Tensor,
    out_n_iter: Tensor,
    out_strict: Tensor,
) -> None:
    """Copy finished problems into the outputs, with sklearn's final E-step where it applies."""
    final_centres = centres[finished_index]
    final_strict = strict[finished_index]
    # Spec §5.4: without strict convergence, one more E-step makes the labels match the
    # final centres; with it, the last iteration's labels already do.
    final_labels = torch.where(
        final_strict[:, None],
        previous_labels[finished_index],
        _nearest_centre(centred64[finished_index], final_centres, centres.device.type == "cpu"),
    )
    target = working[finished_index]
    out_centres[target] = final_centres
    out_labels[target] = final_labels
    out_n_iter[target] = n_iter[finished_index]
    out_strict[target] = final_strict


def _nearest_centre(points64: Tensor, centres: Tensor, on_host: bool = False) -> Tensor:
    """E-step: the index of the nearest centre, ties to the lowest index (spec §5.4).

    on_host: the tensors are on the CPU, where asking whether a rare case occurs costs nothing,
    so its branch-free handling (written for GPUs) is skipped when it does not.
    """
    centres64 = centres.to(torch.float64)
    # ||x - c||^2 minus the per-point constant ||x||^2, which does not change the argmin.
    distances = centres64.square().sum(dim=2)[:, None, :] - 2.0 * torch.bmm(
        points64, centres64.transpose(1, 2)
    )
    # Identical centres (a class's first visit, spec §5.3: c1 == c2) must tie exactly so that
    # the lowest index wins; copy the column rather than trust the matmul to round alike.
    num_clusters = centres.shape[1]
    for later in range(1, num_clusters):
        for earlier in range(later):
            same_centre = (centres[:, earlier] == centres[:, later]).all(dim=1)
            if on_host and not bool(same_centre.any()):
                continue
            distances[:, :, later] = torch.where(
                same_centre[:, None], distances[:, :, earlier], distances[:, :, later]
            )
    # torch.argmin returns the first minimal index: ties go to the lowest cluster (strict <).
    return distances.argmin(dim=2)


def _update_centres(points: Tensor, points64: Tensor, centres: Tensor, labels: Tensor,
                    on_host: bool = False) -> Tensor:
    """M-step with sklearn's empty-cluster relocation (spec §5.4); returns float32 centres."""
    num_features = points.shape[2]
    num_clusters = centres.shape[1]
    cluster_index = torch.arange(num_clusters, device=labels.device)
    # One-hot by comparison: no host sync and no atomics on GPUs (unlike one_hot/scatter_add).
    membership = (labels[:, :, None] == cluster_index).to(torch.float64)  # (P, N, K)
    sums = torch.bmm(membership.transpose(1, 2), points64)  # (P, K, C)
    counts = membership.sum(dim=1)  # (P, K)

    empty = counts == 0
    if on_host and not bool(empty.any()):  # the usual case: no relocation, plain means
        return (sums / counts[:, :, None]).to(torch.float32)
    # Distances of each point to the centre it was assigned in this E-step, explicit in float32
    # as in sklearn; built in place to keep one (P, N, C) temporary.
    difference = centres.gather(1, labels[:, :, None].expand(-1, -1, num_features))
    distance_to_own = difference.sub_(points).square_().sum(dim=2)  # (P, N)
    del difference
    # The farthest points, largest first; a stable sort sends equal distances to the lowest
    # point index (sklearn's argpartition leaves that order unspecified).
    farthest = torch.sort(distance_to_own, dim=1, descending=True, stable=True).indices
    farthest = farthest[:, :num_clusters]
    # The m-th empty cluster (in increasing cluster index) takes the m-th farthest point;
    # m counts the empty clusters before it.
    earlier = cluster_index[None, :] < cluster_index[:, None]  # (K, K): [j, i] = i < j
    empty_rank = (empty[:, None, :] & earlier).sum(dim=2)  # (P, K)
    moved_point = farthest.gather(1, empty_rank)  # (P, K)
    # Spec §5.4: skip relocation when every point already sits on its centre (max d_p = 0).
    relocate = empty & (distance_to_own.amax(dim=1) > 0)[:, None]
    moved_rows = points64.gather(1, moved_point[:, :, None].expand(-1, -1, num_features))
    # The moved point leaves its own cluster's sum and count; its label entry is kept.
    donor_cluster = labels.gather(1, moved_point)  # (P, K)
    donation = (donor_cluster[:, :, None] == cluster_index).to(torch.float64)
    donation = donation * relocate[:, :, None].to(torch.float64)  # [p, empty j, donor i]
    removed_sums = torch.bmm(donation.transpose(1, 2), moved_rows)
    removed_counts = donation.sum(dim=1)
    sums = torch.where(relocate[:, :, None], moved_rows, sums - removed_sums)
    counts = torch.where(relocate, torch.ones_like(counts), counts - removed_counts)

    means = sums / counts.clamp(min=1.0)[:, :, None]
    # A cluster still empty (relocation skipped, or a donor emptied) is placed on the largest
    # cluster's mean (first largest on ties), as recent sklearn intends; spec §5.4 is silent.
    largest = counts.argmax(dim=1)
    largest_mean = means.gather(1, largest[:, None, None].expand(-1, 1, num_features))
    means = torch.where((counts > 0)[:, :, None], means, largest_mean)
    return means.to(torch.float32)
