"""``auto`` measures where it runs: fused vs torch, timed on this machine.

The first time ``backend="auto"`` meets a configuration class that both the
``fused`` and the ``torch`` backend can run, and that it has no measurement of
on this machine, it times the two side by side on a small synthetic problem of
that class and remembers the winner: in memory, and in a small JSON file per
machine (see :func:`cache_path`). The shipped ``auto_table.json`` (measured
once, on the machine rnnkit was developed on) is the prior: used where
measuring is off or not possible.

A *class* is: the kernel family (``rnn_tanh``, ``rnn_relu``, ``lstm``,
``lstm_proj``, ``gru``), the parameters' dtype, dense input or ``lengths``,
forward+backward (grad enabled; the input's gradient wanted too or not) or
forward only, and the size bucket of
``(batch, hidden_size)``: each rounded to the nearest power of two on a log
scale (:func:`size_bucket`; batch 1 to 512, hidden 8 to 4096), written
``N<batch>H<hidden>`` (``N8H512``). Its synthetic problem is one layer, one
direction, at the bucket's batch and hidden size (input size = hidden size) over a
short sequence (:func:`problem`: 16 to 64 steps, fewer steps for more work per
step): a warm-up call of each backend, then 3 to 7 interleaved repetitions
(``rnnkit.bench.time_row``), the median of each; the whole class within about
:data:`BUDGET_S` seconds on an idle machine at small sizes (a large bucket takes
a few of its own calls).

Why buckets this fine: which backend is faster turns on the batch and the hidden
size together (the recurrent product's shape, cache sizes, the BLAS's
small-matrix paths). On an AMD EPYC the fused LSTM beat torch at batch 16 /
hidden 128 and lost by 1.7-2x at batch 8 / hidden 512; the earlier three size
classes (S, M, L) put both in one class.

Measuring never changes results: it runs on its own modules and tensors, with
the global RNG state saved and restored (``torch.random.fork_rng``), autocast
off, grad on (forward+backward) or off (forward only) as the class says. It
does not run (the table is used) under ``torch.compile``/``torch.export``
tracing, ``torch.jit`` tracing, ``torch.func`` transforms, a
``TorchFunctionMode``/``TorchDispatchMode`` (``FlopCounterMode``, a ``torch.device``
context...), saved-tensor hooks, the autograd profiler, or on a tensor subclass.

Environment:

* ``RNNKIT_AUTO_MEASURE``: ``1`` (default) measure new classes; ``cached``: use
  the cache file but never measure (unknown classes: the table); ``0``: the
  shipped table only (no measuring, the cache is neither read nor written).
* ``RNNKIT_CACHE_DIR``: the cache folder (default ``$XDG_CACHE_HOME/rnnkit`` or
  ``~/.cache/rnnkit``). A folder that cannot be written only turns persistence
  off (measurements stay in memory); a corrupt file is ignored.

``rnnkit calibrate`` measures every class now and writes the cache.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import re
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import bench as _bench
from . import _build

MEASURE_ENV = "RNNKIT_AUTO_MEASURE"
CACHE_ENV = "RNNKIT_CACHE_DIR"

FAMILIES = ("rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru")
"""The kernel families torch's op also runs: the only ones where auto has a choice to measure."""
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
FORMAT = 2  # the cache file's layout; another number is ignored (1: the S/M/L size classes)
SIZES = _bench.SIZES  # the benchmark's sizes S, M, L -> (batch, input_size, hidden_size): the shipped table's
BATCH_RANGE, HIDDEN_RANGE = (1, 512), (8, 4096)
"""The size buckets' limits: a batch or hidden size outside them measures at the nearest limit."""
STEP_MACS = 1 << 25
"""Multiply-adds the synthetic problem aims at over its steps (projection and recurrent product):
the number of steps is this over one step's work, within MIN_STEPS..MAX_STEPS."""
MIN_STEPS, MAX_STEPS = 16, 64
"""Steps of a synthetic problem: at least 16, so a backend's per-call cost (torch's oneDNN op reorders
its weights on every call, the fused kernels lay theirs out) weighs about as much against the time loop
as in a sequence of tens of steps. Measured at 8 steps (2026-12-02, AMD EPYC, no_grad LSTM, batch 32,
hidden 256) the two tied (fused 4.19 ms, torch 4.10 ms), while at 500 steps torch's op was 1.32x faster
(0.41 against 0.54 ms a step behind a ~0.8 ms per-call cost): at 16 steps torch is ahead by ~15%."""
BUDGET_S = 0.08
"""Seconds one class may take (warm-up included) before the repetitions are cut to the minimum."""
WARMUP_RATE = 1e10
"""Multiply-adds per second under which a warm-up counts as slow (about a quarter of an idle 2-core
AVX2 machine's rate): a class may warm up for MAX_WARMUP_S or WARMUP_FACTOR times its work at this
rate, whichever is longer, before it is cut short."""
WARMUP_FACTOR = 4.0
MIN_REPEATS, MAX_REPEATS = 3, 7
WARM_SIZING_S = 0.5
"""Cold calls (both backends) under this many seconds are followed by one warm call of each, which sizes the
rounds: the first class a process measures carries the process's first-call costs in its cold calls."""
MAX_WARMUP_S = 0.5
"""On first use, a class whose warm-up calls alone take longer (a very busy or very slow machine) is
not measured: the prior decides for this process (nothing is written), so a forward never waits
seconds for a calibration. ``rnnkit calibrate`` has no such limit."""
TIE = 0.08
"""Within 8% the measurement cannot tell the two apart (a few calls on a shared machine scatter by
that much, and the synthetic problem's 16 steps weigh torch's per-call costs more than a longer
sequence does; benchmarks/auto_grid.py): torch, the op torch.nn itself runs, is chosen, so that a
class measured as a tie never runs slower than torch.nn by a misjudged margin. (Until 2026-12-02
3%, and the shipped table's choice, else fused, stayed: LSTM batch 32 / hidden 1024 measured fused
1.04x faster at 16 steps and then ran 1.07x slower than torch.nn in the grid. Then 5%: LSTM batch
128 / hidden 1024 without grad measured fused 1.054x faster at 16 steps, and ran 1.074x slower than
torch.nn at 50.)"""
STALL = 3.0
"""A verdict against the shipped table's choice by more than this factor is measured again, and each
backend keeps the faster of its two medians: a burst of load through a whole class's rounds (about
80 ms) once gave fused 131 ms where it takes 8 ms, and auto kept torch for that class (GRU, batch 1,
hidden 1024, no grad; benchmarks/auto_grid.py, 2026-12-02)."""
UNMEASURED = ("cut short", "failed")
"""Entries kept in memory only (the prior decided): never written to the cache file."""

_local = threading.local()


# ----------------------------------------------------------------------------- the class of a configuration


MODES = {(False, False): "fwd", (True, False): "fwd+bwd", (True, True): "fwd+bwd+dx"}
"""A class's mode by (grad, input_grad). The input's gradient is its own class: torch's op computes it
whether it is wanted or not, the fused backend skips the input projection's backward product without it,
so the two compare differently (LSTM batch 32 / hidden 1024, 16 steps: fused 1.25-1.47x faster without
the input's gradient, 0.95x with it)."""
MODE_KEYS = {mode: key for key, mode in MODES.items()}
"""(grad, input_grad) by a class's mode: :data:`MODES` read backwards."""


class ClassKey(NamedTuple):
    """One configuration class auto measures."""

    family: str  # rnn_tanh, rnn_relu, lstm, lstm_proj, gru
    dtype: str  # float32, float64, bfloat16
    lengths: bool  # variable lengths (torch then packs) or dense input
    grad: bool  # forward+backward (grad enabled) or forward only
    size: str  # the size bucket, N<batch>H<hidden> (size_bucket)
    input_grad: bool = False  # forward+backward: the input's gradient too (a second layer's, an embedding's)

    @property
    def mode(self) -> str:
        """``fwd``, ``fwd+bwd`` (the parameters' gradients) or ``fwd+bwd+dx`` (the input's too)."""
        return MODES[(self.grad, self.grad and self.input_grad)]

    def __str__(self) -> str:
        return "|".join((self.family, self.dtype, "lengths" if self.lengths else "dense", self.mode, self.size))

    @classmethod
    def parse(cls, text: str) -> Optional["ClassKey"]:
        parts = text.split("|")
        if len(parts) != 5 or parts[0] not in FAMILIES or parts[1] not in DTYPES or \
                parts[2] not in ("lengths", "dense") or parts[3] not in MODE_KEYS or parse_bucket(parts[4]) is None:
            return None
        grad, input_grad = MODE_KEYS[parts[3]]
        return cls(parts[0], parts[1], parts[2] == "lengths", grad, parts[4], input_grad)

    def table_prior(self, fastest: Dict[str, dict]) -> Optional[str]:
        """The shipped table's choice for this class (``fastest``: the table's ``"fastest"`` map), read as
        :meth:`rnnkit.fused.backend.FusedBackend.table_choice` reads it: float64 shares float32's row,
        ``lengths`` reads the ``_lengths`` row where there is one."""
        key = self.family + ("_bfloat16" if self.dtype == "bfloat16" else "")
        if self.lengths and f"{key}_lengths" in fastest:
            key = f"{key}_lengths"
        from .backend import size_class
        return fastest.get(key, {}).get(size_class(*parse_bucket(self.size)))


_DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}


def _pow2(value: int, lo: int, hi: int) -> int:
    value = min(max(int(value), lo), hi)
    return 1 << int(round(math.log2(value)))


@lru_cache(maxsize=1024)
def size_bucket(batch: int, hidden: int) -> str:
    """``N<batch>H<hidden>``: each rounded to the nearest power of two on a log scale (batch within
    BATCH_RANGE, hidden within HIDDEN_RANGE). ``size_bucket(48, 500) == "N64H512"``."""
    return f"N{_pow2(batch, *BATCH_RANGE)}H{_pow2(hidden, *HIDDEN_RANGE)}"


def parse_bucket(text: str) -> Optional[Tuple[int, int]]:
    """``(batch, hidden)`` of a bucket name (:func:`size_bucket`), also of the benchmark's S, M, L;
    None when ``text`` is neither."""
    if text in SIZES:
        return SIZES[text][0], SIZES[text][2]
    m = re.fullmatch(r"N(\d+)H(\d+)", text)
    if m is None:
        return None
    batch, hidden = int(m.group(1)), int(m.group(2))
    if size_bucket(batch, hidden) != text:  # not a power of two, or out of range
        return None
    return batch, hidden


def bucket_name(text: str) -> str:
    """The bucket of a size given as S/M/L or ``N<batch>H<hidden>`` (any batch and hidden: rounded)."""
    if text in SIZES:
        return size_bucket(SIZES[text][0], SIZES[text][2])
    m = re.fullmatch(r"N(\d+)H(\d+)", text)
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"a size is S, M, L or N<batch>H<hidden> (e.g. N8H512), got {text!r}")
    return size_bucket(int(m.group(1)), int(m.group(2)))


GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "lstm_proj": 4, "gru": 3}


def problem(klass: "ClassKey") -> Tuple[int, int, int, int]:
    """``(batch, input_size, hidden_size, steps)`` of the class's synthetic problem."""
    batch, hidden = parse_bucket(klass.size)
    step = 2 * batch * GATES[klass.family] * hidden * hidden  # the projection and the recurrent product
    steps = min(MAX_STEPS, max(MIN_STEPS, STEP_MACS // max(step, 1)))
    return batch, hidden, hidden, steps


def problem_macs(klass: "ClassKey") -> int:
    """Multiply-adds of one call of the synthetic problem (forward+backward: three times the forward)."""
    batch, h_in, hidden, steps = problem(klass)
    gates = GATES[klass.family] * hidden
    return steps * batch * gates * (h_in + hidden) * (3 if klass.grad else 1)


def module_class(module, x: Optional[Tensor], lengths: Optional[Tensor]) -> Optional[ClassKey]:
    """The class of ``module`` run on ``x`` (with ``lengths``), or None where torch's op has no such cell."""
    spec = module.cell_spec
    if spec.fusable is None or spec.extra.get("torch_mode") is None or not getattr(module, "_is_standard", False):
        return None
    family = spec.fusable + ("_proj" if getattr(module, "proj_size", 0) else "")
    if family not in FAMILIES:
        return None
    params = [p for p in module._parameters.values() if p is not None] or list(module.parameters())  # the fast way
    dtype = _DTYPE_NAMES.get(params[0].dtype) if params else "float32"
    if dtype is None or (params and params[0].device.type != "cpu"):  # the fused kernels run on the CPU
        return None
    batch = x.shape[1] if x is not None and x.dim() >= 2 else 1
    grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and (
        (x is not None and x.requires_grad) or any(p.requires_grad for p in params))
    input_grad = grad and x is not None and x.requires_grad
    return ClassKey(family, dtype, lengths is not None, grad, size_bucket(batch, module.hidden_size), input_grad)


def every_class(families: Iterable[str] = FAMILIES, dtypes: Iterable[str] = ("float32", "bfloat16"),
                lengths: Iterable[bool] = (False, True), modes: Iterable[str] = ("fwd+bwd", "fwd+bwd+dx", "fwd"),
                sizes: Iterable[str] = tuple(SIZES)) -> List[ClassKey]:
    """The classes ``rnnkit calibrate`` measures (by default float32 and bfloat16, both input kinds, the
    three modes of :data:`MODES`, the buckets of the benchmark's sizes S, M, L); ``sizes`` are S/M/L or
    ``N<batch>H<hidden>``."""
    buckets = list(dict.fromkeys(bucket_name(s) for s in sizes))
    return [ClassKey(f, d, ln, MODE_KEYS[m][0], s, MODE_KEYS[m][1]) for f in families for d in dtypes for ln in lengths
            for m in modes for s in buckets]


GRID_SIZES = tuple(f"N{n}H{h}" for n in (1, 8, 32, 128) for h in (64, 256, 1024))
"""``rnnkit calibrate --grid``: the buckets of the grid auto is held to (issue 13: batch 1 to 128, hidden
64 to 1024; benchmarks/auto_grid.py)."""


# ----------------------------------------------------------------------------- when to measure


def measure_mode() -> str:
    """``"on"``, ``"cached"`` (use the cache, never measure) or ``"off"`` (the shipped table only),
    from ``RNNKIT_AUTO_MEASURE``."""
    value = os.environ.get(MEASURE_ENV, "1").strip().lower()
    if value in ("0", "off", "false", "no", "table"):
        return "off"
    if value in ("cached", "cache"):
        return "cached"
    return "on"


def why_not_measure(x: Optional[Tensor] = None) -> Optional[str]:
    """Why measuring is not possible here (the table is used then), or None."""
    if getattr(_local, "measuring", False):
        return "already measuring"
    if torch.compiler.is_compiling():
        return "torch.compile / torch.export is tracing"
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return "torch.jit is tracing"
    if x is not None and type(x) not in (Tensor, torch.nn.Parameter):
        return f"the input is a tensor subclass ({type(x).__name__})"
    try:
        if torch._C._functorch.peek_interpreter_stack() is not None or (
                x is not None and torch._C._functorch.is_functorch_wrapped_tensor(x)):
            return "inside a torch.func transform"
    except AttributeError:  # pragma: no cover - older torch
        pass
    try:
        if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
            return "a TorchFunctionMode or TorchDispatchMode is active"
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            return "saved-tensor hooks are active"
        if torch.autograd.profiler._is_profiler_enabled:
            return "the autograd profiler is running"
    except AttributeError:  # pragma: no cover - older torch
        pass
    return None


# ----------------------------------------------------------------------------- the machine key and the cache file


@lru_cache(maxsize=1)
def _static_key() -> Tuple[Tuple[str, str], ...]:
    """The part of the machine key that does not change in a process."""
    flags = " ".join(sorted(_build._cpu_flags()))
    try:
        # the build's name (flags, torch, environment) and what the kernels are (the sources' hash)
        extension = f"{_build.extension_name()}+{_build.source_hash()}"
    except OSError:
        extension = "unknown"
    return (("cpu", _bench.cpu_name()), ("cpu_flags", hashlib.sha1(flags.encode()).hexdigest()[:12]),
            ("machine", platform.machine()), ("torch", torch.__version__), ("extension", extension),
            ("python", _glue_hash()))


GLUE = ("layers.py", "backends.py", "runner.py", "fused/backend.py", "fused/_ops.py")
"""The Python between a layer's call and the kernels, relative to the package: a small call's time is
mostly theirs, so a change to them measures afresh, as a kernel change does."""


def _glue_hash() -> str:
    h = hashlib.sha1()
    root = Path(__file__).resolve().parent.parent
    for name in GLUE:
        try:
            h.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
        except OSError:
            h.update(name.encode() + b"\0missing\0")
    return h.hexdigest()[:12]


def machine_key() -> Dict[str, object]:
    """What a measurement holds for: CPU model and flags, torch's thread count, torch version, the
    fused extension's name (compile flags, torch version, environment) and a hash of its sources."""
    return {**dict(_static_key()), "threads": torch.get_num_threads()}


def key_id(key: Dict[str, object]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """``$RNNKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/rnnkit``, else ``~/.cache/rnnkit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rnnkit"


def cache_path(key: Optional[Dict[str, object]] = None) -> Path:
    """This machine's cache file: one per machine key (``auto-<hash of the key>.json``)."""
    key = machine_key() if key is None else key
    return cache_dir() / f"auto-{key_id(key)}.json"


def read_cache(path: Path, key: Dict[str, object]) -> Dict[str, dict]:
    """The entries of the cache file at ``path`` if it is well formed and holds ``key``, else ``{}``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
        return {}
    entries = data.get("choices")
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if ClassKey.parse(k) is not None and isinstance(v, dict)
            and v.get("best") in ("fused", "torch")}


def write_cache(path: Path, key: Dict[str, object], entries: Dict[str, dict]) -> None:
    """Merge ``entries`` into the file (another process may have added some) and replace it
    atomically. Raises OSError when it cannot."""
    merged = {**read_cache(path, key), **entries}
    data = {"format": FORMAT, "key": key,
            "note": "rnnkit backend='auto': fused vs torch measured on this machine (rnnkit/fused/calibrate.py); "
                    "delete this file or run `rnnkit calibrate` to measure again",
            "choices": dict(sorted(merged.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".auto-", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ----------------------------------------------------------------------------- measuring one class


def race(fns: Dict[str, Callable[[], object]], repeats: int, once: Dict[str, float]) -> Dict[str, float]:
    """Median seconds per call of each fn over ``repeats`` interleaved rounds (``rnnkit.bench.time_row``:
    the order rotates each round, so a burst of load hits every contestant alike). The tests replace
    this function to dictate the numbers."""
    return _bench.time_row(fns, repeats, 0.0, once)[1]


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


@contextmanager
def _measuring():
    _local.measuring = True
    try:
        yield
    finally:
        _local.measuring = False


def _synthetic(klass: ClassKey, seq_len: int):
    """``{backend: call}``: one layer of the class on each backend, same weights, same input."""
    from ..layers import GRU, LSTM, RNN
    batch, h_in, hidden, _ = problem(klass)
    cls, kw = {"rnn_tanh": (RNN, {"nonlinearity": "tanh"}), "rnn_relu": (RNN, {"nonlinearity": "relu"}),
               "lstm": (LSTM, {}), "lstm_proj": (LSTM, {"proj_size": hidden // 2}), "gru": (GRU, {})}[klass.family]
    dtype = DTYPES[klass.dtype]
    gen = torch.Generator().manual_seed(0)
    # torch.nn's own initialization, U(-1/sqrt(H), 1/sqrt(H)), and a unit-variance input: values as a layer
    # meets them (the weights of +-0.1 used before saturate the gates at hidden 1024; measured again with
    # these, the verdicts did not move: what had skewed them was the input's gradient, see MODES)
    bound = 1.0 / math.sqrt(hidden)
    mods = {name: cls(h_in, hidden, backend=name, dtype=dtype, **kw) for name in ("fused", "torch")}
    with torch.no_grad():
        for p, q in zip(mods["fused"].parameters(), mods["torch"].parameters()):
            p.copy_(torch.rand(p.shape, generator=gen) * (2 * bound) - bound)
            q.copy_(p)
    x = torch.randn(seq_len, batch, h_in, generator=gen).to(dtype).requires_grad_(klass.input_grad)
    lengths = None
    if klass.lengths:
        lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (batch,), generator=gen)
        lengths[0] = seq_len

    def make(module):
        if klass.grad:
            def call():
                module.zero_grad(set_to_none=True)
                x.grad = None
                module(x, lengths=lengths)[0].float().sum().backward()
        else:
            def call():
                module(x, lengths=lengths)
        return call
    return {name: make(m) for name, m in mods.items()}


def warmup_limit(klass: ClassKey, seq_len: int, max_warmup_s: float) -> float:
    """Seconds the two warm-up calls may take before measuring ``klass`` is cut short on first use:
    ``max_warmup_s``, or :data:`WARMUP_FACTOR` times what its work takes at :data:`WARMUP_RATE`,
    whichever is longer (a large layer's own calls take longer than MAX_WARMUP_S on any machine)."""
    work = 2 * problem_macs(klass) * seq_len / problem(klass)[3]  # both backends, at this many steps
    return max(max_warmup_s, WARMUP_FACTOR * work / WARMUP_RATE)


def measure(klass: ClassKey, prior: Optional[str] = None, seq_len: Optional[int] = None,
            repeats: Optional[int] = None, budget_s: float = BUDGET_S,
            max_warmup_s: Optional[float] = None) -> dict:
    """Time fused vs torch on the synthetic problem of ``klass`` and return the entry auto keeps:
    ``best``, the median ms of each, ``torch_over_fused`` (above 1: fused faster), the settings.
    Within :data:`TIE` the answer is torch (``how`` is ``"tie"``). ``prior`` (the shipped table's
    choice) is the answer when the warm-up calls take longer than ``max_warmup_s`` (then ``how`` is
    ``"cut short"`` and no rounds run).

    Runs with the RNG state saved and restored, autocast off and grad on or off as the class says;
    it does not touch any tensor but its own."""
    start = time.perf_counter()
    seq_len = seq_len or problem(klass)[3]
    with _measuring(), torch.random.fork_rng(devices=[]), torch.autocast("cpu", enabled=False), \
            torch.inference_mode(False), torch.set_grad_enabled(klass.grad):
        fns = _synthetic(klass, seq_len)
        # the warm-up call (allocations, oneDNN primitives, the kernels' first call), timed: a cold call,
        # an overestimate, which only sets how many rounds fit the budget
        once = {name: _bench._time_calls(fn, 1) for name, fn in fns.items()}
        if max_warmup_s is not None and sum(once.values()) > warmup_limit(klass, seq_len, max_warmup_s):
            return _entry(klass, prior if prior in ("fused", "torch") else "fused", "cut short", once, seq_len, 0,
                          start)
        if repeats is None:
            left = budget_s - (time.perf_counter() - start)
            per_round = sum(once.values())
            if per_round < max(left, WARM_SIZING_S):
                # a cheap class: its cold call (allocations, oneDNN primitives; for the first class a process
                # measures, the process's own first-call costs too, 80-100 ms on the grid's first row) overstates
                # a round several times over, which cut such classes to MIN_REPEATS calls of a few ms, where one
                # noisy call decides a median of 3; a warm call of each sizes the rounds instead (at most one
                # more cold call's time; a class whose cold calls exceed WARM_SIZING_S keeps their figure)
                once = {name: _bench._time_calls(fn, 1) for name, fn in fns.items()}
                per_round = sum(once.values())
                left = budget_s - (time.perf_counter() - start)
            repeats = int(left / max(per_round, 1e-9))
        repeats = max(MIN_REPEATS, min(MAX_REPEATS, repeats))
        medians = race(fns, repeats, once)
        best, how = verdict(medians)
        again = prior in ("fused", "torch") and best != prior and _spread(medians) > STALL
        if again:  # a stall, or the table is wrong for this machine: a second race tells them apart
            second = race(fns, repeats, once)
            medians = {name: min(medians[name], second[name]) for name in medians}
            best, how = verdict(medians)
    entry = _entry(klass, best, how, medians, seq_len, repeats, start)
    if again:
        entry["raced"] = 2
    return entry


def verdict(times: Dict[str, float]) -> Tuple[str, str]:
    """``(best, how)`` from each backend's seconds per call: within :data:`TIE` torch (``"tie"``),
    else the faster (``"faster"``)."""
    fused, torch_ = times["fused"], times["torch"]
    ratio = torch_ / fused if fused > 0 else float("inf")
    if abs(math.log(max(ratio, 1e-12))) < math.log1p(TIE):
        return "torch", "tie"
    return ("fused" if ratio > 1 else "torch"), "faster"


def _spread(times: Dict[str, float]) -> float:
    """The slower backend's time over the faster's."""
    low, high = sorted((times["fused"], times["torch"]))
    return high / low if low > 0 else float("inf")


def _entry(klass: ClassKey, best: str, how: str, times: Dict[str, float], seq_len: int, repeats: int,
           start: float) -> dict:
    fused, torch_ = times["fused"], times["torch"]
    return {"best": best, "how": how, "fused_ms": fused * 1e3, "torch_ms": torch_ * 1e3,
            "torch_over_fused": torch_ / fused if fused > 0 else float("inf"), "seq_len": seq_len, "repeats": repeats,
            "batch": problem(klass)[0], "input_size": problem(klass)[1], "hidden_size": problem(klass)[2],
            "seconds": time.perf_counter() - start, "load_average": _load_average(),
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ----------------------------------------------------------------------------- what auto remembers


class Calibrator:
    """The measurements of one process: per machine key (the thread count can change), the
    entries read from the cache file on first use plus those measured since. Each new
    measurement is written to the file at once; when that fails, persistence is off for
    this process (``persist_error`` says why) and nothing is raised."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._memory: Dict[tuple, Dict[ClassKey, dict]] = {}
        self._sources: Dict[tuple, str] = {}  # bucket -> "cache" when entries were read from a file
        self.persist_error: Optional[str] = None
        self.measured: int = 0  # classes measured by this process
        self.seconds: float = 0.0  # time spent measuring
        self.epoch: int = 0  # counts changes to what lookup() can answer (auto's dispatch cache keys on it)

    def _bucket(self) -> Tuple[tuple, int]:
        return _static_key(), torch.get_num_threads()

    def entries(self) -> Dict[ClassKey, dict]:
        """The entries for this machine key (read from the cache file the first time)."""
        bucket = self._bucket()
        entries = self._memory.get(bucket)
        if entries is None:
            with self._lock:
                entries = self._memory.get(bucket)
                if entries is None:
                    key = machine_key()
                    entries = {ClassKey.parse(k): v for k, v in read_cache(cache_path(key), key).items()}
                    if entries:
                        self._sources[bucket] = "cache"
                    self._memory[bucket] = entries
        return entries

    def lookup(self, klass: ClassKey) -> Optional[dict]:
        return self.entries().get(klass)

    def record(self, klass: ClassKey, entry: dict, persist: bool = True) -> None:
        with self._lock:
            self.entries()[klass] = entry
            self.epoch += 1
            if persist:
                self.save({klass: entry})

    def save(self, entries: Optional[Dict[ClassKey, dict]] = None) -> Optional[Path]:
        """Write ``entries`` (default: all of this machine key's) to the cache file; returns its path,
        or None when persistence is off."""
        if self.persist_error is not None:
            return None
        key = machine_key()
        path = cache_path(key)
        try:
            entries = self.entries() if entries is None else entries
            write_cache(path, key, {str(k): v for k, v in entries.items() if v.get("how") not in UNMEASURED})
        except (OSError, TypeError, ValueError) as err:
            self.persist_error = f"{path}: {type(err).__name__}: {err}"
            return None
        return path

    def measure(self, klass: ClassKey, prior: Optional[str] = None, persist: bool = True, **kw) -> dict:
        with self._lock:
            entry = measure(klass, prior, **kw)
            self.measured += 1
            self.seconds += entry["seconds"]
            self.record(klass, entry, persist and entry["how"] not in UNMEASURED)  # cut short: this process only
        return entry

    def from_cache(self) -> bool:
        """Whether this machine key's entries came (in part) from a cache file."""
        self.entries()
        return self._sources.get(self._bucket()) == "cache"

    def forget(self) -> None:
        """Drop what this process holds (the next lookup reads the file again)."""
        with self._lock:
            self._memory.clear()
            self._sources.clear()
            self.persist_error = None
            self.epoch += 1


def describe(backend) -> List[str]:
    """Where auto's choices come from, for ``rnnkit info``."""
    table = backend.table().get("machine", {})
    shipped = f"shipped table (auto_table.json, measured on {table.get('cpu', 'the developers machine')}" \
        f", {table.get('threads', '?')} threads)"
    reason = backend.unavailable()
    if reason is not None:
        return [f"auto     the fused backend is unavailable: torch, then reference ({reason})"]
    mode = measure_mode()
    if mode == "off":
        return [f"auto     {shipped}: {MEASURE_ENV}=0 turns measuring off"]
    cal = backend.calibrator()
    entries = {k: e for k, e in cal.entries().items() if e.get("how") not in UNMEASURED}
    skipped = len(cal.entries()) - len(entries)
    path = cache_path()
    lines = []
    if entries:
        where = f"cache file {path}" if cal.persist_error is None else "in memory only: the cache is not writable"
        lines.append(f"auto     measured on this machine ({where}): {len(entries)} configuration classes")
    else:
        lines.append(f"auto     {shipped}: nothing measured on this machine yet (cache file {path})")
    if mode == "on":
        lines.append("         new classes are measured on first use (about 10-100 ms each); "
                     "`rnnkit calibrate` measures them all now")
    else:
        lines.append(f"         {MEASURE_ENV}=cached: unmeasured classes use the shipped table")
    if skipped:
        lines.append(f"         {skipped} classes left to the shipped table in this process (measuring was cut "
                     "short on a busy machine, or failed)")
    if cal.persist_error is not None:
        lines.append(f"         cache not writable, measurements kept in memory: {cal.persist_error}")
    return lines


# ----------------------------------------------------------------------------- rnnkit calibrate

DESCRIPTION = ("Measure now, on this machine, whether rnnkit's fused kernels or PyTorch's own RNN op is faster "
               "for every configuration class backend='auto' chooses between (cell family x dtype x dense or "
               "lengths input x forward+backward or forward only x size class), print the ratios and write them "
               "to this machine's cache file, which auto then reads instead of measuring on first use.")
EPILOG = """classes:
  family  rnn_tanh, rnn_relu, lstm, lstm_proj (proj_size = hidden/2), gru: the cells torch's op also runs
  size    N<batch>H<hidden>: a layer's batch and hidden size, each rounded to the nearest power of two
          (log scale; batch 1-512, hidden 8-4096); S, M, L name the benchmark's sizes N1H64, N16H128,
          N64H256 (the default), --grid the 12 buckets batch 1/8/32/128 x hidden 64/256/1024
  mode    train: forward+backward (grad enabled, the input without a gradient), train-dx: the input's
          gradient too (a second layer, an embedding's output), infer: forward only (no_grad / inference_mode)
  input   dense, or lengths (variable lengths: torch packs, fused takes lengths)
  Each class: one layer, one direction, input size = hidden size, 16 to 64 steps (fewer for more work
  per step), a warm-up call, then the median of 3 to 7 interleaved calls of each backend. On a busy machine the figures are noisy:
  calibrate when it is quiet.

columns:
  torch/fused  torch's time / fused time (above 1: fused is faster)
  auto         what auto runs for this class from now on on this machine
  table        what the shipped table (measured on the developers' machine) says

environment:
  RNNKIT_CACHE_DIR     the cache folder (default ~/.cache/rnnkit)
  RNNKIT_AUTO_MEASURE  1 (default): measure unknown classes on first use; cached: read the cache,
                       never measure; 0: the shipped table only (the cache is ignored)

examples:
  rnnkit calibrate                          # every class, float32 and bfloat16 (about a minute)
  rnnkit calibrate --family lstm --size L   # the large LSTMs only
  rnnkit calibrate --size N8H512            # one bucket (batch about 8, hidden about 512)
  rnnkit calibrate --grid --dtype float32   # the 12 grid buckets
  rnnkit calibrate --threads 8              # the choices for 8 torch threads (the cache is per thread count)
  rnnkit calibrate --clear                  # forget this machine's measurements"""


class CalibrateError(RuntimeError):
    """The calibration cannot run (the command line exits with code 1)."""


class CalibrateArgumentError(ValueError):
    """An option that cannot work (the command line exits with code 2)."""


def add_arguments(parser) -> None:
    parser.add_argument("--family", action="append", choices=FAMILIES, metavar="FAMILY",
                        help=f"cell family to measure (repeatable; default: all of {', '.join(FAMILIES)})")
    parser.add_argument("--size", action="append", metavar="SIZE",
                        help="size bucket: S, M, L (the benchmark's sizes) or N<batch>H<hidden> such as N8H512, "
                             "rounded to powers of two (repeatable; default: S, M and L)")
    parser.add_argument("--grid", action="store_true",
                        help=f"the buckets of auto's grid: batch 1/8/32/128 x hidden 64/256/1024 "
                             f"({len(GRID_SIZES)} buckets) instead of S, M, L")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES),
                        help="parameter dtype (repeatable; default: float32 and bfloat16)")
    parser.add_argument("--mode", action="append", choices=tuple(CLI_MODES),
                        help="train: forward+backward (the parameters' gradients), train-dx: the input's "
                             "gradient too, infer: forward only (repeatable; default: all three)")
    parser.add_argument("--input", action="append", choices=("dense", "lengths"),
                        help="dense input or variable lengths (repeatable; default: both)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch threads to measure with; the cache is per thread count "
                             f"(default: torch's current setting, {torch.get_num_threads()})")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help=f"interleaved calls per backend and class (default: {MIN_REPEATS} to {MAX_REPEATS}, "
                             f"as many as fit in about {BUDGET_S * 1e3:.0f} ms)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run for tests: size S, float32, dense, train only (unless given), "
                             f"{MIN_REPEATS} repeats")
    parser.add_argument("--no-write", action="store_true", help="print the ratios, leave the cache file alone")
    parser.add_argument("--clear", action="store_true",
                        help="delete this machine's cache file (for the current thread count) and exit")
    parser.add_argument("--json", metavar="PATH", help="also write every figure here")


CLI_MODES = {"train": "fwd+bwd", "train-dx": "fwd+bwd+dx", "infer": "fwd"}
"""``rnnkit calibrate --mode``: the class modes (:data:`MODES`)."""


def _fmt_row(cells: List[str]) -> str:
    widths = (10, 9, 8, 11, 10, 4, 5, 5, 4, 9, 9, 12, 6, 6)
    return "".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def run_from_args(args) -> int:
    from ..backends import BACKENDS
    backend = BACKENDS["fused"]
    if args.threads is not None and args.threads < 1:
        raise CalibrateArgumentError(f"--threads must be >= 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        raise CalibrateArgumentError(f"--repeats must be >= 1, got {args.repeats}")
    before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, backend)
    finally:
        torch.set_num_threads(before)


def _run(args, backend) -> int:
    key = machine_key()
    path = cache_path(key)
    if args.clear:
        try:
            path.unlink()
        except FileNotFoundError:
            print(f"no cache file for this machine and {key['threads']} threads: {path}")
            return 0
        backend.calibrator().forget()
        print(f"removed {path}: auto measures again on first use")
        return 0
    reason = backend.unavailable()
    if reason is not None:
        raise CalibrateError(f"the fused backend is unavailable ({reason}): auto runs torch, nothing to measure")
    quick = args.quick
    sizes = list(args.size or ()) + (list(GRID_SIZES) if args.grid else [])
    for size in sizes:
        try:
            bucket_name(size)
        except ValueError as err:
            raise CalibrateArgumentError(f"--size: {err}") from None
    classes = every_class(families=args.family or FAMILIES,
                          dtypes=args.dtype or (("float32",) if quick else ("float32", "bfloat16")),
                          lengths=[v == "lengths" for v in (args.input or (("dense",) if quick else
                                                                           ("dense", "lengths")))],
                          modes=[CLI_MODES[v] for v in (args.mode or (("train",) if quick else tuple(CLI_MODES)))],
                          sizes=sizes or (("S",) if quick else tuple(SIZES)))
    repeats = args.repeats or (MIN_REPEATS if quick else None)
    fastest = backend.table().get("fastest", {})
    print(f"rnnkit calibrate: fused vs torch on this machine, {len(classes)} classes; one layer per class, median "
          "of interleaved calls; torch/fused above 1: fused is faster", flush=True)
    print(f"machine: {key['cpu']}, {key['threads']} thread{'s' if key['threads'] != 1 else ''}, torch {key['torch']}, "
          f"{key['extension']}", flush=True)
    load = _load_average()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is not None and load > 0.5 * cores:
        print(f"warning: the machine is busy (load average {load:.1f} on {cores} cores): other processes share the "
              "cores, so these figures are noisy and some choices may be wrong; rerun on a quieter machine "
              "(rnnkit calibrate overwrites them)", flush=True)
    if measure_mode() != "on":
        print(f"note: {MEASURE_ENV}={os.environ.get(MEASURE_ENV)}: "
              + ("auto uses the shipped table and ignores this cache while it is set" if measure_mode() == "off"
                 else "auto reads this cache but measures nothing new"), flush=True)
    print(_fmt_row(["family", "dtype", "input", "mode", "size", "N", "H_in", "H", "T", "fused ms", "torch ms",
                    "torch/fused", "auto", "table"]), flush=True)
    cal = backend.calibrator()
    start = time.perf_counter()
    rows, entries = [], {}
    for klass in classes:
        prior = klass.table_prior(fastest)
        entry = cal.measure(klass, prior=prior, persist=False, repeats=repeats)
        entries[klass] = entry
        rows.append({"class": str(klass), "table": prior, **entry})
        print(_fmt_row([klass.family, klass.dtype, "lengths" if klass.lengths else "dense",
                        klass.mode, klass.size, str(entry["batch"]),
                        str(entry["input_size"]), str(entry["hidden_size"]), str(entry["seq_len"]),
                        f"{entry['fused_ms']:.3f}", f"{entry['torch_ms']:.3f}",
                        f"{entry['torch_over_fused']:.2f}" + (" (tie)" if entry["how"] == "tie" else ""),
                        entry["best"], prior or "-"]), flush=True)
    seconds = time.perf_counter() - start
    code = 0
    written = None
    if not args.no_write:
        written = cal.save(entries)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine_key": key, "cache": str(written) if written else None, "seconds": seconds,
                       "rows": rows}, f, indent=1)
    differ = sum(1 for r in rows if r["table"] is not None and r["table"] != r["best"])
    print(f"{len(rows)} classes in {seconds:.1f} s ({seconds / max(len(rows), 1) * 1e3:.0f} ms each on average); "
          f"{differ} differ from the shipped table")
    if args.no_write:
        print("cache: not written (--no-write)")
    elif written is not None:
        print(f"cache: {written} (auto reads it in every process with this machine key)")
    else:
        print(f"rnnkit calibrate: failed: cannot write the cache: {cal.persist_error}", file=sys.stderr)
        code = 1
    if args.json:
        print(f"json: {args.json}")
    return code
