"""K-means' two loops give the same results (issue 12, spec §5.4): the definition loop (full steps
in every iteration, the CPU's) and the fixed-size loop used off the CPU (plain steps, finished
problems frozen, stop flags read late, ties and empty clusters set aside). The fixed loop's
claims are tested where a GPU would put them under stress: flags that arrive iterations late,
working-set shrinks, and no host read between flag reads."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from wsolbench.methods.dawsol import kmeans as kmeans_module
from wsolbench.methods.dawsol.kmeans import kmeans_prepared, prepare_points


def _problems(seed: int, num_problems: int = 12, num_points: int = 120, num_features: int = 10):
    """ReLU blobs, a third of them a class's first visit (c1 == c2: a tie, then an empty cluster)."""
    generator = torch.Generator().manual_seed(seed)
    blob_centres = 3 * torch.rand(num_problems, 4, num_features, generator=generator)
    member = torch.randint(0, 4, (num_problems, num_points), generator=generator)
    points = torch.relu(blob_centres.gather(1, member[:, :, None].expand(-1, -1, num_features))
                        + 0.4 * torch.randn(num_problems, num_points, num_features, generator=generator))
    z = points.mean(dim=1)
    anchor = points[:, 0] + 0.2 * torch.rand(num_problems, num_features, generator=generator)
    anchor[::3] = z[::3]
    initial = torch.stack([0.5 * points.mean(dim=1), z, anchor], dim=1)
    return points, initial


def _definition(prepared, initial, **options):
    """The reference: checks every iteration on the CPU, the definition loop."""
    return kmeans_prepared(prepared, initial, sync_every=1, record_first_step=True, **options)


def _assert_same(got, expected, where):
    (result, first), (result_expected, first_expected) = got, expected
    for field in result._fields:
        assert torch.equal(getattr(result, field), getattr(result_expected, field)), f"{where}: {field}"
    for field in first._fields:
        assert torch.equal(getattr(first, field), getattr(first_expected, field)), f"{where}: first {field}"


class _LateFlags(kmeans_module._StopFlagReader):
    """Stop flags that arrive `lag` looks late unless waited for, as where a GPU runs behind the host."""

    lag = 1

    def post(self, flags, iteration):
        super().post(flags, iteration)
        self.looks = 0

    def take(self, wait):
        if self.pending is not None and not wait and self.looks < self.lag:
            self.looks += 1
            return None
        return super().take(wait)


@pytest.mark.parametrize("tol", [1e-4, 3e-2])  # 3e-2: many stop on the tolerance, not fixed points
@pytest.mark.parametrize("lag", [0, 1, 2, 7])
def test_late_stop_flags_change_no_result(tol, lag, monkeypatch):
    """The fixed loop runs on after a problem stopped until the host reads its flag; a frozen
    problem's extra iterations must change none of its results (centres, labels, n_iter, strict)."""
    monkeypatch.setattr(_LateFlags, "lag", lag)
    monkeypatch.setattr(kmeans_module, "_StopFlagReader", _LateFlags)
    for seed in range(3):
        points, initial = _problems(seed)
        prepared = prepare_points(points, tol)
        expected = _definition(prepared, initial)
        assert len(set(expected[0].n_iter.tolist())) > 2, "problems should stop at different iterations"
        for sync_every in (2, 3, 5):
            got = kmeans_prepared(prepared, initial, sync_every=sync_every, record_first_step=True)
            _assert_same(got, expected, f"seed {seed}, tol {tol}, lag {lag}, sync_every {sync_every}")


@pytest.mark.parametrize("max_iter", [1, 2, 3, 4, 6])
def test_problems_cut_off_by_max_iter(max_iter, monkeypatch):
    """At max_iter every problem leaves, stopped or not, with sklearn's final E-step; late flags
    must not let the loop run past it."""
    monkeypatch.setattr(kmeans_module, "_StopFlagReader", _LateFlags)
    points, initial = _problems(4)
    prepared = prepare_points(points)
    expected = _definition(prepared, initial, max_iter=max_iter)
    assert int(expected[0].n_iter.max()) == max_iter
    for sync_every in (1 + 1, 3, 50):
        got = kmeans_prepared(prepared, initial, max_iter=max_iter, sync_every=sync_every, record_first_step=True)
        _assert_same(got, expected, f"max_iter {max_iter}, sync_every {sync_every}")


def test_shrinking_the_working_set_changes_no_result(monkeypatch):
    """With SHRINK_MIN_BYTES at 0 the working set shrinks wherever half of it has left: the rows
    move, the results stay with their problems."""
    shrinks = Counter()
    select = kmeans_module._FixedState.select

    def counted_select(state, index):
        shrinks[len(index) < state.centres64.shape[0]] += 1
        return select(state, index)

    monkeypatch.setattr(kmeans_module._FixedState, "select", counted_select)
    monkeypatch.setattr(kmeans_module, "SHRINK_MIN_BYTES", 0)
    for lag in (0, 2):
        monkeypatch.setattr(_LateFlags, "lag", lag)
        monkeypatch.setattr(kmeans_module, "_StopFlagReader", _LateFlags)
        for seed in range(3):
            points, initial = _problems(seed, num_problems=16)
            prepared = prepare_points(points)
            got = kmeans_prepared(prepared, initial, sync_every=2, record_first_step=True)
            _assert_same(got, _definition(prepared, initial), f"seed {seed}, lag {lag}")
    assert shrinks[True] >= 6  # the path was taken (rows selected out of a larger state)


def test_without_shrinking_the_rows_stay_in_place(monkeypatch):
    """The default threshold (32 MiB) keeps these small problems in one working set to the end:
    no row is ever selected out."""
    selected = []
    select = kmeans_module._FixedState.select
    monkeypatch.setattr(kmeans_module._FixedState, "select",
                        lambda state, index: selected.append(len(index)) or select(state, index))
    points, initial = _problems(1, num_problems=16)
    prepared = prepare_points(points)
    _assert_same(kmeans_prepared(prepared, initial, sync_every=3, record_first_step=True),
                 _definition(prepared, initial), "default threshold")
    assert selected == []


class _HostReads(TorchFunctionMode):
    """Counts the reads that would block the host on a GPU (see benchmarks/assigner_cost.py)."""

    def __init__(self):
        super().__init__()
        self.reads = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("tolist", "item", "cpu", "__bool__", "nonzero", "__int__", "__float__"):
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def test_the_fixed_loop_never_blocks_on_its_flags():
    """Between its start and its results the fixed loop makes no blocking host read: its stop
    flags come through the asynchronous reader (a copy, read through numpy). The definition
    loop, for contrast, reads its flags with tolist at every check."""
    points, initial = _problems(2)
    prepared = prepare_points(points)
    fixed, definition = _HostReads(), _HostReads()
    with fixed:
        result, _ = kmeans_prepared(prepared, initial, sync_every=3, record_first_step=True)
    with definition:
        kmeans_prepared(prepared, initial, sync_every=1, record_first_step=True)
    assert int(result.n_iter.max()) >= 6
    assert sum(fixed.reads.values()) == 0, fixed.reads
    assert definition.reads["tolist"] >= int(result.n_iter.max())


def test_identical_centres_after_the_first_iteration_are_set_aside(monkeypatch):
    """A constant image: iteration 1 puts every point in cluster 0 and cannot relocate (every
    point sits on its centre), so the empty clusters take the largest cluster's mean and all
    three centres are identical: the plain E-step cannot break that tie, the problem is set
    aside and run again by the definition loop, with the same results."""
    redone = []
    definition = kmeans_module._lloyd_definition

    def counted(prepared, initial, max_iter, sync_every, record):
        redone.append((prepared.centred.shape[0], sync_every))
        return definition(prepared, initial, max_iter, sync_every, record)

    points, initial = _problems(3, num_problems=6)
    points[4] = 1.5  # constant image
    prepared = prepare_points(points)
    expected = _definition(prepared, initial)
    monkeypatch.setattr(kmeans_module, "_lloyd_definition", counted)
    got = kmeans_prepared(prepared, initial, sync_every=3, record_first_step=True)
    _assert_same(got, expected, "constant image")
    assert redone == [(1, 3)]  # problem 4 alone, from the fixed loop
    assert torch.equal(got[0].centres[4, 0], got[0].centres[4, 2])


def test_a_tie_flagged_in_a_later_iteration_sets_the_problem_aside(monkeypatch):
    """Identical centres after iteration 2 need float rounding to happen (two disjoint clusters'
    means), so the flag is forced here, for one problem in its third iteration: the problem must
    be set aside, however late the flags arrive, and its results are the definition loop's."""
    points, initial = _problems(5, num_problems=8)
    prepared = prepare_points(points)
    expected = _definition(prepared, initial)
    identical = kmeans_module._identical_centres
    calls = []

    def flag_problem_3_once(centres):
        same = identical(centres)
        calls.append(centres.shape[0])
        if len(calls) == 3:  # the state's start, iterations 2 and 3
            same = same.clone()
            same[3, 1] = True
        return same

    redone = []
    definition = kmeans_module._lloyd_definition
    monkeypatch.setattr(kmeans_module, "_identical_centres", flag_problem_3_once)
    monkeypatch.setattr(kmeans_module, "_lloyd_definition",
                        lambda prepared, *rest: redone.append(prepared.centred.shape[0]) or definition(prepared, *rest))
    monkeypatch.setattr(kmeans_module, "_StopFlagReader", _LateFlags)
    for lag in (0, 3):
        monkeypatch.setattr(_LateFlags, "lag", lag)
        calls.clear()
        redone.clear()
        got = kmeans_prepared(prepared, initial, sync_every=4, record_first_step=True)
        _assert_same(got, expected, f"lag {lag}")
        assert redone == [1], redone
