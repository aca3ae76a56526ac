"""The timing-regression gate (`wsolbench bench`): the pytest-benchmark suite of benchmarks/, normalised
by its calibration workload, against a committed baseline of those ratios.

    report = run_gate(Path("benchmarks"))                 # exit status: report.failed
    write_baseline(Path("benchmarks"), runs=3)            # `wsolbench bench --update-baseline`

Why ratios. These machines are shared and noisy, and CI machines differ: a benchmark's seconds move
with the machine and its load, its ratio to a calibration workload timed right before it, in the
same process, much less (one calibration for the whole run was tried first: a burst of load during
it moved every ratio by 25 %). The baseline holds each benchmark's ratio (the median over the runs
that made it) and its run-to-run spread (max / min of those runs' ratios). A benchmark regresses
when now / baseline exceeds its threshold, max(MIN_THRESHOLD, spread ** 2): quiet on the noise
that was measured, and the smallest slowdown the gate can see is that threshold (printed).

A benchmark over its threshold is confirmed by a second run of the suite (the smaller ratio of the
two is kept): a slowdown in the code persists, a burst of load on a shared machine rarely repeats.

The baseline file holds one entry per machine (the CPU model, core count and architecture):
ratios are stable across runs of one machine but not across CPU models (an AVX-512 Xeon and an
AVX2 EPYC speed torch's convolutions and numba's kernels up by different factors), so a run is
compared with its own machine's entry only. A machine with no entry yet, and a benchmark with no
entry (a method just added to the registry), are reported as new and pass: the gate says so, and
`--update-baseline` adds this machine's entry (other machines' entries are kept). The key does not
tell every host apart: `--update-baseline --pool` adds another host's runs to its entry (see
write_baseline).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from wsolbench import __version__, atomic
from wsolbench.errors import InputError, WsolbenchError

SUITE = "test_benchmarks.py"
BASELINE_FILE = "baseline.json"
CALIBRATION = ("calibration_first", "calibration_last")  # the workload itself, as benchmarks (not compared)
CALIBRATION_KEY = "calibration:"  # medians[CALIBRATION_KEY + name]: the calibration timed before `name`
MIN_THRESHOLD = 1.25
BASELINE_VERSION = 1

Log = Callable[[str], None]


def machine() -> str:
    """What the timings were taken on: the CPU model, the core count and the architecture."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, {platform.machine()}"


def _source() -> tuple[str | None, bool | None]:
    """The commit (and dirty flag) of the wsolbench code being timed."""
    from wsolbench.runfolder import source_version

    version = source_version() or {}
    return version.get("commit"), version.get("dirty")


def _name(benchmark: dict[str, Any]) -> str:
    return benchmark["name"].removeprefix("test_")


def run_suite(benchmarks_dir: Path, log: Log) -> dict[str, float]:
    """Run the suite once in a fresh process; the median seconds of each benchmark, by name."""
    suite = benchmarks_dir / SUITE
    if not suite.is_file():
        raise WsolbenchError(f"{suite}: no benchmark suite there (run from a wsolbench checkout, or pass "
                             f"--benchmarks DIR)")
    with tempfile.TemporaryDirectory(prefix="wsolbench-bench-") as tmp:
        out = Path(tmp) / "benchmarks.json"
        argv = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider", "--benchmark-enable",
                f"--benchmark-json={out}", "-o", "addopts=", "--rootdir", str(benchmarks_dir)]
        process = subprocess.run(argv, capture_output=True, text=True)
        if process.returncode != 0 or not out.is_file():
            tail = (process.stdout + process.stderr).strip().splitlines()[-15:]
            raise WsolbenchError(f"{suite}: the benchmark suite failed (exit {process.returncode}):\n"
                                 + "\n".join(tail))
        data = json.loads(out.read_text())
    medians = {_name(b): float(b["stats"]["median"]) for b in data["benchmarks"]}
    for b in data["benchmarks"]:
        if "calibration_s" not in b.get("extra_info", {}):
            raise WsolbenchError(f"{suite}: benchmark {b['name']} has no calibration_s in its extra_info (the "
                                 f"suite's local_calibration fixture times it)")
        medians[CALIBRATION_KEY + _name(b)] = float(b["extra_info"]["calibration_s"])
    log(f"ran {len(data['benchmarks'])} benchmarks")
    return medians


def ratios_of(medians: dict[str, float]) -> dict[str, float]:
    """Every benchmark's median over the calibration workload timed right before it (the
    `calibration:<name>` entries of `medians`)."""
    return {name: value / medians[CALIBRATION_KEY + name] for name, value in sorted(medians.items())
            if not name.startswith(CALIBRATION_KEY) and name not in CALIBRATION}


def read_baselines(path: Path) -> dict[str, Any]:
    """The baseline file: {"version": 1, "machines": {machine: entry}}; empty when absent."""
    if not path.is_file():
        return {"version": BASELINE_VERSION, "machines": {}}
    try:
        baseline = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise InputError(path, f"not valid JSON ({error})") from None
    if not isinstance(baseline, dict) or not isinstance(baseline.get("machines"), dict):
        raise InputError(path, "not a wsolbench benchmark baseline (no 'machines' object)")
    if baseline.get("version", 0) > BASELINE_VERSION:
        raise InputError(path, f"baseline version {baseline.get('version')} is newer than this wsolbench reads "
                               f"({BASELINE_VERSION})")
    for name, entry in baseline["machines"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("ratios"), dict):
            raise InputError(path, f"machine {name!r}: no 'ratios' object")
    return baseline


def threshold_of(spread: float) -> float:
    return max(MIN_THRESHOLD, spread ** 2)


def write_baseline(benchmarks_dir: Path, runs: int = 3, log: Log = print,
                   baseline_path: Path | None = None, pool: bool = False) -> dict[str, Any]:
    """Run the suite `runs` times and write this machine's entry of benchmarks/baseline.json: per
    benchmark the median ratio, the spread (max / min of the runs' ratios) and the threshold that
    spread gives. Returns the entry.

    With `pool`, the new runs join the entry's earlier ones instead of replacing them, and the
    figures are taken over all of them: for another host with the same machine key (CPU model,
    cores, architecture) whose ratios differ from the first host's for reasons the key does not
    see. Two 2-vCPU "AMD EPYC" VMs ran the same commit with `evaluate_start` 1.36x apart (a
    process start: disk and page cache, not the CPU), so one host's spread failed the other."""
    path = baseline_path or benchmarks_dir / BASELINE_FILE
    baselines = read_baselines(path)  # read first: a malformed file is named before minutes of runs
    if runs < 2:
        raise WsolbenchError("--runs must be >= 2: the thresholds come from the run-to-run spread")
    measured = []
    for k in range(runs):
        log(f"baseline run {k + 1}/{runs}")
        measured.append(ratios_of(run_suite(benchmarks_dir, log)))
    hosts = 1
    earlier = baselines["machines"].get(machine()) if pool else None
    if earlier is not None:
        measured = [*earlier.get("runs_ratios", []), *measured]
        hosts = earlier.get("hosts", 1) + 1
    names = sorted(set.intersection(*(set(m) for m in measured)))
    commit, dirty = _source()
    baseline = {
        "machine": machine(), "commit": commit, "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "wsolbench": __version__, "runs": len(measured), "hosts": hosts, "min_threshold": MIN_THRESHOLD,
        "ratios": {name: statistics.median(m[name] for m in measured) for name in names},
        "spread": {name: max(m[name] for m in measured) / min(m[name] for m in measured) for name in names},
        "runs_ratios": [{name: m[name] for name in names} for m in measured]}
    # One host: its run-to-run spread squared (quiet on the noise measured). Pooled hosts: the spread
    # over all their runs, unsquared: it already holds each host's offset from the median and that
    # host's noise, and squaring the offset between hosts would hide a 2x slowdown on either.
    baseline["threshold"] = {name: threshold_of(baseline["spread"][name]) if hosts == 1
                             else max(MIN_THRESHOLD, baseline["spread"][name]) for name in names}
    baselines["machines"][baseline["machine"]] = baseline
    baselines["version"] = BASELINE_VERSION
    atomic.write_json(path, baselines)
    return baseline


@dataclass
class GateLine:
    name: str
    ratio: float
    baseline: float | None
    threshold: float | None

    @property
    def factor(self) -> float | None:
        return None if self.baseline is None else self.ratio / self.baseline

    @property
    def regressed(self) -> bool:
        return self.factor is not None and self.factor > self.threshold


@dataclass
class GateReport:
    baseline_path: Path
    baseline: dict[str, Any] | None
    lines: list[GateLine] = field(default_factory=list)
    medians: dict[str, float] = field(default_factory=dict)
    gone: list[str] = field(default_factory=list)
    confirmed: bool = False  # the regressions were checked against a second run

    @property
    def regressions(self) -> list[GateLine]:
        return [line for line in self.lines if line.regressed]

    @property
    def failed(self) -> bool:
        return bool(self.regressions)

    def text(self) -> str:
        out = []
        if self.baseline is None:
            out.append(f"no baseline for this machine ({machine()}) in {self.baseline_path}: nothing to compare, "
                       f"the gate passes (`wsolbench bench --update-baseline` writes one)")
        else:
            out.append(f"baseline {self.baseline_path} for {self.baseline.get('machine')}: commit "
                       f"{(self.baseline.get('commit') or '?')[:12]}, {self.baseline.get('date')}, "
                       f"{self.baseline.get('runs')} runs")
        width = max([len(line.name) for line in self.lines] + [9])
        out.append(f"{'benchmark':<{width}}  {'median':>10}  {'ratio':>8}  {'baseline':>8}  {'now/base':>8}  "
                   f"{'threshold':>9}")
        for line in self.lines:
            median = self.medians.get(line.name, float("nan"))
            if line.baseline is None:
                tail = f"{'-':>8}  {'new':>8}  {'-':>9}"
            else:
                tail = (f"{line.baseline:8.3f}  {line.factor:7.2f}x  {line.threshold:8.2f}x"
                        + ("  REGRESSED" if line.regressed else ""))
            out.append(f"{line.name:<{width}}  {median * 1000:8.2f}ms  {line.ratio:8.3f}  {tail}")
        for name in self.gone:
            out.append(f"{name}: in the baseline, not in this run (removed?)")
        if self.baseline is not None:
            thresholds = [line.threshold for line in self.lines if line.threshold is not None]
            if thresholds:
                out.append(f"smallest slowdown this baseline can see: {min(thresholds):.2f}x (median threshold "
                           f"{statistics.median(thresholds):.2f}x, largest {max(thresholds):.2f}x)")
        for line in self.regressions:
            out.append(f"REGRESSED {line.name}: {line.factor:.2f}x its baseline ratio (threshold "
                       f"{line.threshold:.2f}x{', in two runs' if self.confirmed else ''})")
        if self.baseline is not None and not self.regressions:
            out.append("no benchmark regressed")
        return "\n".join(out)


def run_gate(benchmarks_dir: Path, baseline_path: Path | None = None, log: Log = print,
             confirm: bool = True) -> GateReport:
    baseline_path = baseline_path or benchmarks_dir / BASELINE_FILE
    baseline = read_baselines(baseline_path)["machines"].get(machine())
    medians = run_suite(benchmarks_dir, log)
    ratios = ratios_of(medians)
    report = GateReport(baseline_path, baseline, medians=medians)
    known = baseline["ratios"] if baseline else {}
    thresholds = baseline.get("threshold", {}) if baseline else {}
    for name, ratio in ratios.items():
        base = known.get(name)
        report.lines.append(GateLine(name, ratio, base, None if base is None else
                                     float(thresholds.get(name, MIN_THRESHOLD))))
    report.gone = sorted(set(known) - set(ratios))
    if confirm and report.regressions:
        # A slowdown in the code persists; a burst of load on a shared machine rarely repeats. A
        # regression counts only if the benchmark's ratio is over its threshold in a second run too
        # (its smaller ratio of the two is kept).
        log(f"{len(report.regressions)} over their threshold: running the suite again to confirm")
        again = ratios_of(run_suite(benchmarks_dir, log))
        for line in report.lines:
            if line.regressed and line.name in again:
                line.ratio = min(line.ratio, again[line.name])
        report.confirmed = True
    return report


def result_rows(report: GateReport, benchmarks_dir: Path) -> list[dict[str, Any]]:
    """This run as benchmark_results rows of the store (one per benchmark, calibration included)."""
    commit, dirty = _source()
    run_at = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None, microsecond=0)
    ratios = {line.name: line for line in report.lines}
    return [{"commit": commit or "unknown", "dirty": dirty, "machine": machine(), "run_at": run_at,
             "benchmark": name, "median_s": median,
             "ratio": ratios[name].ratio if name in ratios else None,
             "baseline_ratio": ratios[name].baseline if name in ratios else None,
             "wsolbench_version": __version__} for name, median in sorted(report.medians.items())
            if not name.startswith(CALIBRATION_KEY)]
