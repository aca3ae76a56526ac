"""The evaluator's kernels compiled ahead of time and by numba's JIT: same numbers, GIL released,
no numba in an evaluate process, a clear fallback when the AOT build fails (wsolbench.kernels)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from wsolbench import kernels

# Box metrics (all contours and the largest contour, through the fast engine) and mask
# histograms of random maps, printed as one JSON line with the kernels' mode and what was imported.
SCRIPT = """
import json, sys
import numpy as np
from wsolbench import kernels
from wsolbench.evaluator import accumulate_mask_histograms, best_ious_fast, histogram_edges, score_thresholds
rng = np.random.default_rng(7)
thresholds = score_thresholds(0.001)
edges = histogram_edges(thresholds)
out = {"boxes": [], "positive": None}
positive = np.zeros(len(edges) - 1, dtype=np.int64)
negative = np.zeros(len(edges) - 1, dtype=np.int64)
for i in range(12):
    size = int(rng.integers(20, 90))
    blobs = rng.random((size, size)) ** (1 + i % 4)
    blobs[rng.random((size, size)) < 0.3] = 0
    gt = np.array([[2, 3, size // 2, size - 4], [size // 3, 1, size - 2, size // 2]])
    best_all, best_largest = best_ious_fast(blobs, gt, thresholds)
    out["boxes"].append([best_all.tolist(), best_largest.tolist()])
    accumulate_mask_histograms(blobs, (rng.random((size, size)) < 0.5).astype(np.uint8), edges, 0.001,
                               positive, negative)
out["positive"], out["negative"] = positive.tolist(), negative.tolist()
out["mode"] = kernels.compiled().mode
out["numba_imported"] = "numba" in sys.modules or "llvmlite" in sys.modules
print(json.dumps(out))
"""


def _run(mode: str, cache: str | None = None) -> tuple[dict, str]:
    env = dict(os.environ, WSOLBENCH_KERNELS=mode)
    if cache is not None:
        env["WSOLBENCH_KERNEL_CACHE"] = cache
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_ahead_of_time_and_jit_kernels_give_the_same_numbers_and_aot_needs_no_numba(tmp_path):
    cache = str(tmp_path / "kernels")
    built, built_stderr = _run("aot", cache)  # a cold cache: this process builds the module
    loaded, loaded_stderr = _run("aot", cache)  # a warm one: it only imports it
    jit, _ = _run("jit")
    assert built["mode"] == loaded["mode"] == "aot" and jit["mode"] == "jit"
    assert "compiling the evaluator's kernels ahead of time" in built_stderr
    assert "compiling" not in loaded_stderr, loaded_stderr
    assert not loaded["numba_imported"], "a process with the AOT module imported numba or llvmlite"
    assert jit["numba_imported"]
    for name in ("boxes", "positive", "negative"):
        assert built[name] == loaded[name] == jit[name], name
    assert sum(jit["positive"]) + sum(jit["negative"]) > 0 and any(max(b[0]) > 0.3 for b in jit["boxes"])
    assert [p.name for p in (tmp_path / "kernels").iterdir() if not p.name.startswith(".")] == [
        f"wsolbench_kernels_{kernels.cache_key()}{kernels.importlib.machinery.EXTENSION_SUFFIXES[0]}"]


@pytest.mark.parametrize("mode", ["aot", "jit"])
def test_kernels_release_the_gil(mode):
    """Another Python thread keeps running while a kernel works (the evaluator's threads scale)."""
    compiled = kernels.compiled(mode)
    assert compiled.mode == mode
    scoremap = np.random.default_rng(0).random((3000, 3000))
    out = np.zeros(scoremap.shape, dtype=np.uint8)
    compiled.quantize_into(scoremap[:2, :2].copy(), out[:2, :2].copy())  # loaded before the measurement
    ticks, stop = [0], threading.Event()

    def count():
        while not stop.is_set():
            ticks[0] += 1

    counter = threading.Thread(target=count)
    counter.start()
    try:
        during = []
        for _ in range(5):
            before = ticks[0]
            compiled.quantize_into(scoremap, out)
            during.append(ticks[0] - before)
    finally:
        stop.set()
        counter.join()
    assert out.max() == 254
    # Holding the GIL, the counter would get at most a switch interval's worth (5 ms) per call.
    assert max(during) > 10_000, during


def test_a_failed_ahead_of_time_build_falls_back_to_the_jit_once_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WSOLBENCH_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_compiled", {})
    calls = []

    def broken_build(*args):
        calls.append(args)
        raise OSError("no C compiler: gcc not found")

    monkeypatch.setattr(kernels, "_build", broken_build)
    assert kernels.compiled("aot").mode == "jit"
    assert "could not build the kernels ahead of time (OSError: no C compiler: gcc not found); using numba's JIT" \
        in capsys.readouterr().err
    monkeypatch.setattr(kernels, "_compiled", {})  # a later process: remembers the failure, tries no build
    assert kernels.compiled("aot").mode == "jit"
    assert len(calls) == 1 and capsys.readouterr().err == ""
    assert (tmp_path / f"wsolbench_kernels_{kernels.cache_key()}.failed").read_text().startswith("OSError")


def test_a_damaged_cached_module_is_built_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WSOLBENCH_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_compiled", {})
    damaged = tmp_path / f"wsolbench_kernels_{kernels.cache_key()}{kernels.importlib.machinery.EXTENSION_SUFFIXES[0]}"
    damaged.write_bytes(b"not a shared object")
    rebuilt = []

    def build(name, directory, suffix):
        rebuilt.append(name)
        raise OSError("stop here")  # the rebuild itself is the first test's business

    monkeypatch.setattr(kernels, "_build", build)
    assert kernels.compiled("aot").mode == "jit"
    err = capsys.readouterr().err
    assert f"the cached kernels {damaged} do not load (ImportError); building them again" in err
    assert rebuilt and "could not build the kernels ahead of time (OSError: stop here)" in err


def test_an_unknown_kernel_mode_is_one_line_error_of_the_command(tmp_path):
    split = tmp_path / "metadata" / "x" / "test"
    split.mkdir(parents=True)
    for name, text in {"image_ids.txt": "a.jpg\n", "class_labels.txt": "a.jpg,0\n", "image_sizes.txt": "a.jpg,8,8\n",
                       "localization.txt": "a.jpg,1,1,4,4\n"}.items():
        (split / name).write_text(text)
    (tmp_path / "maps").mkdir()
    np.save(tmp_path / "maps" / "a.jpg.npy", np.random.default_rng(0).random((8, 8)))
    env = dict(os.environ, WSOLBENCH_KERNELS="gpu")
    done = subprocess.run([sys.executable, "-m", "wsolbench", "evaluate", "--metadata-root", str(tmp_path / "metadata"),
                           "--dataset", "x", "--split", "test", "--scoremap-root", str(tmp_path / "maps"),
                           "--image-size", "8"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        "wsolbench: error: WSOLBENCH_KERNELS must be one of aot, jit, got 'gpu'", done.stderr
