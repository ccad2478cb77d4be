"""``rnnkit bench``: every backend side by side, in one process, with ratios.

The benchmark walks the registries, so a new backend (``rnnkit.backends.BACKENDS``)
or a new layer (``rnnkit.LAYERS``) shows up with no change here. For each layer
and size it times, in float32 with a fixed thread count:

* ``layer``: forward + backward of the whole layer over ``T`` steps, on each
  rnnkit backend that can run it and on the ``torch.nn`` equivalent (if any);
* ``step``: one step of the cell at batch 1, state in and state out, forward
  under ``torch.no_grad()`` (the streaming latency), on each backend the cell
  accepts and on ``torch.nn.<Name>Cell``;
* ``lengths``: forward + backward with variable lengths: rnnkit's ``lengths=``
  path on each backend against ``torch.nn`` on a ``PackedSequence`` (the time of
  ``pack_padded_sequence`` and ``pad_packed_sequence`` included, as a user pays it).

Checking: every contestant of a row holds the same weights, those of the oracle
(``torch.nn`` where the layer has an equivalent, else the reference backend), and
before any timing its outputs and parameter gradients are compared with the oracle's,
on a 5-step probe and on the full-length warm-up call; a contestant that differs is
reported as ``wrong`` and not timed.

Timing: each contestant is warmed up (the checked call), then every round times all
contestants of a row one after the other (in a rotating order, so noise hits them
alike); a contestant's figure is the minimum over rounds of the mean over ``number``
calls (about 20 ms a sample; the median is kept too). A row gets as many rounds as
fit in about 1 s, at least 3 and at most 5 (``--repeats N``: N for every row), so the
default run takes about 40 s on an idle 2-core machine. Ratios: ``time / time of the
best rnnkit backend`` (1.00 = the best), and ``torch.nn time / backend time`` (above
1: rnnkit is faster than torch.nn).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .backends import BACKENDS
from .registry import LAYERS, LayerEntry

SIZES: Dict[str, Tuple[int, int, int]] = {"S": (1, 32, 64), "M": (16, 64, 128), "L": (64, 256, 256)}  # batch, H_in, H
QUICK_SIZES: Dict[str, Tuple[int, int, int]] = {"S": (1, 4, 8), "M": (2, 8, 16), "L": (3, 8, 16)}
SECTIONS = ("layer", "step", "lengths")
INFERENCE = "inference"  # rnnkit eager vs torch.nn vs ONNX Runtime (rnnkit.bench_inference); its own table
DEFAULT_SECTION_CELLS = {"step": ["lstm"], "lengths": ["lstm"]}  # when no --cell is given
TORCH_NN = "torch.nn"
SECTION_TITLES = {
    "layer": "forward+backward over T steps",
    "step": "one cell step at batch 1, state in and out (forward, no grad: streaming latency)",
    "lengths": "forward+backward with variable lengths (rnnkit lengths= vs torch.nn on a PackedSequence)",
}

DESCRIPTION = ("Time forward+backward of every rnnkit backend and of torch.nn, side by side in one process, "
               "and print the ratios. Walks rnnkit.LAYERS and the backend registry, so new layers and "
               "backends appear by themselves.")
EPILOG = """sections:
  layer    forward+backward of the layer over T steps, sizes S (batch 1, H_in 32, H 64),
           M (batch 16, H_in 64, H 128), L (batch 64, H_in 256, H 256)
  step     one cell step at batch 1 with state in and out (forward, no grad), vs torch.nn.<Cell>
  lengths  forward+backward with random lengths in [T/4, T]: rnnkit's lengths= path per backend vs
           torch.nn on a PackedSequence (packing and unpacking included)
  inference  forward under no_grad: rnnkit (auto, fused; layer and cell for one step) vs torch.nn vs
           ONNX Runtime on two exports of the same layer: torch.nn's ("onnxruntime") and rnnkit's own
           ("ort rnnkit"; "ort rnnkit/ort" = its time / the time on torch.nn's export), LSTM and GRU:
           by default a length-T sequence and one step at batch 1, H 64; --inference-full: the grid
           N 1/8/32 x H 64/256/512 (minutes). Without onnxruntime its columns are skipped with the reason.
  The layer section runs every layer with vector inputs, step and lengths the LSTM, unless --cell
  is given; --all runs every registered layer (convolutional ones included) in every section.

checks and timing:
  before timing, each contestant's outputs and gradients (same weights, same input) are compared with
  torch.nn's, or the reference backend's where torch.nn has no equivalent; one that differs shows as
  "wrong" and is not timed. Then 3 to 5 interleaved rounds per row (as many as fit in about 1 s;
  --repeats N: N), each figure the minimum over rounds.

ratios:
  "x1.00" after a time = time / time of the best rnnkit backend in that row
  torch.nn/best        = torch.nn time / best rnnkit time (above 1: rnnkit is faster)

examples:
  rnnkit bench                                   # the default suite, about 40 s on 2 idle cores
  rnnkit bench --cell gru --size S --size M --json gru.json
  rnnkit bench --section step
  rnnkit bench --contended          # fused vs torch.nn at S and M, idle and with 3 busy processes"""


class BenchArgumentError(ValueError):
    """An option of the benchmark that cannot work (the command line exits with code 2)."""


def _one_line(text) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------- machine


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> Dict[str, object]:
    import rnnkit
    return {
        "rnnkit": rnnkit.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu": cpu_name(), "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": rnnkit.describe_backends(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def thread_check(threads: int) -> Dict[str, float]:
    """Min time of a 256x256 matrix product on ``threads`` threads and on one. On an idle machine
    more threads are faster; when other processes hold the cores, the threads of a parallel
    region wait for each other and can be many times slower than one thread."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    before = torch.get_num_threads()
    result = {}
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            a @ b
            result[f"matmul_s_{n}_threads"] = min(_time_calls(lambda: a @ b, 1) for _ in range(10))
    finally:
        torch.set_num_threads(before)
    result["slowdown_vs_1_thread"] = result[f"matmul_s_{threads}_threads"] / result["matmul_s_1_threads"]
    return result


# ----------------------------------------------------------------------------- contestants

Contestant = Callable[[], object]  # one call; returns its output (compared with the oracle's before timing)


def _fwd_bwd(module, x, lengths=None) -> Contestant:
    def call():
        module.zero_grad(set_to_none=True)
        out = module(x)[0] if lengths is None else module(x, lengths=lengths)[0]
        out.sum().backward()
        return out
    call.module = module  # its parameters' gradients are compared too
    return call


def _fwd_bwd_packed(module, x, lengths) -> Contestant:
    def call():
        module.zero_grad(set_to_none=True)
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, _ = pad_packed_sequence(module(packed)[0], total_length=x.shape[0])
        out.sum().backward()
        return out
    call.module = module
    return call


def _step(cell, x) -> Contestant:
    with torch.no_grad():
        state = cell(x)  # the state a stream carries: fed back in, returned anew

    def call():
        with torch.no_grad():
            return cell(x, state)
    return call


def _torch_cell(entry: LayerEntry):
    eq = entry.torch_equivalent
    return getattr(torch.nn, eq.__name__ + "Cell", None) if eq is not None else None


def _contestants(section: str, entry: LayerEntry, size: Tuple[int, int, int], seq_len: int, seed: int):
    """``(builders, skipped, config)``: builders map a name to ``f(seq_len) -> callable``
    (a short ``seq_len`` makes the cheap probe), skipped maps a name to the reason. Every
    contestant holds the same weights: those of the oracle (``torch.nn`` where the layer has
    an equivalent, else the reference backend's module), so their results can be compared."""
    batch, h_in, hidden = size
    if section == "step":
        batch = 1
    gen = torch.Generator().manual_seed(seed)
    shape = entry.input_shape(seq_len, batch, h_in)
    x = torch.randn(shape, generator=gen)
    lengths = None
    if section == "lengths":
        lengths = torch.randint(max(1, seq_len // 4), seq_len + 1, (batch,), generator=gen)
        lengths[0] = seq_len
    config = {"batch": batch, "input_size": h_in, "hidden_size": hidden, "seq_len": 1 if section == "step" else seq_len,
              "input_shape": list(shape[1:] if section == "step" else shape), "dtype": "float32"}
    if lengths is not None:
        config["lengths"] = lengths.tolist()
    builders: Dict[str, Callable[[int], Contestant]] = {}
    skipped: Dict[str, str] = {}

    def clip(t: int):
        xs = x[:t]
        ls = None if lengths is None else lengths.clamp(max=t)
        return xs, ls

    reference = None  # torch.nn's module, built first: its weights are everyone's
    if section == "step":
        tcell = _torch_cell(entry)
        if tcell is None or entry.spatial is not None:
            skipped[TORCH_NN] = "no torch.nn equivalent"
        else:
            reference = tcell(h_in, hidden)
            builders[TORCH_NN] = lambda t, m=reference: _step(m, x[0])
    elif entry.torch_equivalent is None or entry.spatial is not None:
        skipped[TORCH_NN] = "no torch.nn equivalent"
    else:
        try:
            reference = entry.torch_equivalent(h_in, hidden, **dict(entry.kwargs))
        except TypeError as err:
            skipped[TORCH_NN] = _one_line(err)
        else:
            if section == "lengths":
                builders[TORCH_NN] = lambda t, m=reference: _fwd_bwd_packed(m, *clip(t))
            else:
                builders[TORCH_NN] = lambda t, m=reference: _fwd_bwd(m, clip(t)[0])
    state = reference.state_dict() if reference is not None else None

    for name, backend in BACKENDS.items():
        reason = backend.unavailable()
        if reason:
            skipped[name] = f"unavailable: {reason}"
            continue
        try:
            if section == "step":
                if entry.cell is None:
                    skipped[name] = f"{entry.name} has no cell"
                    continue
                module = entry.cell(h_in, hidden, **{**entry.kwargs, "backend": name})
            else:
                module = entry.make(h_in, hidden, backend=name)
                reason = backend.unsupported(module, x)
                if reason:
                    skipped[name] = reason
                    continue
        except (ValueError, TypeError) as err:
            skipped[name] = _one_line(err)
            continue
        try:
            if state is None:
                state = module.state_dict()
            else:
                module.load_state_dict(state)
        except Exception as err:  # a module whose parameters differ cannot be checked: reported, not fatal
            skipped[name] = f"failed: cannot take the oracle's weights: {type(err).__name__}: {_one_line(err)}"
            continue
        if section == "step":
            builders[name] = lambda t, m=module: _step(m, x[0])
        else:
            builders[name] = lambda t, m=module: _fwd_bwd(m, *clip(t))
    if TORCH_NN in builders:  # torch.nn last, as in the table
        builders[TORCH_NN] = builders.pop(TORCH_NN)
    return builders, skipped, config


def _oracle(builders) -> Optional[str]:
    """Who the others are checked against: torch.nn where the layer has an equivalent, else the
    reference backend (the pure PyTorch step loop); None when neither can run the row."""
    return next((n for n in (TORCH_NN, "reference") if n in builders), None)


def _result(fn: Contestant, out) -> Dict[str, torch.Tensor]:
    """What a call computed, by name: its outputs and, after a backward, each parameter's gradient."""
    flat: List[torch.Tensor] = []

    def walk(o):
        if isinstance(o, (tuple, list)):
            for v in o:
                walk(v)
        elif isinstance(o, torch.Tensor):
            flat.append(o.detach())
    walk(out)
    got = {f"output {i}": t for i, t in enumerate(flat)}
    module = getattr(fn, "module", None)
    if module is not None:
        got.update({f"grad {n}": p.grad.detach() for n, p in module.named_parameters() if p.grad is not None})
    return got


CHECK_TOLERANCE = 1e-4  # per step: max |got - want| / max(1, max |want|) <= CHECK_TOLERANCE * T, per output and
# gradient. float32 roundoff grows with the steps: a LayerNorm LSTM at T=100 is 1e-3 from float64 on the reference
# backend and on fused alike (at T=5: 2e-6), while a wrong formula is off by far more.


def check_tolerance(length: int) -> float:
    return CHECK_TOLERANCE * max(1, length)


def _mismatch(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], oracle: str, length: int) -> Optional[str]:
    """None when every output and gradient matches the oracle's within CHECK_TOLERANCE, else why not."""
    if set(got) != set(want):
        return f"wrong result at T={length}: computes {sorted(got)}, {oracle} computes {sorted(want)}"
    for key, w in want.items():
        g = got[key]
        if g.shape != w.shape:
            return f"wrong result at T={length}: {key} has shape {tuple(g.shape)}, {oracle}'s {tuple(w.shape)}"
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        err = (g.float() - w.float()).abs().max().item() / scale if w.numel() else 0.0
        if not err <= check_tolerance(length):  # also catches NaN
            return (f"wrong result at T={length}: {key} differs from {oracle}'s by {err:.2g} "
                    f"(relative to its largest value; tolerance {check_tolerance(length):g})")
    return None


# ----------------------------------------------------------------------------- timing


MIN_REPEATS, MAX_REPEATS = 3, 5  # interleaved rounds of a row, when --repeats is not given
ROW_S = 1.0  # ...as many as fit in this many seconds: 5 for small calls, 3 for the large rows
LONG_CALL_S = 0.05  # a first call this long (over twice target_s) calibrates itself: no second call before the rounds


def _time_calls(fn: Contestant, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def time_row(fns: Dict[str, Contestant], repeats: int, target_s: float,
             once: Optional[Dict[str, float]] = None) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Interleaved min-of-repeats: ``(min seconds per call, median seconds per call)`` per name.
    ``once`` gives the time of one warm call where it is already known (no warm-up then)."""
    numbers = {}
    for name, fn in fns.items():
        if once is None or name not in once:
            fn()  # warm up (allocator, oneDNN primitives, lazy builds)
            t = _time_calls(fn, 1)
        else:
            t = once[name]
        numbers[name] = max(1, int(target_s / max(t, 1e-7)))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(_time_calls(fns[name], numbers[name]))
    mins = {name: min(s) for name, s in samples.items()}
    medians = {name: sorted(s)[len(s) // 2] for name, s in samples.items()}
    return mins, medians


def run(cells: Optional[Sequence[str]] = None, sizes: Optional[Sequence[str]] = None,
        sections: Optional[Sequence[str]] = None, repeats: Optional[int] = None, seq_len: int = 100,
        threads: int = 2, quick: bool = False, max_call_s: float = 2.0, target_s: float = 0.02, seed: int = 0,
        progress: bool = True, budget_s: Optional[float] = 240.0, all_layers: bool = False,
        inference_full: bool = False) -> Dict[str, object]:
    """Run the benchmark and return every figure (see the module docstring).

    ``repeats`` None (the default): each row gets as many interleaved rounds as fit in
    ``ROW_S`` seconds, MIN_REPEATS to MAX_REPEATS (:func:`rounds_for`); a number: that many
    for every row. The rows run smallest size first and the inference section before the
    largest size, so that a run cut short by ``budget_s`` still has every section.

    Returns a dict with ``machine``, ``settings``, ``rows`` (one per section,
    cell and size: ``config``, ``times_s``, ``median_s``, ``skipped``, ``best``,
    ``ratio_to_best``, ``torch_nn_speedup``, ``repeats``, ``checked_against``), ``inference``
    (when that section runs: see :mod:`rnnkit.bench_inference`) and ``seconds``.
    """
    start, cpu_start = time.perf_counter(), _cpu_s()
    table = QUICK_SIZES if quick else SIZES
    if quick:
        seq_len, repeats, target_s = min(seq_len, 10), 2 if repeats is None else min(repeats, 2), 0.0
    cells = list(cells) if cells else None
    for name in cells or []:
        if name not in LAYERS:
            raise BenchArgumentError(f"unknown cell {name!r}; choose from {sorted(LAYERS)}")
    sizes = list(sizes or table)
    for s in sizes:
        if s not in table:
            raise BenchArgumentError(f"unknown size {s!r}; choose from {list(table)}")
    sections = list(sections or SECTIONS + (INFERENCE,))
    for s in sections:
        if s not in SECTIONS + (INFERENCE,):
            raise BenchArgumentError(f"unknown section {s!r}; choose from {list(SECTIONS + (INFERENCE,))}")
    if (repeats is not None and repeats < 1) or seq_len < 1 or threads < 1:
        raise BenchArgumentError(f"repeats, seq_len and threads must be >= 1, got {repeats}, {seq_len}, {threads}")

    everyone = [n for n in LAYERS if all_layers or LAYERS[n].spatial is None]
    plan = []  # the table's order
    for section in sections:
        if section == INFERENCE:
            continue
        for cell in (cells or (everyone if all_layers else DEFAULT_SECTION_CELLS.get(section, everyone))):
            if cell in LAYERS:
                plan += [(section, cell, size) for size in sizes]
    # the order they run in: the smaller sizes of every section, the inference section, the largest size
    rank = {s: i for i, s in enumerate(table)}
    largest = max(sizes, key=rank.get)
    order = sorted((p for p in plan if p[2] != largest), key=lambda p: rank[p[2]])
    order += [(INFERENCE,)] if INFERENCE in sections else []
    order += [p for p in plan if p[2] == largest]

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    threads_ok = thread_check(threads)
    done: Dict[tuple, dict] = {}
    inference = None
    from tqdm.auto import tqdm
    bar = tqdm(order, desc="rnnkit bench", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for item in bar:
            bar.set_postfix_str(" ".join(item))
            spent = budget_s is not None and time.perf_counter() - start > budget_s
            if item == (INFERENCE,):
                torch.set_num_threads(before)  # bench_inference sets its own
                inference = _run_inference(cells, quick, seq_len, threads, inference_full, budget_s if spent else None)
                torch.set_num_threads(threads)
                continue
            section, cell, size = item
            if spent:
                done[item] = _unrun_row(section, LAYERS[cell], size, table[size], seq_len, seed,
                                        f"not run: the time budget was spent (--budget {budget_s:g} s)")
                continue
            done[item] = _run_row(section, LAYERS[cell], size, table[size], seq_len, repeats, target_s,
                                  max_call_s, seed, None if budget_s is None else start + budget_s, budget_s)
    finally:
        bar.close()
        torch.set_num_threads(before)
    machine = machine_info()
    machine["load_average_1min_before"] = load_before
    after = thread_check(threads)  # the cores may have been taken during the run
    machine["thread_check"] = max(threads_ok, after, key=lambda c: c["slowdown_vs_1_thread"])
    machine["thread_check"]["at_start_and_end"] = [threads_ok["slowdown_vs_1_thread"], after["slowdown_vs_1_thread"]]
    return {
        "machine": machine,
        "settings": {"dtype": "float32", "threads": threads, "seq_len": seq_len, "repeats": repeats,
                     "rounds": ({"min": MIN_REPEATS, "max": MAX_REPEATS, "row_s": ROW_S} if repeats is None
                                else {"min": repeats, "max": repeats}),
                     "budget_s": budget_s, "all_layers": all_layers,
                     "target_s_per_sample": target_s, "max_call_s": max_call_s, "quick": quick,
                     "sizes": {s: dict(zip(("batch", "input_size", "hidden_size"), table[s])) for s in sizes},
                     "checked": "before timing, each contestant's outputs and gradients against torch.nn's "
                                "(the reference backend's where torch.nn has no equivalent), on a 5-step probe "
                                f"and on the full warm-up call; max error / max(1, max |value|) <= {CHECK_TOLERANCE:g} x T",
                     "timer": "interleaved min over repeats of the mean over `number` calls"},
        "rows": [done[p] for p in plan],
        **({"inference": inference} if inference is not None else {}),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": _cpu_s() - cpu_start,
    }


def _cpu_s() -> float:
    """CPU time of this process and its finished children, in seconds (all threads)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _run_inference(cells, quick, seq_len, threads, full, spent_budget_s):
    from . import bench_inference
    infer_cells = [c for c in cells if c in bench_inference.CELLS] if cells else None
    if cells and not infer_cells:
        return {"skipped": f"the inference section times {list(bench_inference.CELLS)}, not {cells}"}
    if spent_budget_s is not None:
        return {"skipped": f"the time budget was spent (--budget {spent_budget_s:g} s)"}
    # the small default: 5 repeats of about 10 ms per contestant (the grid: 7 of 20 ms)
    return bench_inference.run(full=full, quick=quick, cells=infer_cells, seq_len=seq_len, threads=threads,
                               repeats=7 if full else 5, target_s=0.02 if full else 0.01)


def _unrun_row(section, entry, size_name, size, seq_len, seed, reason):
    builders, skipped, config = _contestants(section, entry, size, seq_len, seed)
    skipped.update({name: reason for name in builders})
    return {"section": section, "cell": entry.name, "size": size_name, "config": config, "times_s": {},
            "median_s": {}, "skipped": skipped, "best": None, "repeats": 0, "checked_against": None,
            "ratio_to_best": {}, "torch_nn_speedup": {}}


def rounds_for(once: Dict[str, float], target_s: float, repeats: Optional[int], row_s: float = ROW_S) -> int:
    """How many interleaved rounds a row gets: ``repeats`` when given; else as many as fit in
    ``row_s`` seconds (a round times each contestant once, about ``max(call, target_s)`` each),
    at least MIN_REPEATS and at most MAX_REPEATS."""
    if repeats is not None:
        return repeats
    round_s = sum(max(t, target_s) for t in once.values())
    return max(MIN_REPEATS, min(MAX_REPEATS, int(row_s / max(round_s, 1e-9))))


def _run_row(section, entry, size_name, size, seq_len, repeats, target_s, max_call_s, seed,
             deadline=None, budget_s=None):
    """One row. The oracle (:func:`_oracle`) runs first; every other contestant's outputs and
    gradients are compared with its own, on the 5-step probe and on the first full call (the
    warm-up), and a contestant that differs is not timed. ``repeats`` None: :func:`rounds_for`."""
    builders, skipped, config = _contestants(section, entry, size, seq_len, seed)
    oracle = _oracle(builders)
    fns, once = {}, {}
    want: Dict[int, Dict[str, torch.Tensor]] = {}  # the oracle's results by length
    probe_len = min(seq_len, 5)

    def checked(name, fn, out, length) -> bool:
        got = _result(fn, out)
        if name == oracle:
            want[length] = got
        elif length in want:
            wrong = _mismatch(got, want[length], oracle, length)
            if wrong:
                skipped[name] = wrong
                return False
        return True

    for name in sorted(builders, key=lambda n: n != oracle):  # the oracle first, the others in order
        build = builders[name]
        if deadline is not None and time.perf_counter() > deadline:
            skipped[name] = f"not run: the time budget was spent (--budget {budget_s:g} s)"
            continue
        try:
            if section != "step" and probe_len < seq_len:  # estimate from a short run before the full one
                probe = build(probe_len)
                if not checked(name, probe, probe(), probe_len):
                    continue
                # the least of 3: one short call can meet a busy core and look many times slower
                estimate = min(_time_calls(probe, 1) for _ in range(3)) * seq_len / probe_len
                if estimate > 2 * max_call_s:
                    skipped[name] = f"too slow: about {estimate:.1f} s per call (limit {max_call_s:g} s, --max-call)"
                    continue
            fn = build(seq_len)
            start = time.perf_counter()
            out = fn()  # the warm-up call, checked
            first = time.perf_counter() - start
            if not checked(name, fn, out, seq_len):
                continue
            del out
            # a long first call is its own calibration (its one-time costs are small beside it),
            # unless it is over the limit: then a second call decides
            once[name] = first if LONG_CALL_S <= first <= max_call_s else _time_calls(fn, 1)
            if once[name] > max_call_s:
                skipped[name] = f"too slow: {once[name]:.1f} s per call (limit {max_call_s:g} s, --max-call)"
                continue
        except Exception as err:  # a backend that fails here is reported, not fatal
            skipped[name] = f"failed: {type(err).__name__}: {_one_line(err)}"
            continue
        fns[name] = fn
    fns = {name: fns[name] for name in builders if name in fns}  # the rotation starts in the table's order
    rounds = rounds_for(once, target_s, repeats) if fns else 0
    times, medians = time_row(fns, rounds, target_s, once) if fns else ({}, {})
    ours = {n: t for n, t in times.items() if n != TORCH_NN}
    best = min(ours, key=ours.get) if ours else None
    row = {"section": section, "cell": entry.name, "size": size_name, "config": config, "times_s": times,
           "median_s": medians, "skipped": skipped, "best": best, "repeats": rounds,
           "checked_against": oracle if want else None,
           "ratio_to_best": {n: t / ours[best] for n, t in times.items()} if best else {},
           "torch_nn_speedup": ({n: times[TORCH_NN] / t for n, t in ours.items()} if TORCH_NN in times else {})}
    return row


# ----------------------------------------------------------------------------- output


def _ms(t: float) -> str:
    ms = t * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def format_table(result: Dict[str, object]) -> str:
    rows = result["rows"]
    st = result["settings"]
    m = result["machine"]
    names = [n for n in BACKENDS if any(n in r["times_s"] or n in r["skipped"] for r in rows)]
    names += [n for r in rows for n in list(r["times_s"]) + list(r["skipped"]) if n not in names and n != TORCH_NN]
    names.append(TORCH_NN)
    rounds = st.get("rounds") or {"min": st["repeats"], "max": st["repeats"]}
    rounds = str(rounds["max"]) if rounds["min"] == rounds["max"] else f"{rounds['min']}-{rounds['max']}"
    out = [f"rnnkit bench: float32, {st['threads']} threads, T={st['seq_len']}, min of {rounds} interleaved "
           f"repeats; times in ms per call, xR = time / best rnnkit backend's time",
           f"machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']}, rnnkit {m['rnnkit']}"]
    load = m.get("load_average_1min_before")
    if load is not None and load > 0.5 * (m["usable_cores"] or 1):
        out.append(f"warning: the machine was busy before the run (load average {load:.1f} on "
                   f"{m['usable_cores']} cores): other processes shared the cores, so these figures are noisy")
    check = m.get("thread_check") or {}
    if st["threads"] > 1 and check.get("slowdown_vs_1_thread", 0) > 1.5:
        out.append(f"warning: {st['threads']} threads were starved (at the start or the end, a 256x256 matmul took "
                   f"{check['slowdown_vs_1_thread']:.1f}x longer on {st['threads']} threads than on 1): another "
                   "process holds the cores, so threaded figures are inflated; rerun on an idle machine or "
                   "with --threads 1")
    notes: List[str] = []
    for section in SECTIONS:
        srows = [r for r in rows if r["section"] == section]
        if not srows:
            continue
        cols = ["cell", "size", "N", "H_in", "H"] + names + ["best", "torch.nn/best"]
        lines = []
        for r in srows:
            c = r["config"]
            cells = [r["cell"], r["size"], str(c["batch"]), str(c["input_size"]), str(c["hidden_size"])]
            for n in names:
                if n in r["times_s"]:
                    ratio = r["ratio_to_best"].get(n)
                    cells.append(_ms(r["times_s"][n]) + (f" x{ratio:.2f}" if ratio is not None else ""))
                elif n in r["skipped"]:
                    reason = r["skipped"][n]
                    kind = reason.split(":")[0] if reason.startswith(("too slow", "failed", "unavailable", "not run")) \
                        else "wrong" if reason.startswith("wrong result") else "n/a"
                    cells.append(kind)
                    if kind == "unavailable":
                        notes.append(f"{n}: {reason}")
                    elif kind == "not run":
                        notes.append(reason)
                    elif kind != "n/a":
                        notes.append(f"{section} {r['cell']} {r['size']} {n}: {reason}")
                else:
                    cells.append("-")
            cells.append(r["best"] or "-")
            best = r["best"]
            cells.append(f"{r['torch_nn_speedup'][best]:.2f}" if best in r["torch_nn_speedup"] else "-")
            lines.append(cells)
        widths = [max(len(x) for x in col) for col in zip(cols, *lines)]
        out.append("")
        out.append(f"[{section}] {SECTION_TITLES[section]}")
        out.append("  ".join(h.ljust(w) for h, w in zip(cols, widths)).rstrip())
        out += ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in lines]
    inference = result.get("inference")
    if inference is not None:
        from . import bench_inference
        out.append("")
        out.append(f"[inference] not run: {inference['skipped']}" if "skipped" in inference
                   else bench_inference.format_table(inference))
    if notes:
        out.append("")
        out.append("not timed:")
        seen = set()
        for note in notes:
            if note not in seen:
                seen.add(note)
                out.append(f"  {note}")
    unchecked = [f"{r['section']} {r['cell']} {r['size']}" for r in rows
                 if r.get("checked_against", "") is None and r["times_s"]]
    out.append("")
    out.append("checked: before timing, each contestant's outputs and gradients matched torch.nn's (the reference "
               "backend's where torch.nn has no equivalent)" +
               (f"; unchecked (no oracle ran): {', '.join(unchecked)}" if unchecked else ""))
    out.append("n/a: the backend cannot run this layer (reasons in --json); torch.nn/best = torch.nn time / "
               "best rnnkit time (above 1: rnnkit is faster)")
    cpu = result.get("cpu_seconds")
    out.append(f"total {result['seconds']:.0f} s" + (f" (CPU time {cpu:.0f} s)" if cpu is not None else ""))
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cell", action="append", metavar="CELL", type=lambda v: v.lower().replace("-", "_"),
                        help="layer to time (repeatable; default: every registered layer with vector inputs: "
                             f"{', '.join(n for n in LAYERS if LAYERS[n].spatial is None)}; "
                             "the step and lengths sections default to lstm)")
    parser.add_argument("--size", action="append", choices=list(SIZES), help="S, M or L (repeatable; default: all)")
    parser.add_argument("--section", action="append", choices=SECTIONS + (INFERENCE,),
                        help="layer, step, lengths or inference (repeatable; default: all four)")
    parser.add_argument("--inference-full", action="store_true",
                        help="the inference section's full grid: LSTM and GRU at N 1/8/32 x H 64/256/512, "
                             "sequences and single steps (minutes; default: a sequence and a step at N 1, H 64)")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help="interleaved repeats of every row; each figure is the minimum (default: as many as "
                             f"fit in {ROW_S:g} s per row, {MIN_REPEATS} to {MAX_REPEATS}: {MAX_REPEATS} for the small "
                             f"rows, {MIN_REPEATS} for the large ones)")
    parser.add_argument("--seq-len", type=int, default=100, metavar="T", help="sequence length (default: 100)")
    parser.add_argument("--threads", type=int, default=2, metavar="N", help="torch threads (default: 2)")
    parser.add_argument("--max-call", type=float, default=2.0, metavar="SECONDS",
                        help="skip a contestant whose one call takes longer than this (a 5-step probe first "
                             "skips those estimated over twice this; default: 2.0)")
    parser.add_argument("--budget", type=float, default=240.0, metavar="SECONDS",
                        help="stop starting new rows after this many seconds; the rest are listed as not run "
                             "(the rows run smallest size first, the inference section before the largest size, so "
                             "every section runs; default: 240, so even on a busy machine the default run ends "
                             "within 5 minutes; 0: no limit)")
    parser.add_argument("--all", action="store_true", dest="all_layers",
                        help="every registered layer, the convolutional ones included, in every section "
                             "(default: the vector layers; step and lengths: lstm)")
    parser.add_argument("--json", metavar="PATH", help="write every figure (config, times, ratios, machine) here")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny smoke run: T <= 10, tiny sizes, 2 repeats (for tests; the figures mean little)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--contended", action="store_true",
                        help="instead: fused vs torch.nn forward+backward at S and M (and a batch-1 hidden-32 "
                             "length-10 RNN), idle and then with --busy spinning processes on this machine "
                             "(rnnkit/fused/under_load.py; figures are medians of interleaved samples)")
    parser.add_argument("--busy", type=int, default=3, metavar="K",
                        help="busy processes for --contended's loaded phase (default: 3)")


def run_contended(args) -> int:
    """``rnnkit bench --contended``: :mod:`rnnkit.fused.under_load` on its S and M rows."""
    from .fused import under_load
    if args.busy < 1:
        raise BenchArgumentError(f"--busy must be at least 1 busy process, got {args.busy}")
    reason = _fused_reason()
    if reason is not None:
        raise BenchArgumentError(f"--contended times the fused backend, which is not available here: {reason}")
    if args.quick:  # a smoke run for tests: one tiny row, few short samples
        configs, samples, sample_ms, budget_s = ("rnn_s",), 3, 2.0, 2.0
    else:
        # --repeats unset (None): 15 samples per backend and phase
        configs, samples, sample_ms, budget_s = under_load.CONTENDED, max(15, 3 * (args.repeats or 0)), 20.0, 30.0
    result = under_load.run(configs, args.busy, samples, sample_ms, args.threads, max_busy_s=600.0,
                            budget_s=budget_s, progress=not args.quiet)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(under_load.format_table(result))
    if args.json:
        print(f"json: {args.json}")
    return 0


def _fused_reason() -> Optional[str]:
    from .fused import _build
    return _build.load()


def run_from_args(args) -> int:
    if getattr(args, "contended", False):
        return run_contended(args)
    if args.max_call <= 0:
        raise BenchArgumentError(f"--max-call must be positive, got {args.max_call}")
    if args.budget < 0:
        raise BenchArgumentError(f"--budget must be >= 0 (0: no limit), got {args.budget}")
    result = run(cells=args.cell, sizes=args.size, sections=args.section, repeats=args.repeats,
                 seq_len=args.seq_len, threads=args.threads, quick=args.quick, max_call_s=args.max_call,
                 progress=not args.quiet, budget_s=args.budget or None, all_layers=args.all_layers,
                 inference_full=args.inference_full)
    if args.json:  # written first: the figures survive whatever happens next
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(format_table(result))
    if args.json:
        print(f"json: {args.json}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python benchmarks/bench.py [options]``: the same as ``rnnkit bench [options]``."""
    from .cli import main as cli_main
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])
