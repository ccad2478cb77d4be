"""Inference speed: rnnkit eager against torch.nn and ONNX Runtime, side by side in one process.

What a deployed recurrent model pays per call, forward only under ``torch.no_grad()``,
float32, a fixed thread count:

* ``sequence`` rows: one layer over ``L`` steps (default 100) at batch ``N`` and
  ``hidden_size = input_size = H``: rnnkit with ``backend="auto"`` (the default) and
  ``backend="fused"``, ``torch.nn``, and ONNX Runtime running ``torch.nn``'s own model
  exported with ``torch.onnx.export(..., dynamo=False, dynamic_axes=...)`` (ONNX's
  native ``LSTM``/``GRU`` operator);
* ``step`` rows: one step (``L = 1``) with the state in and out, the streaming call:
  the rnnkit layer, the rnnkit cell (``rnnkit.LSTMCell``: the cell fast path),
  ``torch.nn``'s layer, and ONNX Runtime on the exported layer;
* in both: ONNX Runtime on rnnkit's own export of the same layer (``rnnkit.LSTM``/``GRU`` on the
  same weights, exported by the same call; see rnnkit/onnx.py), next to ORT on torch.nn's
  export: the ratio of the two says whether an rnnkit-exported model serves as fast.

Every contestant computes the same function on the same weights and inputs (checked
once per row to 1e-4 before timing). Timing: warmed up, then ``repeats`` rounds, each
timing every contestant once in a rotating order (so noise hits them alike); the
figure is the median over rounds of the mean over ``number`` calls. Ratios are taken
of the medians. ONNX Runtime runs with ``intra_op_num_threads = threads``; its worker
threads do not spin between calls (``session.intra_op.allow_spinning = 0``), because
a spinning worker would hold a core while the next contestant runs; ``spin=True``
keeps ORT's default.

``python benchmarks/inference.py`` runs the full grid; ``rnnkit bench`` runs a small
part of it by default (``--inference-full``: the grid). ONNX Runtime is optional: without
it (or without a working exporter) its column says why.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

CELLS = ("lstm", "gru")
FULL_SEQ = [(n, h) for h in (64, 256, 512) for n in (1, 8, 32)]  # (batch, hidden)
FULL_STEP = [(1, 64), (1, 256), (8, 256)]
SMALL_SEQ = [(1, 64)]
SMALL_STEP = [(1, 64)]
QUICK_SEQ = [(1, 8)]
QUICK_STEP = [(2, 8)]
ORT = "onnxruntime"
"""ONNX Runtime on torch.nn's exported layer."""
ORT_RNNKIT = "ort rnnkit"
"""ONNX Runtime on rnnkit's exported layer (the same weights, the same export call)."""
COLUMNS = {
    "sequence": ("rnnkit auto", "rnnkit fused", "torch.nn", ORT, ORT_RNNKIT),
    "step": ("rnnkit layer", "rnnkit cell", "torch.nn", ORT, ORT_RNNKIT),
}


def _classes(cell: str):
    import rnnkit
    if cell == "lstm":
        return rnnkit.LSTM, rnnkit.LSTMCell, torch.nn.LSTM
    if cell == "gru":
        return rnnkit.GRU, rnnkit.GRUCell, torch.nn.GRU
    raise ValueError(f"inference benchmark: cell must be one of {list(CELLS)}, got {cell!r}")


def ort_session(module: torch.nn.Module, x: torch.Tensor, hx, threads: int, spin: bool = False):
    """An ONNX Runtime session on ``module`` (a torch.nn or rnnkit LSTM/GRU) exported with the
    TorchScript exporter, time, batch and state batch dynamic; or the reason it cannot be made (a str)."""
    try:
        import onnxruntime as ort
    except Exception as err:  # not installed, or a broken install
        return f"onnxruntime is not installed ({type(err).__name__}: {err})"
    lstm = isinstance(hx, tuple)
    inputs = ["x", "h0", "c0"] if lstm else ["x", "h0"]
    outputs = ["y", "hn", "cn"] if lstm else ["y", "hn"]
    axes = {"x": {0: "L", 1: "N"}, "y": {0: "L", 1: "N"}}
    axes.update({name: {1: "N"} for name in inputs[1:] + outputs[1:]})
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x, hx), buf, dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    except Exception as err:
        return f"export or session failed: {type(err).__name__}: {' '.join(str(err).split())[:200]}"


def _timed(fns: Dict[str, Callable[[], object]], repeats: int, target_s: float,
           clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median seconds per call of each contestant, interleaved in a rotating order."""
    numbers = {}
    for name, fn in fns.items():
        fn()
        start = clock()
        fn()
        numbers[name] = max(1, int(target_s / max(clock() - start, 1e-7)))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, number = fns[name], numbers[name]
            start = clock()
            for _ in range(number):
                fn()
            samples[name].append((clock() - start) / number)
    return {name: sorted(s)[len(s) // 2] for name, s in samples.items()}


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    """torch.testing.assert_close's test (|got - want| <= tol + tol * |want|, same dtype) without its
    first-call cost: it imports torch.distributed.tensor, about 3 s."""
    if got.dtype != want.dtype:
        raise AssertionError(f"dtype {got.dtype} != {want.dtype}")
    bad = ~((got - want).abs() <= tol + tol * want.abs())  # NaN counts as bad
    if bad.any():
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} elements differ, the most by "
                             f"{(got - want).abs().nan_to_num(float('inf')).max().item():.3g}")


def _flat(result) -> List[torch.Tensor]:
    out = []
    for r in (result if isinstance(result, (tuple, list)) else [result]):
        out += _flat(r) if isinstance(r, (tuple, list)) else [torch.as_tensor(r)]
    return out


def run_row(kind: str, cell: str, batch: int, hidden: int, seq_len: int, threads: int, repeats: int,
            target_s: float, seed: int = 0, spin: bool = False, sessions: Optional[dict] = None,
            cpu_time: bool = False) -> Dict[str, object]:
    """One row: ``kind`` is ``"sequence"`` or ``"step"``. Returns the config, the median seconds
    per call of each contestant that ran, and why any did not. ``sessions`` caches the ORT
    sessions by ``(cell, hidden)`` (the exported model takes any length and batch)."""
    layer_cls, cell_cls, torch_cls = _classes(cell)
    torch.manual_seed(seed)
    ref = torch_cls(hidden, hidden).eval()
    length = seq_len if kind == "sequence" else 1
    x = torch.randn(length, batch, hidden)
    h0 = torch.randn(1, batch, hidden)
    hx = (h0, torch.randn(1, batch, hidden)) if cell == "lstm" else h0
    skipped: Dict[str, str] = {}
    contestants: Dict[str, Tuple[Callable[[], object], Callable]] = {}  # name -> (call, output -> flat list)

    def layer(backend):
        m = layer_cls(hidden, hidden, backend=backend).eval()
        m.load_state_dict(ref.state_dict())
        return lambda: m(x, hx)

    if kind == "sequence":
        contestants["rnnkit auto"] = (layer("auto"), _flat)
        contestants["rnnkit fused"] = (layer("fused"), _flat)
    else:
        contestants["rnnkit layer"] = (layer("auto"), _flat)
        c = cell_cls(hidden, hidden)
        c.load_state_dict({k[:-3]: v for k, v in ref.state_dict().items()})  # weight_ih_l0 -> weight_ih
        x0 = x[0]
        s0 = (hx[0][0], hx[1][0]) if cell == "lstm" else hx[0]
        contestants["rnnkit cell"] = (lambda: c(x0, s0),
                                      lambda r: [t.unsqueeze(0) for t in _flat(r)] if cell == "lstm"
                                      else [r.unsqueeze(0), r.unsqueeze(0)])
    contestants["torch.nn"] = (lambda: ref(x, hx), _flat)
    feed = {"x": x.numpy(), "h0": h0.numpy()}
    if cell == "lstm":
        feed["c0"] = hx[1].numpy()

    def exported(name: str, make: Callable[[], torch.nn.Module]) -> None:
        key = (name, cell, hidden, threads, spin, seed)
        session = sessions.get(key) if sessions is not None else None
        if session is None:
            session = ort_session(make(), x, hx, threads, spin)
            if sessions is not None:
                sessions[key] = session
        if isinstance(session, str):
            skipped[name] = session
        else:
            contestants[name] = (lambda: session.run(None, feed), lambda r: [torch.from_numpy(a) for a in r])

    def rnnkit_layer() -> torch.nn.Module:
        m = layer_cls(hidden, hidden).eval()
        m.load_state_dict(ref.state_dict())
        return m

    exported(ORT, lambda: ref)
    exported(ORT_RNNKIT, rnnkit_layer)

    with torch.no_grad():
        want = _flat(ref(x, hx))
        for name, (fn, flat) in list(contestants.items()):
            try:
                got = flat(fn())
                if name == "rnnkit cell":  # the cell returns the new state only: compare it to h_n (and c_n)
                    got = got[:1] + got if cell == "lstm" else got
                for u, v in zip(got, want):
                    _assert_close(u.reshape(v.shape), v)
            except Exception as err:
                skipped[name] = f"failed: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
                del contestants[name]
        times = _timed({name: fn for name, (fn, _) in contestants.items()}, repeats, target_s,
                       time.thread_time if cpu_time else time.perf_counter)
    return {"kind": kind, "cell": cell, "batch": batch, "hidden": hidden, "input_size": hidden, "seq_len": length,
            "median_s": times, "skipped": skipped}


def plan(full: bool = False, quick: bool = False, cells: Optional[Sequence[str]] = None) -> List[tuple]:
    seq, step = (QUICK_SEQ, QUICK_STEP) if quick else (FULL_SEQ, FULL_STEP) if full else (SMALL_SEQ, SMALL_STEP)
    cells = list(cells or CELLS)
    rows = [("sequence", c, n, h) for c in cells for n, h in seq]
    rows += [("step", c, n, h) for c in cells for n, h in step]
    return rows


def run(full: bool = False, quick: bool = False, cells: Optional[Sequence[str]] = None, seq_len: int = 100,
        threads: int = 2, repeats: int = 7, target_s: float = 0.02, spin: bool = False,
        progress: Optional[Callable[[str], None]] = None, cpu_time: bool = False) -> Dict[str, object]:
    """Every row of :func:`plan`; returns ``{"settings", "rows", "seconds"}``. ``cpu_time`` times
    with the calling thread's CPU time instead of the wall clock (one thread only: on a shared,
    loaded machine it leaves out the time the process waited for a core)."""
    if cpu_time and threads != 1:
        raise ValueError(f"inference benchmark: cpu_time counts the calling thread only, so it needs threads=1, "
                         f"got threads={threads}")
    if quick:
        seq_len, repeats, target_s = min(seq_len, 10), min(repeats, 2), 0.0
    for c in cells or []:
        _classes(c)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    rows: List[dict] = []
    sessions: dict = {}
    try:
        for kind, cell, n, h in plan(full, quick, cells):
            if progress is not None:
                progress(f"inference {kind} {cell} N={n} H={h}")
            rows.append(run_row(kind, cell, n, h, seq_len, threads, repeats, target_s, spin=spin, sessions=sessions,
                                cpu_time=cpu_time))
    finally:
        torch.set_num_threads(before)
    return {"settings": {"dtype": "float32", "threads": threads, "seq_len": seq_len, "repeats": repeats,
                         "full": full, "quick": quick, "ort_spinning": spin, "grad": "torch.no_grad()",
                         "clock": "thread CPU time" if cpu_time else "wall",
                         "timer": "interleaved median over repeats of the mean over `number` calls"},
            "rows": rows, "seconds": time.perf_counter() - start,
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _us(t: Optional[float]) -> str:
    if t is None:
        return "-"
    us = t * 1e6
    return f"{us:.3g}" if us < 1000 else f"{us:.0f}"


def ratios(row: Dict[str, object]) -> Dict[str, float]:
    """The row's headline ratios (of medians): rnnkit's time over ORT's and torch.nn's (below 1:
    rnnkit is faster), for a step the layer's over the cell's, and ORT's time on rnnkit's export
    over its time on torch.nn's (``ort rnnkit/ort``; below 1: rnnkit's export runs faster)."""
    t = row["median_s"]
    ours = "rnnkit auto" if row["kind"] == "sequence" else "rnnkit layer"
    out = {}
    if ORT_RNNKIT in t and ORT in t:
        out["ort rnnkit/ort"] = t[ORT_RNNKIT] / t[ORT]
    if ours in t:
        if ORT in t:
            out[f"{ours}/ort"] = t[ours] / t[ORT]
        if "torch.nn" in t:
            out[f"{ours}/torch.nn"] = t[ours] / t["torch.nn"]
        if "rnnkit cell" in t:
            out["layer/cell"] = t[ours] / t["rnnkit cell"]
    return out


def format_table(result: Dict[str, object]) -> str:
    st = result["settings"]
    clock = " (thread CPU time)" if st.get("clock") == "thread CPU time" else ""
    out = [f"[inference] forward under torch.no_grad(), float32, {st['threads']} threads, median of {st['repeats']} "
           f"interleaved repeats; times in us per call{clock}, H_in = H"]
    notes = []
    for kind in ("sequence", "step"):
        rows = [r for r in result["rows"] if r["kind"] == kind]
        if not rows:
            continue
        names = COLUMNS[kind]
        extra = ["auto/ort", "auto/torch.nn"] if kind == "sequence" else ["layer/cell", "layer/torch.nn", "layer/ort"]
        extra.append("ort rnnkit/ort")
        head = ["kind", "cell", "L", "N", "H", *names, *extra]
        lines = []
        for r in rows:
            t, q = r["median_s"], ratios(r)
            ours = "rnnkit auto" if kind == "sequence" else "rnnkit layer"
            cells = [kind, r["cell"], str(r["seq_len"]), str(r["batch"]), str(r["hidden"])]
            cells += [_us(t.get(n)) if n in t else ("n/a" if n in r["skipped"] else "-") for n in names]
            keys = [f"{ours}/ort", f"{ours}/torch.nn"] + (["layer/cell"] if kind == "step" else [])
            if kind == "step":
                keys = ["layer/cell", f"{ours}/torch.nn", f"{ours}/ort"]
            keys.append("ort rnnkit/ort")
            cells += [f"{q[k]:.2f}" if k in q else "-" for k in keys]
            lines.append(cells)
            notes += [f"{n}: {why}" for n, why in r["skipped"].items()]
        widths = [max(len(c) for c in col) for col in zip(head, *lines)]
        out.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
        out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    for note in dict.fromkeys(notes):
        out.append(f"  not timed: {note}")
    out.append(f"ratios: time / time (below 1: rnnkit is faster); {ORT} runs torch.nn's exported model, {ORT_RNNKIT} "
               f"rnnkit's (same weights, torch.onnx.export(dynamo=False); intra_op_num_threads={st['threads']}, "
               f"spinning {'on' if st['ort_spinning'] else 'off'})")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import json
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="the small default of `rnnkit bench` (not the grid)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--cell", action="append", choices=CELLS)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--spin", action="store_true", help="let ORT's worker threads spin (its default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the thread's CPU time (needs --threads 1): on a loaded machine it leaves out "
                             "the waits for a core")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        parser.error(f"--cpu-time needs --threads 1, got --threads {args.threads}")
    result = run(full=not args.small, quick=args.quick, cells=args.cell, seq_len=args.seq_len, threads=args.threads,
                 repeats=args.repeats, spin=args.spin, progress=lambda s: print(s, flush=True), cpu_time=args.cpu_time)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    from .bench import cpu_name
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__}, load average "
          f"{result['load_average_1min']}")
    print(format_table(result))
    print(f"total {result['seconds']:.0f} s")
    return 0
