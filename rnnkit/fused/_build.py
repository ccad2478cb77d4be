"""Building and loading the C++ extension (``csrc/fused.cpp``).

The extension is compiled on first use with :func:`torch.utils.cpp_extension.load`
(ninja, one translation unit) into torch's extension cache, so later imports only
load the shared library. ``python -m rnnkit.fused build`` does the same ahead of
time. ``RNNKIT_DISABLE_FUSED=1`` turns the backend off without trying to build.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("csrc") / "fused.cpp"
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


def extension_name() -> str:
    """Named after the source, flags and torch version, so a change rebuilds."""
    h = hashlib.sha1()
    h.update(SOURCE.read_bytes())
    h.update(" ".join(compile_flags()).encode())
    h.update(torch.__version__.encode())
    return "rnnkit_fused_" + h.hexdigest()[:10]


def _first_error_line(text: str) -> str:
    """The compiler's first ``error:`` line (else the first line naming an error)."""
    for marker in (" error:", "error:", "rror"):
        for line in text.splitlines():
            if marker in line and not line.startswith("Error building extension"):
                return line.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def disabled() -> Optional[str]:
    value = os.environ.get(DISABLE_ENV, "")
    if value not in ("", "0"):
        return f"disabled by the environment variable {DISABLE_ENV}={value}"
    return None


def load(verbose: bool = False) -> Optional[str]:
    """Build (if needed) and load the extension. Returns None when the ops are
    registered under ``torch.ops.rnnkit_fused``, else the reason why not."""
    if _state["loaded"] and not os.environ.get(DISABLE_ENV):
        return None  # the fast path: every cell step asks
    reason = disabled()
    if reason:
        return reason
    with _lock:
        if _state["loaded"]:
            return None
        if _state["reason"] is not None:
            return _state["reason"]
        if torch._C._dispatch_has_kernel_for_dispatch_key("rnnkit_fused::lstm_fwd", "CPU"):
            _state["loaded"] = True  # the kernels are already loaded in this process (e.g. by another copy)
            return None
        try:
            from torch.utils import cpp_extension
        except Exception as e:  # pragma: no cover - torch always ships it
            _state["reason"] = f"torch.utils.cpp_extension cannot be imported: {e}"
            return _state["reason"]
        if not SOURCE.exists():
            _state["reason"] = f"the C++ source {SOURCE} is missing from this installation"
            return _state["reason"]
        name = extension_name()
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        cached = any(build_dir.glob(f"{name}*.so")) if build_dir.exists() else False
        if not cached:
            print(f"rnnkit: compiling the fused CPU kernels (once; 20-60 s; cached in {build_dir})...",
                  file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            # a Python module: loading it registers the torch.ops ops (TORCH_LIBRARY) and gives the
            # direct single-step entry (module.cell_step, see rnnkit/fused/cells.py)
            module = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=compile_flags(),
                                        is_python_module=True, verbose=verbose)
        except Exception as e:
            text = str(e)
            out = getattr(e, "output", None)
            if isinstance(out, bytes):
                text = out.decode(errors="replace") + "\n" + text
            elif isinstance(out, str):
                text = out + "\n" + text
            _state["reason"] = f"building the C++ extension failed: {_first_error_line(text)}"
            return _state["reason"]
        _state["seconds"] = time.perf_counter() - start
        _state["path"] = getattr(module, "__file__", None)
        _state["module"] = module
        if not cached:
            print(f"rnnkit: fused CPU kernels ready ({_state['seconds']:.0f} s)", file=sys.stderr, flush=True)
        _state["loaded"] = True
        return None


def module():
    """The loaded extension as a Python module (its ``cell_step`` entry), or None when it is
    not loaded or was registered by another copy of rnnkit in this process."""
    return _state["module"] if load() is None else None


def info() -> dict:
    """What is known about the extension in this process."""
    reason = load()
    out = {"ready": reason is None, "reason": reason, "source": str(SOURCE), "flags": compile_flags()}
    if reason is None:
        out["capability"] = torch.ops.rnnkit_fused.capability()
        out["blas"] = bool(torch.ops.rnnkit_fused.uses_blas())
        out["library"] = _state["path"]
    return out
