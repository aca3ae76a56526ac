"""The timing gate's logic (`wsolbench bench`), on given medians: ratios to the calibration, the
baseline per machine, thresholds from the spread, regressions named, new benchmarks and a missing
baseline passing, malformed files named. (The suite itself runs in .ci/run, not here: timing is
measured in benchmarks, never in unit tests.)"""
from __future__ import annotations

import json

import pytest

from wsolbench import bench
from wsolbench.cli import main
from wsolbench.errors import InputError

CALIBRATION_S = 0.020  # the calibration workload timed before each benchmark


def medians(**values: float) -> dict[str, float]:
    """A suite run's medians: each benchmark's, and the calibration timed before it."""
    return {**values, **{f"{bench.CALIBRATION_KEY}{name}": CALIBRATION_S for name in values}}


def fake_suite(monkeypatch, runs: list[dict[str, float]]) -> None:
    queue = list(runs)
    monkeypatch.setattr(bench, "run_suite", lambda benchmarks_dir, log: queue.pop(0))


def test_ratios_divide_each_benchmark_by_the_calibration_timed_next_to_it():
    assert bench.ratios_of(medians(evaluator=0.040, train_step=0.010)) == {"evaluator": 2.0, "train_step": 0.5}
    # A burst of load that doubled one benchmark and its calibration leaves its ratio alone.
    burst = {**medians(evaluator=0.080, train_step=0.010), "calibration:evaluator": 0.040}
    assert bench.ratios_of(burst) == {"evaluator": 2.0, "train_step": 0.5}


def test_the_threshold_is_the_squared_spread_but_never_below_the_floor():
    assert bench.threshold_of(1.05) == bench.MIN_THRESHOLD == 1.25
    assert bench.threshold_of(1.2) == pytest.approx(1.44)


def test_a_baseline_holds_the_median_ratio_spread_and_threshold_of_its_runs(tmp_path, monkeypatch):
    fake_suite(monkeypatch, [medians(a=0.040), medians(a=0.044), medians(a=0.050)])
    entry = bench.write_baseline(tmp_path, runs=3, log=lambda line: None)
    assert entry["ratios"]["a"] == pytest.approx(2.2)
    assert entry["spread"]["a"] == pytest.approx(2.5 / 2.0)
    assert entry["threshold"]["a"] == pytest.approx(1.5625)
    stored = json.loads((tmp_path / bench.BASELINE_FILE).read_text())
    assert list(stored["machines"]) == [bench.machine()] and stored["machines"][bench.machine()] == entry


def test_pooled_runs_of_another_host_widen_the_threshold_to_the_spread_between_hosts(tmp_path, monkeypatch):
    fake_suite(monkeypatch, [medians(a=0.040), medians(a=0.042)])
    bench.write_baseline(tmp_path, runs=2, log=lambda line: None)
    fake_suite(monkeypatch, [medians(a=0.056), medians(a=0.054)])  # the same code on a slower host
    entry = bench.write_baseline(tmp_path, runs=2, log=lambda line: None, pool=True)
    assert (entry["runs"], entry["hosts"]) == (4, 2)
    assert entry["spread"]["a"] == pytest.approx(2.8 / 2.0)
    assert entry["threshold"]["a"] == pytest.approx(1.4)  # the pooled spread, not squared
    assert entry["ratios"]["a"] == pytest.approx(2.4)  # the median of 2.0, 2.1, 2.7, 2.8
    fake_suite(monkeypatch, [medians(a=0.056)])  # the slower host again: within the pooled threshold
    assert not bench.run_gate(tmp_path, log=lambda line: None).failed
    fake_suite(monkeypatch, [medians(a=0.056), medians(a=0.054)])
    replaced = bench.write_baseline(tmp_path, runs=2, log=lambda line: None)  # without pool: replaced
    assert (replaced["runs"], replaced["hosts"]) == (2, 1)


def test_a_2x_slowdown_is_caught_and_named_and_noise_within_the_threshold_passes(tmp_path, monkeypatch):
    fake_suite(monkeypatch, [medians(evaluator=0.040, step=0.020), medians(evaluator=0.041, step=0.020),
                             medians(evaluator=0.080, step=0.022),   # 2x evaluator, 1.1x step
                             medians(evaluator=0.082, step=0.020),   # ... confirmed by the second run
                             medians(evaluator=0.042, step=0.021)])  # noise only
    bench.write_baseline(tmp_path, runs=2, log=lambda line: None)
    slow = bench.run_gate(tmp_path, log=lambda line: None)
    assert slow.failed and [line.name for line in slow.regressions] == ["evaluator"]
    assert "REGRESSED evaluator: 1.98x its baseline ratio (threshold 1.25x, in two runs)" in slow.text()
    quiet = bench.run_gate(tmp_path, log=lambda line: None)
    assert not quiet.failed and "no benchmark regressed" in quiet.text()


def test_a_burst_of_load_in_one_run_is_not_a_regression(tmp_path, monkeypatch):
    fake_suite(monkeypatch, [medians(a=0.040), medians(a=0.040),
                             medians(a=0.090),    # over the threshold once...
                             medians(a=0.041)])   # ...and not in the second run: noise
    bench.write_baseline(tmp_path, runs=2, log=lambda line: None)
    report = bench.run_gate(tmp_path, log=lambda line: None)
    assert not report.failed and report.lines[0].factor == pytest.approx(1.025)


def test_a_new_benchmark_or_machine_without_a_baseline_passes_and_says_so(tmp_path, monkeypatch):
    fake_suite(monkeypatch, [medians(a=0.04)])
    first = bench.run_gate(tmp_path, log=lambda line: None)  # no baseline file at all
    assert not first.failed and "no baseline for this machine" in first.text()
    # A benchmark the baseline lacks (a method just registered) is new, not regressed.
    fake_suite(monkeypatch, [medians(a=0.04), medians(a=0.04), medians(a=0.04, new_method=9.9)])
    bench.write_baseline(tmp_path, runs=2, log=lambda line: None)
    report = bench.run_gate(tmp_path, log=lambda line: None)
    assert not report.failed
    row = [line for line in report.text().splitlines() if line.startswith("new_method")][0]
    assert row.split()[-3:] == ["-", "new", "-"]
    # Another machine's entry is never compared with this machine's run.
    path = tmp_path / bench.BASELINE_FILE
    stored = json.loads(path.read_text())
    stored["machines"] = {"Some Other CPU, 64 CPUs, aarch64": stored["machines"][bench.machine()]}
    path.write_text(json.dumps(stored))
    fake_suite(monkeypatch, [medians(a=0.4)])  # 10x slower, but no entry for this machine
    other = bench.run_gate(tmp_path, log=lambda line: None)
    assert not other.failed and "no baseline for this machine" in other.text()


def test_a_malformed_baseline_is_named(tmp_path):
    path = tmp_path / bench.BASELINE_FILE
    path.write_text("{not json")
    with pytest.raises(InputError, match=str(path)):
        bench.run_gate(tmp_path, log=lambda line: None)
    path.write_text('{"ratios": {}}')
    with pytest.raises(InputError, match="no 'machines' object"):
        bench.read_baselines(path)


def test_the_command_exits_1_naming_the_regression_and_0_otherwise(tmp_path, monkeypatch, capsys):
    fake_suite(monkeypatch, [medians(a=0.04), medians(a=0.04), medians(a=0.10), medians(a=0.10), medians(a=0.04)])
    assert main(["bench", "--benchmarks", str(tmp_path), "--update-baseline", "--runs", "2", "--quiet"]) == 0
    assert "for this machine: 1 benchmarks from 2 runs" in capsys.readouterr().out
    assert main(["bench", "--benchmarks", str(tmp_path), "--quiet"]) == 1
    assert "REGRESSED a: 2.50x its baseline ratio" in capsys.readouterr().out
    assert main(["bench", "--benchmarks", str(tmp_path), "--quiet", "--store", str(tmp_path / "s.duckdb")]) == 0
    import duckdb

    with duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT benchmark, median_s, ratio, machine FROM benchmark_results ORDER BY benchmark")
        assert rows.fetchall() == [("a", 0.04, pytest.approx(2.0), bench.machine())]


def test_a_missing_suite_is_one_line(tmp_path, capsys):
    assert main(["bench", "--benchmarks", str(tmp_path / "nowhere")]) == 2
    assert "no benchmark suite there" in capsys.readouterr().err
