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

import numpy as np
import torch
from torch import Tensor


# Lloyd iterations between host checks for finished problems off the CPU (kmeans' sync_every).
# A check costs one host read (a sync, a few launches' worth of waiting); an iteration of the
# fixed-size loop costs 27 launches, and the last problem to finish waits on average (k - 1) / 2
# iterations for a check made every k. 3 keeps both small (issue 12, benchmarks/RESULTS.md).
DEVICE_SYNC_EVERY = 3
# The fixed-size loop drops finished problems from its working set only where at least half of
# it has finished and those hold at least this many bytes of float64 points. A shrink costs about
# 25 launches; every later iteration then reads those bytes twice less (the E- and M-step
# matmuls), which outweighs the launches only for large maps: 32 MiB is 2.6 images of ResNet50's
# 28x28x2048 and 21 of the embedded default's 16x16x128 maps. An estimate, not a measurement.
SHRINK_MIN_BYTES = 32 * 2**20


class KMeansResult(NamedTuple):
    """Output of `kmeans`, one entry per problem."""

    centres: Tensor  # (P, K, C) float32: the final centres
    labels: Tensor  # (P, N) int64: the cluster of each point, consistent with `centres`
    n_iter: Tensor  # (P,) int64: Lloyd iterations run (sklearn's n_iter)
    strict_convergence: Tensor  # (P,) bool: stopped because the labels stopped changing


class PreparedPoints(NamedTuple):
    """The problems' data as the Lloyd iterations use it (spec §5.4), computed once per problem."""

    centred: Tensor  # (P, N, C) float32: the points minus their mean
    centred64: Tensor  # (P, N, C) float64 copy, for the E-step distances and M-step sums
    mean: Tensor  # (P, 1, C) float32: the mean subtracted
    tolerance: Tensor  # (P,) float64: tol_abs

    def select(self, index: Tensor) -> "PreparedPoints":
        return PreparedPoints(*(field[index] for field in self))


class FirstStep(NamedTuple):
    """What a problem's first Lloyd iteration made of its initial centres.

    The rest of the run depends on the initial centres only through these (spec §5.4: iteration 2
    starts from `centres` and compares its labels with `labels`; the first stop test is
    `stopped`), so two runs with equal FirstSteps are equal from there on, whatever their initial
    centres were. The sequential assigner's speculative engine relies on this.
    """

    labels: Tensor  # (P, N) int64: the first E-step's labels
    centres: Tensor  # (P, K, C) float32 (centred): the first M-step's centres, relocation included
    stopped: Tensor  # (P,) bool: the first iteration's centre shift was within the tolerance


def prepare_points(points: Tensor, tol: float = 1e-4) -> PreparedPoints:
    """Centre the data and set the tolerance, as sklearn does before iterating (spec §5.4)."""
    data = points.detach().to(torch.float32)
    # Spec §5.4: sklearn centres the data first (neutral mathematically, better float32 rounding);
    # the init is cast to float32 and shifted by the same mean.
    data_mean = data.mean(dim=1, keepdim=True)
    centred = data - data_mean
    centred64 = centred.to(torch.float64)
    # Spec §5.4: tol_abs = tol x mean over features of the population variance of the columns.
    tolerance = tol * centred64.var(dim=1, unbiased=False).mean(dim=1)
    return PreparedPoints(centred, centred64, data_mean, tolerance)


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
    sync_every: Lloyd iterations between host reads of the stop flags. It changes only speed,
    never results: a finished problem is frozen on the device until the host has read its flag.
    Default: every iteration on the CPU (a read costs nothing there), every DEVICE_SYNC_EVERY elsewhere.
    """
    _check_shapes(points, initial_centres)
    if points.shape[0] == 0:
        return _empty_result(points, initial_centres.shape[1])
    return kmeans_prepared(prepare_points(points, tol), initial_centres, max_iter=max_iter,
                           sync_every=sync_every)[0]


def _check_shapes(points: Tensor, initial_centres: Tensor) -> None:
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


def _empty_result(points: Tensor, num_clusters: int) -> KMeansResult:
    device, (_, num_points, num_features) = points.device, points.shape
    return KMeansResult(
        torch.empty(0, num_clusters, num_features, device=device),
        torch.empty(0, num_points, dtype=torch.int64, device=device),
        torch.empty(0, dtype=torch.int64, device=device),
        torch.empty(0, dtype=torch.bool, device=device),
    )


def _host_branches(device: torch.device, sync_every: int) -> bool:
    """Whether questions to the data cost nothing: on the CPU, finished problems checked every
    iteration (its default). There the definition loop runs and skips rare-case work after
    asking the data (a host read per question). Elsewhere, and in the GPU-shaped CPU runs of
    benchmarks/assigner_cost.py, the fixed-size loop runs, branch-free on the device.
    """
    return device.type == "cpu" and sync_every == 1


def first_step(prepared: PreparedPoints, initial_centres: Tensor) -> FirstStep:
    """The first Lloyd iteration of each problem from `initial_centres` (see FirstStep)."""
    centres = initial_centres.detach().to(device=prepared.centred.device, dtype=torch.float32) - prepared.mean
    labels = _nearest_centre(prepared.centred64, centres)
    new_centres = _update_centres(prepared.centred, prepared.centred64, centres, labels)
    return FirstStep(labels, new_centres, _centre_shift(new_centres, centres) <= prepared.tolerance)


def _centre_shift(new_centres: Tensor, centres: Tensor) -> Tensor:
    return (new_centres.to(torch.float64) - centres.to(torch.float64)).square().sum(dim=(1, 2))


def kmeans_prepared(
    prepared: PreparedPoints,
    initial_centres: Tensor,
    *,
    max_iter: int = 300,
    sync_every: int | None = None,
    record_first_step: bool = False,
) -> tuple[KMeansResult, FirstStep | None]:
    """`kmeans` on prepared points; with record_first_step, also each problem's FirstStep.

    Two loops compute the same results (tests compare them):
      `_lloyd_definition`: the full E- and M-steps of spec §5.4 in every iteration (ties between
        identical centres, empty-cluster relocation), finished problems leaving the working set
        at every host check. The CPU's loop (checks every iteration), and the one a problem set
        aside by the other loop is run again with.
      `_lloyd_fixed`: off the CPU (and wherever checks are sparser). The first iteration in full
        (a class's first visit starts with c1 == c2 and leaves a cluster empty, spec §5.3), then
        a fixed-size iteration of 27 operator launches and no host synchronisation (issue 12):
        the plain E- and M-steps, which cannot relocate or break ties, so a problem whose centres
        become identical or whose cluster empties (its mean is then 0/0 = NaN) is set aside and
        run again by the definition loop.
    """
    centres, labels, n_iter, strict, first = _lloyd(prepared, initial_centres, max_iter, sync_every,
                                                    record_first_step)
    return KMeansResult(centres + prepared.mean, labels, n_iter, strict), first


def _lloyd(prepared: PreparedPoints, initial_centres: Tensor, max_iter: int, sync_every: int | None,
           record_first_step: bool):
    """kmeans_prepared's loop; the centres it returns are centred (the data mean not added back)."""
    device = prepared.centred.device
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else DEVICE_SYNC_EVERY
    if max_iter < 1 or sync_every < 1:
        raise ValueError("kmeans needs max_iter >= 1 and sync_every >= 1")
    if _host_branches(device, sync_every):
        return _lloyd_definition(prepared, initial_centres, max_iter, sync_every, record_first_step)
    return _lloyd_fixed(prepared, initial_centres, max_iter, sync_every, record_first_step)


def _lloyd_definition(prepared: PreparedPoints, initial_centres: Tensor, max_iter: int, sync_every: int,
                      record_first_step: bool):
    """Spec §5.4 written out: the full steps in every iteration (see kmeans_prepared)."""
    centred, centred64 = prepared.centred, prepared.centred64
    num_problems, num_points, _ = centred.shape
    device = centred.device
    branch_on_host = _host_branches(device, sync_every)
    tolerance = prepared.tolerance
    centres = initial_centres.detach().to(device=device, dtype=torch.float32) - prepared.mean

    out_centres = torch.empty_like(centres)
    out_labels = torch.empty(num_problems, num_points, dtype=torch.int64, device=device)
    out_n_iter = torch.empty(num_problems, dtype=torch.int64, device=device)
    out_strict = torch.empty(num_problems, dtype=torch.bool, device=device)
    first = None

    # Working set: the problems still iterating (their indices, on the host). It shrinks at host
    # checks, so stragglers do not make finished problems pay for more iterations.
    working = list(range(num_problems))
    previous_labels = torch.full((num_problems, num_points), -1, dtype=torch.int64, device=device)
    n_iter = torch.zeros(num_problems, dtype=torch.int64, device=device)
    strict = torch.zeros(num_problems, dtype=torch.bool, device=device)
    done = torch.zeros(num_problems, dtype=torch.bool, device=device)

    for iteration in range(max_iter):
        active = ~done
        labels = _nearest_centre(centred64, centres)
        new_centres = _update_centres(centred, centred64, centres, labels, branch_on_host)
        centre_shift = _centre_shift(new_centres, centres)

        # Per-problem stopping rules (spec §5.4); finished problems are frozen with where().
        labels_unchanged = (labels == previous_labels).all(dim=1)
        stopped = labels_unchanged | (centre_shift <= tolerance)
        if iteration == 0 and record_first_step:
            first = FirstStep(labels, new_centres, stopped)
        centres = torch.where(active[:, None, None], new_centres, centres)
        previous_labels = torch.where(active[:, None], labels, previous_labels)
        n_iter = n_iter + active.to(torch.int64)
        strict = strict | (active & labels_unchanged)
        done = done | (active & stopped)

        last_iteration = iteration == max_iter - 1
        if not last_iteration and (iteration + 1) % sync_every != 0:
            continue
        # The loop's one host read: which problems are finished (all at the last iteration).
        finished_flags = [True] * len(working) if last_iteration else done.tolist()
        finished_rows = [row for row, finished in enumerate(finished_flags) if finished]
        kept_rows = [row for row, finished in enumerate(finished_flags) if not finished]
        if finished_rows:
            _write_results(
                torch.tensor(finished_rows, device=device), torch.tensor([working[row] for row in finished_rows],
                                                                         device=device),
                centred64, centres, previous_labels, n_iter, strict, out_centres, out_labels, out_n_iter, out_strict,
            )
        if not kept_rows:
            break
        if len(kept_rows) == len(working):
            continue
        working = [working[row] for row in kept_rows]
        keep = torch.tensor(kept_rows, device=device)
        centred, centred64 = centred[keep], centred64[keep]
        centres, previous_labels = centres[keep], previous_labels[keep]
        n_iter, strict, done, tolerance = n_iter[keep], strict[keep], done[keep], tolerance[keep]
    return out_centres, out_labels, out_n_iter, out_strict, first


def _write_results(
    finished_index: Tensor,
    target: Tensor,
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
        _nearest_centre(centred64[finished_index], final_centres),
    )
    out_centres[target] = final_centres
    out_labels[target] = final_labels
    out_n_iter[target] = n_iter[finished_index]
    out_strict[target] = final_strict


class _FixedState(NamedTuple):
    """The fixed-size loop's per-problem state; every field's first dimension is the problem."""

    centres64: Tensor  # (P, K, C) float64: the current float32 centres, exactly, as float64
    stop_labels: Tensor  # (P, N, 1) int64: the last iteration's labels, kept from the stop on
    frozen: Tensor  # (P, 1, 1) bool: stopped in an earlier iteration (spec §5.4's stop tests)
    strict: Tensor  # (P, 1, 1) bool: the stop was strict convergence (labels unchanged)
    frozen_iterations: Tensor  # (P, 1, 1) int64: iterations run while frozen (n_iter = run - these)
    tied: Tensor  # (P, K) bool: two centres were identical entering some iteration

    def select(self, index: Tensor) -> "_FixedState":
        return _FixedState(*(field[index] for field in self))


class _FixedData(NamedTuple):
    """What the fixed-size loop reads but does not change, and its scratch buffers."""

    points64: Tensor  # (P, N, C) float64: the centred points
    tolerance: Tensor  # (P, 1, 1) float64: tol_abs
    cluster_index: Tensor  # (K,) int64
    membership: Tensor  # (P, N, K) float64 scratch: the one-hot labels
    means: Tensor  # (P, K, C) float32 scratch: the M-step's centres

    @classmethod
    def of(cls, points64: Tensor, tolerance: Tensor, num_clusters: int) -> "_FixedData":
        (num_problems, num_points, num_features), device = points64.shape, points64.device
        return cls(points64, tolerance.view(num_problems, 1, 1), torch.arange(num_clusters, device=device),
                   torch.empty(num_problems, num_points, num_clusters, dtype=torch.float64, device=device),
                   torch.empty(num_problems, num_clusters, num_features, dtype=torch.float32, device=device))


def _lloyd_fixed(prepared: PreparedPoints, initial_centres: Tensor, max_iter: int, sync_every: int,
                 record_first_step: bool):
    """Spec §5.4 off the CPU, in fixed-size iterations with masks (see kmeans_prepared).

    After the first iteration a problem's whole state is its centres and last labels, so a
    stopped problem is frozen by keeping its centres (a where()): its shift is then 0 and it stays
    stopped, and its later E-steps give the labels of its final centres. Finished problems thus
    cost no launches, and iterations run after a problem stopped change none of its results. So
    the host need not wait for the stop flags: it reads them asynchronously (`_StopFlagReader`),
    up to `sync_every` iterations late, and iterates on meanwhile. The working set shrinks only
    where it halves and frees SHRINK_MIN_BYTES.
    """
    centred, centred64 = prepared.centred, prepared.centred64
    num_problems, num_points, _ = centred.shape
    num_clusters = initial_centres.shape[1]
    device = centred.device
    centres = initial_centres.detach().to(device=device, dtype=torch.float32) - prepared.mean

    # Iteration 1 in full. Its labels cannot equal the "previous" ones (there are none), so it
    # stops only on the tolerance.
    labels = _nearest_centre(centred64, centres)
    new_centres = _update_centres(centred, centred64, centres, labels)
    stopped = _centre_shift(new_centres, centres) <= prepared.tolerance
    first = FirstStep(labels, new_centres, stopped) if record_first_step else None

    centres64 = new_centres.to(torch.float64)
    shape = (num_problems, 1, 1)
    loop = _FixedLoop(
        _FixedState(centres64, labels[:, :, None], stopped.view(shape), torch.zeros(shape, dtype=torch.bool, device=device),
                    torch.zeros(shape, dtype=torch.int64, device=device), _identical_centres(centres64)),
        _FixedData.of(centred64, prepared.tolerance, num_clusters))
    flags = _StopFlagReader(device, num_problems, 1 + 2 * num_clusters)
    iterations = 1
    while True:
        at_limit = iterations == max_iter
        if at_limit or iterations % sync_every == 0:
            # At most one read in flight: the previous one, sync_every iterations old, is due.
            if flags.pending is not None and not at_limit and loop.leave(*flags.take(wait=True), everything=False):
                break
            flags.post(loop.stop_flags(), iterations)
        read = flags.take(wait=at_limit)
        if read is not None and loop.leave(*read, everything=at_limit):
            break
        loop.iterate()
        iterations = loop.iterations

    out, out_n_iter = loop.results()
    # sklearn's final labels (spec §5.4): the last iteration's after strict convergence, else an
    # E-step with the final centres.
    final_labels = torch.where(out.strict, out.stop_labels, _plain_nearest_centre(centred64, out.centres64))
    result = [out.centres64.to(torch.float32), final_labels.view(num_problems, num_points), out_n_iter,
              out.strict.view(-1)]
    # Problems set aside (their flags): run again, in full, from their initial centres.
    if loop.set_aside:
        index = torch.tensor(sorted(loop.set_aside), device=device)
        redone = _lloyd_definition(prepared.select(index), initial_centres[index.to(initial_centres.device)],
                                   max_iter, sync_every, False)
        for buffer, value in zip(result, redone):
            buffer[index] = value
    return (*result, first)


class _StopFlagReader:
    """The fixed-size loop's host reads of its stop flags, without waiting for the device.

    On a GPU a snapshot of the flags is copied into pinned host memory behind the queued work
    (non_blocking) and a CUDA event marks its arrival; `take` looks at the event and hands the
    flags over only once they are there, unless told to wait. Waiting for a snapshot taken
    sync_every iterations earlier still leaves the GPU those iterations to run, unlike a
    blocking read of the current flags, which drains its queue. On the CPU the copy is done
    when `post` returns. One buffer, allocated once, and at most one snapshot in flight.
    """

    def __init__(self, device: torch.device, rows: int, width: int):
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.buffer = torch.empty(rows, width, dtype=torch.bool, pin_memory=self.on_cuda)
        self.host = self.buffer.numpy()  # the same memory
        self.pending: tuple[int, int, object] | None = None  # (iteration, rows, event)

    def post(self, flags: Tensor, iteration: int) -> None:
        rows = flags.shape[0]
        self.buffer[:rows].copy_(flags, non_blocking=True)
        event = None
        if self.on_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))  # the flags' device, not the current one
        self.pending = (iteration, rows, event)

    def take(self, wait: bool) -> tuple[int, np.ndarray] | None:
        """(the iteration the flags are of, the flags) once they have arrived; None before."""
        if self.pending is None:
            return None
        iteration, rows, event = self.pending
        if event is not None and not event.query():
            if not wait:
                return None
            event.synchronize()
        self.pending = None
        return iteration, self.host[:rows].copy()


class _FixedLoop:
    """The fixed-size loop's working set: its state's rows, the problems they are, and the
    results of the problems that have left it."""

    def __init__(self, state: "_FixedState", data: "_FixedData"):
        self.state, self.data = state, data
        self.num_problems = state.centres64.shape[0]
        self.working = list(range(self.num_problems))  # the problems of the state's rows
        self.iterations = 1
        self.set_aside: set[int] = set()  # problems the plain steps cannot run (see stop_flags)
        self.out: _FixedState | None = None  # the results of problems that left early, by problem
        self.out_n_iter: Tensor | None = None

    def iterate(self) -> None:
        self.state = _fixed_iteration(self.state, self.data)
        self.iterations += 1

    def stop_flags(self) -> Tensor:
        """(rows, 1 + 2K) bool: stopped; then what the plain steps cannot do: identical centres
        (per centre), an empty cluster's NaN mean (per centre). Flags stay set once set."""
        state = self.state
        return torch.cat([state.frozen.view(-1, 1), state.tied, state.centres64.isnan().any(dim=2)], dim=1)

    def leave(self, iteration: int, flags: np.ndarray, everything: bool) -> bool:
        """Take out the rows whose flags (read at `iteration`, the rows unchanged since) say they
        are done or set aside, all of them if `everything`; True when none is left."""
        bad = flags[:, 1:].any(axis=1)
        self.set_aside.update(self.working[row] for row in np.flatnonzero(bad).tolist())
        leaving = np.flatnonzero(flags[:, 0] | bad | everything).tolist()
        device = self.state.frozen.device
        if len(leaving) == len(self.working) and self.out is None:  # never shrunk: rows in problem order
            self.out, self.out_n_iter = self.state, self.iterations - self.state.frozen_iterations.view(-1)
            return True
        points = self.data.points64
        frees = len(leaving) * points.shape[1] * points.shape[2] * points.element_size() >= SHRINK_MIN_BYTES
        if not (len(leaving) == len(self.working) or (2 * len(leaving) >= len(self.working) and frees)):
            return False
        if self.out is None:
            self.out = _FixedState(*(torch.empty((self.num_problems, *field.shape[1:]), dtype=field.dtype,
                                                 device=device) for field in self.state))
            self.out_n_iter = torch.empty(self.num_problems, dtype=torch.int64, device=device)
        index = torch.tensor(leaving, device=device)
        target = torch.tensor([self.working[row] for row in leaving], device=device)
        for buffer, value in zip(self.out, self.state.select(index)):
            buffer[target] = value
        self.out_n_iter[target] = self.iterations - self.state.frozen_iterations[index].view(-1)
        if len(leaving) == len(self.working):
            return True
        left = set(leaving)
        kept = [row for row in range(len(self.working)) if row not in left]
        self.working = [self.working[row] for row in kept]
        keep = torch.tensor(kept, device=device)
        self.state = self.state.select(keep)
        self.data = _FixedData.of(self.data.points64[keep], self.data.tolerance.view(-1)[keep],
                                  self.data.cluster_index.shape[0])
        return False

    def results(self) -> tuple["_FixedState", Tensor]:
        return self.out, self.out_n_iter


def _fixed_iteration(state: _FixedState, data: _FixedData) -> _FixedState:
    """One Lloyd iteration (spec §5.4) of the plain steps for every problem, frozen ones kept."""
    centres64, stop_labels, frozen, strict, frozen_iterations, tied = state
    labels = _plain_nearest_centre(data.points64, centres64)  # (P, N, 1)
    unchanged = (labels == stop_labels).all(dim=1, keepdim=True)
    # Kept from the stop on for sklearn's final labels after strict convergence. After the plain M-step
    # these equal the next E-step's, unless the M-step of the same labels rounds otherwise (the
    # matmul kernel can change with the working set's size on a GPU): that case costs this where().
    stop_labels = torch.where(frozen, stop_labels, labels)
    # M-step: one-hot by comparison (no host sync, no atomics), sums by a matmul, means rounded
    # to float32 as sklearn's centres are; an empty cluster's 0/0 is NaN, which sets it aside.
    membership = torch.eq(labels, data.cluster_index, out=data.membership).transpose(1, 2)  # (P, K, N)
    torch.div(torch.bmm(membership, data.points64), membership.sum(dim=2, keepdim=True), out=data.means)
    new_centres64 = torch.where(frozen, centres64, data.means.to(torch.float64))
    shift = (new_centres64 - centres64).square().sum(dim=(1, 2), keepdim=True)
    strict = torch.where(frozen, strict, unchanged)
    frozen_iterations = frozen_iterations + frozen
    # A frozen problem's shift is 0, so it stays stopped.
    stopped = unchanged | (shift <= data.tolerance)
    tied = tied | _identical_centres(new_centres64)
    return _FixedState(new_centres64, stop_labels, stopped, strict, frozen_iterations, tied)


def _plain_nearest_centre(points64: Tensor, centres64: Tensor) -> Tensor:
    """The E-step where no two centres are identical: (P, N, 1) labels.

    The same arithmetic as `_nearest_centre` (tests compare), whose tie copy then changes nothing.
    """
    centres_t = centres64.transpose(1, 2)
    norms = centres_t.square().sum(dim=1, keepdim=True)  # (P, 1, K)
    return torch.sub(norms, torch.bmm(points64, centres_t), alpha=2.0).argmin(dim=2, keepdim=True)


def _identical_centres(centres: Tensor) -> Tensor:
    """(P, K) bool: centre j equals centre (j - s) mod K for some s; the shifts up to K // 2 cover
    every pair (one shift for K = 3)."""
    same = torch.zeros(centres.shape[:2], dtype=torch.bool, device=centres.device) if centres.shape[1] < 2 else None
    for shift in range(1, centres.shape[1] // 2 + 1):
        pairs = (centres == centres.roll(shift, dims=1)).all(dim=2)
        same = pairs if same is None else same | pairs
    return same


def _nearest_centre(points64: Tensor, centres: Tensor) -> Tensor:
    """E-step: the index of the nearest centre, ties to the lowest index (spec §5.4)."""
    centres64 = centres.to(torch.float64)
    # ||x - c||^2 minus the per-point constant ||x||^2, which does not change the argmin.
    distances = centres64.square().sum(dim=2)[:, None, :] - 2.0 * torch.bmm(
        points64, centres64.transpose(1, 2)
    )
    # Identical centres (a class's first visit, spec §5.3: c1 == c2) must tie exactly so that
    # the lowest index wins; copy the column of the first identical centre rather than trust the
    # matmul to round alike. (== is transitive, so this is the pairwise copy done all at once.)
    num_clusters = centres.shape[1]
    same = (centres[:, :, None, :] == centres[:, None, :, :]).all(dim=3)  # [p, j, i]: c_j == c_i
    same = same | torch.eye(num_clusters, dtype=torch.bool, device=centres.device)
    first_same = same.to(torch.uint8).argmax(dim=2)  # the first i with c_i == c_j: i <= j
    distances = distances.gather(2, first_same[:, None, :].expand(-1, points64.shape[1], -1))
    # torch.argmin returns the first minimal index: ties go to the lowest cluster (strict <).
    return distances.argmin(dim=2)


def _cluster_sums(points64: Tensor, labels: Tensor, num_clusters: int) -> tuple[Tensor, Tensor]:
    """Per cluster: the sum of its points (P, K, C) and their number (P, K), float64."""
    cluster_index = torch.arange(num_clusters, device=labels.device)
    # One-hot by comparison: no host sync and no atomics on GPUs (unlike one_hot/scatter_add).
    membership = (labels[:, :, None] == cluster_index).to(torch.float64)  # (P, N, K)
    return torch.bmm(membership.transpose(1, 2), points64), membership.sum(dim=1)


def _update_centres(points: Tensor, points64: Tensor, centres: Tensor, labels: Tensor,
                    branch_on_host: bool = False) -> Tensor:
    """M-step with sklearn's empty-cluster relocation (spec §5.4); returns float32 centres."""
    num_features = points.shape[2]
    num_clusters = centres.shape[1]
    cluster_index = torch.arange(num_clusters, device=labels.device)
    sums, counts = _cluster_sums(points64, labels, num_clusters)

    empty = counts == 0
    if branch_on_host and not bool(empty.any()):  # the usual case: no relocation, plain means
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
