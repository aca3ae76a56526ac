"""The evaluator's compiled loops: written once as numba code, loaded without numba where it can be.

The contour sweep and the mask histograms (wsolbench.contour_sweep, wsolbench.evaluator) are
loops over pixels that only a compiler makes fast. They are written in numba's Python subset and
marked `@kernel`. Before, they were numba JIT functions; a `wsolbench evaluate` process then spent
about 0.5 s of its start in numba whatever the job (importing it 0.2-0.3 s, loading the cached
machine code 0.25 s: numba sets up its typing and target contexts on the first dispatch), most of a
small job (issue 11). Now `compiled()` hands them out compiled one of two ways, from the same
source:

* ahead of time (the default): numba's AOT compiler (numba.pycc) builds the marked functions into
  one extension module, once, into the kernel cache (below), for this CPU; every later process
  imports that module in milliseconds and imports neither numba nor llvmlite. The module is built
  the first time a process needs the kernels and finds none for its key (about 10-20 s, said on
  stderr), and written atomically, so concurrent first runs at worst build it twice.
* numba's JIT (`njit(cache=True, nogil=True)`, as before): where the AOT module cannot be built
  (no C compiler, a numba without pycc; the reason is printed once and remembered in the cache),
  or when WSOLBENCH_KERNELS=jit asks for it. Both give the same numbers (tests compare them).

Both release the GIL while a kernel runs, so the evaluator's threads scale: numba's AOT compiler
has no `nogil` option, so the build sets the compile flag behind `njit(nogil=True)` for its
exports (`_build`); a test checks that another thread runs during an AOT kernel call.

The cache key covers the kernel sources (the files that define kernels, and this file), numba's,
llvmlite's and Python's versions, and the CPU (architecture and feature flags: the code is
compiled for the host CPU, as the JIT does). The cache is $WSOLBENCH_KERNEL_CACHE if set, else
`__pycache__` beside this file when it is writable (as numba's and CPython's caches), else
$XDG_CACHE_HOME/wsolbench/kernels (~/.cache/wsolbench/kernels).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import platform
import sys
import tempfile
import threading
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from wsolbench.errors import WsolbenchError

MODES = ("aot", "jit")
# The modules that define kernels: all are imported before anything is compiled, so that one
# module (one cache key) always holds every kernel, whichever of them a process asked for first.
KERNEL_MODULES = ("wsolbench.contour_sweep", "wsolbench.evaluator")
_MODULE_PREFIX = "wsolbench_kernels_"

_registry: dict[str, "Kernel"] = {}  # qualified name -> kernel, in definition order
_compiled: dict[str, SimpleNamespace] = {}  # mode -> the compiled entry points
_lock = threading.RLock()


class Kernel:
    """A numba-source function; calling it calls its compiled version (`compiled()`).

    signature: the numba signature of an entry point (a kernel called from Python), which the AOT
    module exports with exactly these types and layouts; None for a helper called only by other
    kernels (compiled into its callers).
    """

    def __init__(self, function: Callable, signature: str | None):
        self.py_func = function
        self.signature = signature
        self.name = function.__name__
        self.module = function.__module__
        functools.update_wrapper(self, function)

    def __call__(self, *args):
        return getattr(compiled(), self.name)(*args)


def kernel(signature: str | None = None) -> Callable[[Callable], Kernel]:
    """Marks numba source: `@kernel("void(f8[:, ::1], ...)")` for an entry point, `@kernel()` for a helper."""
    def mark(function: Callable) -> Kernel:
        marked = Kernel(function, signature)
        _registry[f"{marked.module}.{marked.name}"] = marked
        return marked
    return mark


def compiled(mode: str | None = None) -> SimpleNamespace:
    """The entry-point kernels, compiled (AOT module, or numba JIT dispatchers), by name."""
    mode = mode or os.environ.get("WSOLBENCH_KERNELS", "aot")
    if mode not in MODES:
        raise WsolbenchError(f"WSOLBENCH_KERNELS must be one of {', '.join(MODES)}, got {mode!r}")
    kernels = _compiled.get(mode)
    if kernels is not None:
        return kernels
    with _lock:
        if mode not in _compiled:
            for module in KERNEL_MODULES:
                importlib.import_module(module)
            _compiled[mode] = _load_ahead_of_time() if mode == "aot" else _jit()
        return _compiled[mode]


def cache_dir() -> Path:
    if os.environ.get("WSOLBENCH_KERNEL_CACHE"):
        return Path(os.environ["WSOLBENCH_KERNEL_CACHE"])
    beside = Path(__file__).resolve().parent / "__pycache__"
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "wsolbench" / "kernels"


def cache_key() -> str:
    """What the compiled module depends on; see the module docstring."""
    digest = hashlib.sha256()
    for source in sorted({importlib.import_module(module).__file__ for module in KERNEL_MODULES} | {__file__}):
        digest.update(Path(source).read_bytes())
    for package in ("numba", "llvmlite"):
        digest.update(f"{package}={_version(package)}".encode())
    digest.update(f"{sys.implementation.cache_tag} {sys.version} {platform.machine()} {_cpu_features()}".encode())
    return digest.hexdigest()[:16]


def _version(package: str) -> str:
    """The installed package's version file, read without importing the package.

    (importlib.metadata would cost 0.02 s of the start this module exists to keep short.)
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return "absent"
    version_file = Path(spec.origin).parent / "_version.py"
    try:
        return f"{spec.origin} {hashlib.sha256(version_file.read_bytes()).hexdigest()}"
    except OSError:
        return f"{spec.origin} {os.stat(spec.origin).st_mtime_ns}"


def _cpu_features() -> str:
    """The host CPU's feature flags (Linux), else what platform says of the processor."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _load_ahead_of_time() -> SimpleNamespace:
    key = cache_key()
    directory = cache_dir()
    name = _MODULE_PREFIX + key
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    path = directory / (name + suffix)
    failed = directory / (name + ".failed")
    if failed.exists():  # a build for this key failed before: its reason was printed then
        return _jit()
    if path.exists():
        try:
            return _import_module(name, path)
        except Exception as error:  # noqa: BLE001 - a damaged file in the cache: build it again
            print(f"wsolbench: the cached kernels {path} do not load ({type(error).__name__}); building them again",
                  file=sys.stderr, flush=True)
    print(f"wsolbench: compiling the evaluator's kernels ahead of time into {directory} "
          f"(once for this source, numba and CPU; about 10-20 s)", file=sys.stderr, flush=True)
    try:
        _build(name, directory, suffix)
        return _import_module(name, path)
    except Exception as error:  # noqa: BLE001 - any failure leaves the JIT, which always works
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        print(f"wsolbench: could not build the kernels ahead of time ({reason}); using numba's JIT",
              file=sys.stderr, flush=True)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            failed.write_text(reason + "\n", encoding="utf-8")
        except OSError:
            pass
        return _jit()


def _import_module(name: str, path: Path) -> SimpleNamespace:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return SimpleNamespace(**{k.name: getattr(module, k.name) for k in _entry_points()}, mode="aot", path=path)


def _entry_points() -> list[Kernel]:
    return [k for k in _registry.values() if k.signature is not None]


def _jit_all() -> dict[str, object]:
    """numba JIT dispatchers of every marked function, by qualified name.

    Kernels call one another by global name, and numba resolves those names when it compiles a
    caller, so there they must name dispatchers, not the `Kernel` objects Python callers see. Each
    kernel is compiled from a copy of its function whose globals are a copy of its module's, with
    the kernels' names bound to their dispatchers; the modules themselves are left as they are
    (so a process that has used the JIT still calls through `compiled()`).
    """
    from numba import njit

    namespaces: dict[str, dict] = {}
    dispatchers = {}
    for qualified, marked in _registry.items():
        namespace = namespaces.setdefault(marked.module, dict(vars(sys.modules[marked.module])))
        function = marked.py_func
        copy = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__,
                                  function.__closure__)
        copy.__qualname__, copy.__module__, copy.__doc__ = function.__qualname__, function.__module__, function.__doc__
        dispatchers[qualified] = namespace[marked.name] = njit(cache=True, nogil=True)(copy)
    return dispatchers


def _jit() -> SimpleNamespace:
    shield = _HideScipy() if "scipy.linalg" not in sys.modules else None
    if shield is not None:
        sys.meta_path.insert(0, shield)
    try:
        dispatchers = _jit_all()
        entry = {k.name: dispatchers[f"{k.module}.{k.name}"] for k in _entry_points()}
        # Load (or compile) every entry point now, once, rather than in the first threads that
        # call them, while scipy.linalg is hidden (see _HideScipy).
        for marked in _entry_points():
            entry[marked.name].compile(marked.signature)
    finally:
        if shield is not None:
            sys.meta_path.remove(shield)
    return SimpleNamespace(**entry, mode="jit", path=None)


def _build(name: str, directory: Path, suffix: str) -> None:
    """Compile the entry points with numba.pycc into `directory/name+suffix`, atomically."""
    import warnings

    import llvmlite.binding as llvm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba.pycc announces its pending deprecation
        import numba.pycc.compiler as pycc_compiler
        from numba.pycc import CC

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as scratch:
        module = CC(name)
        module.output_dir = scratch
        module.target_cpu = llvm.get_host_cpu_name()  # as the JIT compiles: for this CPU
        dispatchers = _jit_all()
        for marked in _entry_points():
            module.export(marked.name, marked.signature)(dispatchers[f"{marked.module}.{marked.name}"].py_func)
        plain_flags = pycc_compiler.Flags

        class ReleaseGilFlags(plain_flags):
            """pycc's compile flags with njit(nogil=True)'s release_gil: the wrappers drop the GIL."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.release_gil = True

        pycc_compiler.Flags = ReleaseGilFlags
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module.compile()
        finally:
            pycc_compiler.Flags = plain_flags
        built = Path(scratch) / (name + suffix)
        if not built.exists():
            raise RuntimeError(f"numba.pycc wrote no {built.name}")
        os.replace(built, directory / (name + suffix))


class _HideScipy(importlib.abc.MetaPathFinder):
    """Makes scipy.linalg unimportable, for the thread that installed it only.

    numba's first kernel load in a process sets up its typing and target contexts, and on the way
    imports scipy.linalg (0.1-0.2 s on the dev VM) only to learn whether its np.correlate and
    np.convolve may call BLAS; no kernel here uses them. So while the JIT loads the kernels,
    scipy.linalg is hidden from this thread: numba then uses its own loop for those two functions
    in this process, and scipy.linalg imports as usual for anything that needs it.
    """

    def __init__(self) -> None:
        self.thread = threading.get_ident()

    def find_spec(self, name, path=None, target=None):
        if threading.get_ident() == self.thread and (name == "scipy.linalg" or name.startswith("scipy.linalg.")):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden while numba starts)", name=name)
        return None
