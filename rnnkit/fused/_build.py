"""Building and loading the C++ extension (``csrc/``: one ``.cpp`` per cell family, shared headers).

The extension is compiled on first use with :func:`torch.utils.cpp_extension.load`
(ninja: one object per source file, compiled in parallel) into torch's extension
cache, so later imports only load the shared library. ``python -m rnnkit.fused
build`` does the same ahead of time. ``RNNKIT_DISABLE_FUSED=1`` turns the backend
off without trying to build.

The extension's name (and so its folder in the cache) hashes the compiler flags,
the torch version, the Python environment (``sys.prefix``, the interpreter) and
the path of the source folder, so two checkouts or environments never share (and
rebuild) one build. The sources' contents are not in the name: when a source or
header is newer than the cached library, ninja rebuilds in the same folder, and
recompiles only the objects whose inputs changed (its dependency files list every
header an object includes). :func:`load` never raises: any failure (an unusable
cache directory, no compiler, a failed build or load) becomes the reason it
returns, which ``auto`` warns with once and ``backend="fused"`` raises with.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils._python_dispatch import _disable_current_modes

CSRC = Path(__file__).with_name("csrc")
# One .cpp per cell family plus the op registration; the shared headers are common.h (BLAS, threading
# by work, GEMM helpers, SIMD activations, checks), gates.h (the gate math several families share) and
# ops.h (the ops register.cpp registers). The kernel files include only common.h's light ATen headers
# (aten.cpp wraps the few ATen functions they call); the "heavy" files include torch.library
# (register.cpp) or ATen's per-op headers (aten.cpp). cell_py.cpp, the CPython entry, includes Python.h
# (first in its unit, as Python asks) but none of torch's Python headers (it declares the four names it
# uses; see the file). See unity_groups.
KERNEL_FILES = ("cell.cpp", "lstm.cpp", "gru.cpp", "rnn.cpp", "conv.cpp", "peephole.cpp", "ln_gru.cpp", "ln_lstm.cpp",
                "indrnn.cpp", "project.cpp")
ANCHORS = (("cell_py.cpp",), ("register.cpp", "aten.cpp"))  # each starts a unit of its own
HEAVY_FILES = tuple(f for anchor in ANCHORS for f in anchor)
SOURCE_FILES = HEAVY_FILES + KERNEL_FILES
HEADER_FILES = ("common.h", "gates.h", "ops.h", "regularize.h")
# CPU seconds measured one compile at a time (2-core AMD EPYC, g++ -O3, load ~3; only the proportions
# matter): each anchor alone, a unit's header parsing without one, and each kernel file's own code.
# (All in one unit: 73 s; the whole kernel set in one unit: 25 s; cell_py.cpp alone: 7.8 s, 32 s with
# torch's Python headers. 2026-12-02, load ~4: units of (8, 20) 32.4 s and 30.7 s; see docs/fused.md.)
ANCHOR_SECONDS = (8.0, 20.0)
KERNEL_PARSE_SECONDS = 6.0
CODE_SECONDS = {"cell.cpp": 3.9, "lstm.cpp": 3.2, "gru.cpp": 2.7, "rnn.cpp": 2.5, "conv.cpp": 2.4,
                "peephole.cpp": 2.2, "ln_gru.cpp": 1.9, "ln_lstm.cpp": 1.4, "indrnn.cpp": 1.1, "project.cpp": 0.4}
MAX_UNITS = 8
DISABLE_ENV = "RNNKIT_DISABLE_FUSED"

_lock = threading.Lock()
_state: dict = {"loaded": False, "reason": None, "seconds": None, "path": None, "module": None}


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_flags() -> list:
    """``-O3``, plus AVX2/FMA code for the gate math (at::vec's AVX2 path, Sleef from
    libtorch) when this CPU has them; the generic at::vec path otherwise."""
    flags = ["-O3"]
    if sys.platform.startswith("linux") and {"avx2", "fma"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


COMPILE_TIME = "about 40 s on 2 cores"  # from an empty cache (docs/fused.md, "Building", "Measured")


def sources() -> list:
    """The C++ source files (each compiled in one of :func:`unity_groups`' units)."""
    return [CSRC / name for name in SOURCE_FILES]


def build_jobs() -> int:
    """How many compilers run at once: torch's ``MAX_JOBS`` if set, else the cores this process may use."""
    value = os.environ.get("MAX_JOBS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def unity_groups(jobs: int) -> list:
    """The sources grouped into at most ``jobs`` translation units ("unity" builds), compiled in
    parallel. Every unit parses the ATen headers once, most of a kernel file's compile time, so there
    is one unit per core, not one per file: each anchor (the heavy files) starts a unit, and the
    kernel files go, largest first, to the unit with the least estimated work (a unit without an
    anchor starts at the kernel headers' parsing). One core: one unit, as if one file. An edit
    recompiles only the unit that includes the edited file."""
    anchors = [[f for f in anchor if f in SOURCE_FILES] for anchor in ANCHORS]
    anchored = [(a, ANCHOR_SECONDS[i]) for i, a in enumerate(anchors) if a]
    light = sorted((f for f in SOURCE_FILES if f not in HEAVY_FILES), key=lambda f: -CODE_SECONDS.get(f, 1.0))
    if jobs <= 1 or len(anchored) > jobs:
        if jobs <= 1:
            return [list(SOURCE_FILES)]
        anchored = [([f for a, _ in anchored for f in a], sum(w for _, w in anchored))]  # more anchors than cores
    groups = [list(a) for a, _ in anchored]
    work = [w for _, w in anchored]
    while len(groups) < min(jobs, MAX_UNITS, len(anchored) + len(light)):
        groups.append([])
        work.append(KERNEL_PARSE_SECONDS)
    for f in light:
        i = min(range(len(groups)), key=lambda k: work[k])
        groups[i].append(f)
        work[i] += CODE_SECONDS.get(f, 1.0)
    return [g for g in groups if g]


def _write_if_changed(path: Path, text: str) -> None:
    """Rewrite only on a change: a new mtime would make ninja recompile the unit."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    path.write_text(text)


def units(build_dir: Path, jobs: Optional[int] = None) -> list:
    """The files ninja compiles: a group of one source compiles as itself; a larger group through a
    generated ``unity_<k>.cpp`` in ``build_dir`` that ``#include``s its sources (ninja's dependency
    files list them, so an edit to one rebuilds that unit only)."""
    out = []
    for k, group in enumerate(unity_groups(build_jobs() if jobs is None else jobs)):
        if len(group) == 1:
            out.append(CSRC / group[0])
            continue
        unit = Path(build_dir) / f"unity_{k}.cpp"
        lines = [f"// generated by rnnkit/fused/_build.py (unity_groups): one translation unit of {len(group)} sources"]
        lines += [f'#include "{(CSRC / name).resolve()}"' for name in group]
        _write_if_changed(unit, "\n".join(lines) + "\n")
        out.append(unit)
    return out


def inputs() -> list:
    """Every file the build reads from ``csrc/``: the sources and the headers."""
    return sources() + [CSRC / name for name in HEADER_FILES]


def extension_name() -> str:
    """Named after the flags, torch version, Python environment and the source folder's
    path: another checkout or environment (even with the same torch) gets a build of its
    own, and a torch upgrade or other flags a new one. Not after the sources' contents:
    an edit rebuilds in place, incrementally (see :func:`stale_inputs`)."""
    h = hashlib.sha1()
    for part in (" ".join(compile_flags()), torch.__version__, sys.prefix, os.path.realpath(sys.executable),
                 sys.version, os.path.realpath(CSRC)):
        h.update(b"\0" + part.encode(errors="replace"))
    return "rnnkit_fused_" + h.hexdigest()[:10]


def source_hash() -> str:
    """A hash of every source and header (names and contents): what the kernels are. The
    ``auto`` calibration cache keys on it, so a kernel change measures afresh."""
    h = hashlib.sha1()
    for path in inputs():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def stale_inputs(library: Path) -> list:
    """The sources and headers modified after ``library`` was built (their names): a
    rebuild is due. ninja then recompiles only the objects that depend on them."""
    built = library.stat().st_mtime
    return [path.name for path in inputs() if path.stat().st_mtime > built]


# the lines of a build log that name the real cause, best first; ninja's own summary
# ("ninja: build stopped: subcommand failed.") and torch's prefix are never the cause
_CAUSE_MARKERS = (" error:", "error:", "not found", "No such file", "cannot find", "Permission denied", "rror")
_NOT_A_CAUSE = ("Error building extension", "ninja: build stopped", "FAILED:")


def _first_error_line(text: str) -> str:
    """The build log's first line naming the real cause: the compiler's first ``error:``
    line, else a line such as ``/bin/sh: 1: c++: not found``; else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for marker in _CAUSE_MARKERS:
        for line in lines:
            if marker in line and not line.startswith(_NOT_A_CAUSE):
                return line
    causes = [line for line in lines if not line.startswith(_NOT_A_CAUSE)]
    return (causes or lines or ["unknown error"])[-1]


class _DropNoRuntimeWarnings(logging.Filter):
    """torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..."
    (and the ROCm twin) on CUDA builds of torch without a GPU; it says nothing about a
    CPU extension and would split a progress bar, so it is dropped around the build."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("No CUDA runtime is found", "No ROCm runtime is found"))


@contextlib.contextmanager
def _quiet_cpp_extension_logs():
    logger = logging.getLogger("torch.utils.cpp_extension")
    drop = _DropNoRuntimeWarnings()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _import_built(name: str, so: Path):
    """Import a built extension module from its shared library (what cpp_extension.load
    does after building), with no ninja run and no lock file in the cache."""
    spec = importlib.util.spec_from_file_location(name, str(so))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {so}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _failure_text(e: BaseException) -> str:
    text = str(e)
    out = getattr(e, "output", None)
    if isinstance(out, bytes):
        text = out.decode(errors="replace") + "\n" + text
    elif isinstance(out, str):
        text = out + "\n" + text
    return text


def disabled() -> Optional[str]:
    value = os.environ.get(DISABLE_ENV, "")
    if value not in ("", "0"):
        return f"disabled by the environment variable {DISABLE_ENV}={value}"
    return None


# bound at import: load() must work where this module's name ``torch`` is replaced (tests/test_fused_build.py)
_is_compiling = torch.compiler.is_dynamo_compiling  # dynamo tracing this frame (not non-strict export)
_DisableTorchFunction = torch._C.DisableTorchFunction
NOT_WHILE_COMPILING = ("not loaded yet: the fused kernels build and load on the first call outside torch.compile "
                       "(or python -m rnnkit.fused build)")


@contextlib.contextmanager
def _plain_tensors():
    """Loading runs the extension's own checks on real tensors: with every TorchDispatchMode (FakeTensorMode,
    which torch.export runs) and TorchFunctionMode set aside, a first load inside one no longer fails (and
    with it, the fused backend for the rest of the process)."""
    with _disable_current_modes(), _DisableTorchFunction():
        yield


def load(verbose: bool = False) -> Optional[str]:
    """Build (if needed) and load the extension. Returns None when the ops are
    registered under ``torch.ops.rnnkit_fused``, else the reason why not."""
    if _state["loaded"] and not os.environ.get(DISABLE_ENV):
        return None  # the fast path: every cell step asks
    reason = disabled()
    if reason:
        return reason
    if _is_compiling():  # dynamo cannot trace the lock or the build: not now, and not for good (torch.export, non-strict, runs
        # Python: it loads, with its fake modes set aside)
        return NOT_WHILE_COMPILING
    with _lock:
        if _state["loaded"]:
            return None
        if _state["reason"] is not None:
            return _state["reason"]
        if torch._C._dispatch_has_kernel_for_dispatch_key("rnnkit_fused::lstm_fwd", "CPU"):
            _state["loaded"] = True  # the kernels are already loaded in this process (e.g. by another copy)
            return None
        try:
            with _plain_tensors():
                _state["reason"] = _build_and_load(verbose)
        except Exception as e:  # never out of load(): every failure is the reason
            _state["reason"] = f"loading the C++ extension failed: {type(e).__name__}: {_first_line(str(e))}"
        if _state["reason"] is None:
            _state["loaded"] = True
        return _state["reason"]


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def _build_and_load(verbose: bool) -> Optional[str]:
    """Locate the cache, load the cached build or compile one; None when loaded, else the reason."""
    try:
        with _quiet_cpp_extension_logs():
            from torch.utils import cpp_extension
    except Exception as e:  # pragma: no cover - torch always ships it
        return f"torch.utils.cpp_extension cannot be imported: {e}"
    missing = [str(path) for path in inputs() if not path.is_file()]
    if missing:
        return f"the C++ source {missing[0]} is missing from this installation"
    name = extension_name()
    try:
        # creates <root>/<name> (mkdir -p): fails when the cache is read-only or a path in it is a file
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception as e:
        error = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        return f"the torch extension cache is not usable: {error} (point TORCH_EXTENSIONS_DIR to a writable directory)"
    so = build_dir / f"{name}{getattr(cpp_extension, 'LIB_EXT', '.so')}"
    module = None
    changed = stale_inputs(so) if so.is_file() else []
    if so.is_file() and not changed:  # a build of this name, newer than every source: load it as is
        try:
            module = _import_built(name, so)
        except Exception:
            module = None  # e.g. a half-written library: rebuild it below
    compiled = module is None
    start = time.perf_counter()
    began = time.time()
    if compiled:
        if changed:
            what = f"{', '.join(changed)} changed since the cached build; only what depends on it recompiles"
        else:
            what = f"once, {COMPILE_TIME}"
        print(f"rnnkit: compiling the fused CPU kernels ({what}; cached in {build_dir})...",
              file=sys.stderr, flush=True)
        try:
            # a Python module: loading it registers the torch.ops ops (TORCH_LIBRARY) and gives the
            # direct single-step entry (module.cell_step, see rnnkit/fused/cells.py)
            with _quiet_cpp_extension_logs():
                module = cpp_extension.load(name=name, sources=[str(path) for path in units(build_dir)],
                                            extra_cflags=compile_flags(), build_directory=str(build_dir),
                                            is_python_module=True, verbose=verbose)
        except Exception as e:
            reason = f"building the C++ extension failed: {_first_error_line(_failure_text(e))}"
            print(f"rnnkit: {reason}", file=sys.stderr, flush=True)
            return reason
        _date_before_edits_during_the_build(so, began)
    _state["seconds"] = time.perf_counter() - start
    _state["path"] = getattr(module, "__file__", None)
    _state["module"] = module
    if compiled:
        print(f"rnnkit: fused CPU kernels ready ({_state['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return None


def _date_before_edits_during_the_build(library: Path, began: float) -> None:
    """A source saved while the build ran may or may not be in the library, which is newer than
    it: the library is dated back to the build's start, so the next load sees that source as
    changed and rebuilds (ninja then recompiles the unit that includes it)."""
    try:
        if any(path.stat().st_mtime > began for path in inputs()) and library.stat().st_mtime > began:
            os.utime(library, (began, began))
    except OSError:
        pass


def module():
    """The loaded extension as a Python module (its ``cell_step`` entry), or None when it is
    not loaded or was registered by another copy of rnnkit in this process."""
    return _state["module"] if load() is None else None


def info() -> dict:
    """What is known about the extension in this process."""
    reason = load()
    out = {"ready": reason is None, "reason": reason, "source": str(CSRC), "flags": compile_flags()}
    if reason is None:
        out["capability"] = torch.ops.rnnkit_fused.capability()
        out["blas"] = bool(torch.ops.rnnkit_fused.uses_blas())
        out["library"] = _state["path"]
    return out
