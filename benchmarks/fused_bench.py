"""Forward+backward timing of the fused backend against torch.nn and the reference
backend, float32 (or ``--dtype bfloat16``), 2 threads, T=100, in one process, interleaved, min-of-N.

    PYTHONPATH=$PWD python benchmarks/fused_bench.py                 # print the table
    PYTHONPATH=$PWD python benchmarks/fused_bench.py --write-table   # also write rnnkit/fused/auto_table.json
    PYTHONPATH=$PWD python benchmarks/fused_bench.py --json out.json --cells lstm,gru --sizes S,M
    PYTHONPATH=$PWD python benchmarks/fused_bench.py --dtype bfloat16 --cells rnn_tanh,rnn_relu,lstm,lstm_proj,gru \\
        --no-reference --write-table --update   # add the bfloat16 rows (keys like lstm_bfloat16) to auto's table

The machine it runs on is shared, so every figure is the minimum over
``--repeat`` rounds, and in each round the backends run back to back
(interleaved), so a burst of load hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from rnnkit.fused.backend import TABLE_PATH

SIZES = {"S": (1, 32, 64), "M": (16, 64, 128), "L": (64, 256, 256)}  # batch, input, hidden
CELLS = {  # name -> (rnnkit class, torch.nn class, kwargs, table key)
    "rnn_tanh": (rnnkit.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}, "rnn_tanh"),
    "rnn_relu": (rnnkit.RNN, torch.nn.RNN, {"nonlinearity": "relu"}, "rnn_relu"),
    "lstm": (rnnkit.LSTM, torch.nn.LSTM, {}, "lstm"),
    "lstm_proj": (rnnkit.LSTM, torch.nn.LSTM, {"proj_size": None}, "lstm_proj"),  # proj = hidden // 2
    "gru": (rnnkit.GRU, torch.nn.GRU, {}, "gru"),
    # zoo cells: torch.nn has no such layer, so the torch column is torch.nn.LSTM of the same size
    # (the yardstick), not the same function; they get no entry in auto's table (key None)
    "peephole_lstm": (rnnkit.PeepholeLSTM, torch.nn.LSTM, {}, None),
    "layernorm_lstm": (rnnkit.LayerNormLSTM, torch.nn.LSTM, {}, None),
    "layernorm_gru": (rnnkit.LayerNormGRU, torch.nn.GRU, {}, None),  # its yardstick: torch.nn.GRU of the same size
    "indrnn": (rnnkit.IndRNN, None, {}, None),  # relu; no torch.nn counterpart: fused vs reference only
    "indrnn_tanh": (rnnkit.IndRNN, None, {"nonlinearity": "tanh"}, None),
}
T = 100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BF16_CELLS = ("rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru")  # the families with bfloat16 kernels

# ConvLSTM / ConvGRU (fused vs reference only: torch.nn has no conv RNN), kernel 3, 'same' padding;
# size -> (T, batch, input channels, hidden channels, square image side). Run with
# --cells conv_lstm2d,conv_gru2d (not in the default --cells: no entry in auto's table).
CONV_CELLS = {
    "conv_lstm2d": (rnnkit.ConvLSTM2d, {}),
    "conv_lstm2d_peephole": (rnnkit.ConvLSTM2d, {"peephole": True}),
    "conv_gru2d": (rnnkit.ConvGRU2d, {}),
}
CONV_SIZES = {"S": (20, 1, 4, 8, 16), "M": (20, 4, 16, 32, 32), "L": (20, 8, 32, 64, 64)}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make(cell: str, size: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    ours_cls, torch_cls, kw, _ = CELLS[cell]
    batch, inp, hidden = SIZES[size]
    kw = dict(kw)
    if "proj_size" in kw:
        kw["proj_size"] = hidden // 2
    torch.manual_seed(seed)
    mods = {}
    for backend in ("fused", "reference"):
        mods[backend] = ours_cls(inp, hidden, backend=backend, **kw)
    if torch_cls is not None:
        mods["torch.nn"] = torch_cls(inp, hidden, **{k: v for k, v in kw.items() if k != "nonlinearity" or
                                                      torch_cls is torch.nn.RNN})
    for m in mods.values():  # a zoo cell has parameters torch.nn's stand-in lacks (peepholes, LN gains): left out
        m.load_state_dict({k: v for k, v in mods["fused"].state_dict().items() if k in m.state_dict()})
        m.to(dtype)
    x = torch.randn(T, batch, inp).to(dtype)
    return mods, x


def step_fn(module, x, lengths=None, packed=False):
    xi = x.clone().requires_grad_()

    def run():
        if packed:
            inp = pack_padded_sequence(xi, lengths, enforce_sorted=False)
            out, h = module(inp)
            loss = out.data.sum()
        elif lengths is not None:
            out, h = module(xi, lengths=lengths)
            loss = out.sum()
        else:
            out, h = module(xi)
            loss = out.sum()
        loss.backward()
    return run


def timed(fn, inner: int) -> float:
    """The fastest of ``inner`` back-to-back calls (each timed on its own, so a
    burst of load from other processes spoils only the calls it hits)."""
    best = float("inf")
    for _ in range(inner):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def race(fns: dict, repeat: int, budget: float = 0.04) -> dict:
    """Seconds per call of each fn: the minimum over ``repeat`` rounds of about
    ``budget`` seconds each, the fns interleaved round by round."""
    for fn in fns.values():  # warm up
        fn()
    # calls per round from the fastest of 3 (a single slow call must not make it 1)
    inner = {k: max(3, int(budget / max(timed(fn, 3), 1e-6))) for k, fn in fns.items()}
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            best[k] = min(best[k], timed(fn, inner[k]))
    return best


def bench_cell(cell: str, size: str, repeat: int, with_reference: bool = True,
               dtype: torch.dtype = torch.float32, vs_float32: bool = False) -> dict:
    mods, x = make(cell, size, dtype=dtype)
    fns = {name: step_fn(m, x) for name, m in mods.items() if with_reference or name != "reference"}
    if vs_float32:  # the same layers in float32, in the same race (--vs-float32)
        mods32, x32 = make(cell, size)
        fns.update({f"{name}_float32": step_fn(mods32[name], x32) for name in ("fused", "torch.nn")
                    if name in mods32})
    return race(fns, repeat)


def bench_conv(cell: str, size: str, repeat: int) -> dict:
    """A conv layer's forward+backward, fused vs reference, float32."""
    cls, kw = CONV_CELLS[cell]
    steps, batch, inp, hidden, side = CONV_SIZES[size]
    torch.manual_seed(0)
    mods = {backend: cls(inp, hidden, 3, backend=backend, **kw) for backend in ("fused", "reference")}
    mods["reference"].load_state_dict(mods["fused"].state_dict())
    x = torch.randn(steps, batch, inp, side, side)
    return race({name: step_fn(m, x) for name, m in mods.items()}, repeat)


def bench_lengths(size: str, repeat: int, dtype: torch.dtype = torch.float32, with_reference: bool = True) -> dict:
    """LSTM with variable lengths: fused on padded+lengths vs torch.nn on a PackedSequence."""
    mods, x = make("lstm", size, dtype=dtype)
    batch = x.shape[1]
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(T // 2, T + 1, (batch,), generator=g)
    lengths[0] = T
    fns = {"fused": step_fn(mods["fused"], x, lengths=lengths),
           "torch.nn": step_fn(mods["torch.nn"], x, lengths=lengths, packed=True)}
    if with_reference:
        fns["reference"] = step_fn(mods["reference"], x, lengths=lengths)
    return race(fns, repeat)


STEP_CELLS = {"lstm": (rnnkit.LSTMCell, torch.nn.LSTMCell, 2), "gru": (rnnkit.GRUCell, torch.nn.GRUCell, 1),
              "rnn_tanh": (rnnkit.RNNCell, torch.nn.RNNCell, 1)}  # name -> (rnnkit, torch.nn, number of states)


def bench_step(repeat: int, cell: str = "lstm", hidden: int = 64, inp: int = 32, grad: bool = False) -> dict:
    """One cell step at batch 1, state in and out (the streaming case): rnnkit's cell
    (backend='auto') against torch.nn's, same weights, same input and state, both
    under torch.no_grad() (inference), or both with grad enabled and parameters that
    require it (``grad=True``: a training step's forward; there rnnkit takes the torch op)."""
    ours_cls, torch_cls, n_states = STEP_CELLS[cell]
    torch.manual_seed(0)
    ours = ours_cls(inp, hidden)
    theirs = torch_cls(inp, hidden)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, inp)
    state = tuple(torch.zeros(1, hidden) for _ in range(n_states))
    hx = state if n_states > 1 else state[0]

    def mk(module):
        def run():
            with torch.set_grad_enabled(grad):
                for _ in range(100):
                    module(x, hx)
        return run
    fns = {"fused": mk(ours), "torch.nn": mk(theirs)}
    # a longer warm-up than race()'s single call: on this shared machine torch.nn's
    # first few hundred steps were seen to run 100 to 1000 times slower at times
    for fn in fns.values():
        until = time.perf_counter() + 0.3
        while time.perf_counter() < until:
            fn()
    best = race(fns, repeat)
    return {k: v / 100 for k, v in best.items()}


def step_rows(repeat: int, results: dict) -> None:
    """The single-step rows: every cell of STEP_CELLS at inference."""
    for cell in STEP_CELLS:
        r = bench_step(repeat, cell)
        if cell == "lstm":
            results["lstm_cell_step_us"] = {k: v * 1e6 for k, v in r.items()}
        results["rows"].append({"cell": f"{cell}_cell_step", "size": "S", "fused_ms": r["fused"] * 1e3,
                                "torch.nn_ms": r["torch.nn"] * 1e3, "torch_over_fused": r["torch.nn"] / r["fused"]})
        print(f"{STEP_CELLS[cell][0].__name__} step, batch 1, H_in 32, H 64 (inference): rnnkit "
              f"{r['fused']*1e6:.1f} us, torch.nn {r['torch.nn']*1e6:.1f} us, ratio {r['torch.nn']/r['fused']:.2f}",
              flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(CELLS),
                    help=f"comma-separated, from {sorted(CELLS)} and the conv layers {sorted(CONV_CELLS)} "
                         "(sizes: see CONV_SIZES)")
    ap.add_argument("--sizes", default="S,M,L")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference backend")
    ap.add_argument("--steps-only", action="store_true", help="only the single-step (batch 1) cell rows")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    ap.add_argument("--write-table", action="store_true", help=f"write auto's table to {TABLE_PATH}")
    ap.add_argument("--update", action="store_true", help="with --write-table: replace only the cells measured now")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES),
                    help="parameters and input dtype; bfloat16 rows get table keys like lstm_bfloat16")
    ap.add_argument("--vs-float32", action="store_true",
                    help="with --dtype bfloat16: also time fused and torch.nn in float32, interleaved in the same race")
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    cells = args.cells.split(",")
    if dtype == torch.bfloat16:
        skipped = [c for c in cells if c not in BF16_CELLS]
        if skipped:
            print(f"# no bfloat16 kernels for {', '.join(skipped)}: skipped", file=sys.stderr)
        cells = [c for c in cells if c in BF16_CELLS]
    torch.set_num_threads(args.threads)
    reason = rnnkit.BACKENDS["fused"].unavailable()
    if reason:
        print(f"fused backend unavailable: {reason}", file=sys.stderr)
        return 1
    machine = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
               "python": platform.python_version(), "cores_visible": os.cpu_count()}
    print(f"# {machine['cpu']}, torch {machine['torch']}, {args.threads} threads, T={T}, {args.dtype}, fwd+bwd, "
          f"min of {args.repeat}")
    results = {"machine": machine, "T": T, "sizes": SIZES, "rows": []}
    warm_until = time.perf_counter() + 2.0  # settle the thread pools and allocator before the first figure
    mods, x = make("rnn_tanh", "S")
    warm = [step_fn(m, x) for m in mods.values()]
    while time.perf_counter() < warm_until:
        for fn in warm:
            fn()
    if args.steps_only:  # the single-step rows alone
        step_rows(args.repeat, results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return 0
    header = f"{'cell':<10} {'size':<4} {'fused ms':>9} {'torch ms':>9} {'ref ms':>9} {'torch/fused':>11} {'ref/fused':>9}"
    print(header)
    fastest = {}
    for cell in cells:
        if cell in CONV_CELLS:
            for size in args.sizes.split(","):
                r = bench_conv(cell, size, args.repeat)
                row = {"cell": cell, "size": size, "conv_size": CONV_SIZES[size],
                       **{f"{k}_ms": v * 1e3 for k, v in r.items()}, "reference_over_fused": r["reference"] / r["fused"]}
                results["rows"].append(row)
                print(f"{cell:<10} {size:<4} {row['fused_ms']:9.3f} {float('nan'):9.3f} {row['reference_ms']:9.3f} "
                      f"{float('nan'):11.2f} {row['reference_over_fused']:9.2f}   (T, N, C, hidden, side) = "
                      f"{CONV_SIZES[size]}", flush=True)
            continue
        for size in args.sizes.split(","):
            r = bench_cell(cell, size, args.repeat, with_reference=not args.no_reference, dtype=dtype,
                           vs_float32=args.vs_float32 and dtype != torch.float32)
            row = {"cell": cell, "size": size, "dtype": args.dtype, **{f"{k}_ms": v * 1e3 for k, v in r.items()}}
            if "torch.nn" in r:
                row["torch_over_fused"] = r["torch.nn"] / r["fused"]
            if "reference" in r:
                row["reference_over_fused"] = r["reference"] / r["fused"]
            results["rows"].append(row)
            ref = f"{row.get('reference_ms', float('nan')):9.3f}"
            print(f"{cell:<10} {size:<4} {row['fused_ms']:9.3f} {row.get('torch.nn_ms', float('nan')):9.3f} {ref} "
                  f"{row.get('torch_over_fused', float('nan')):11.2f} "
                  f"{row.get('reference_over_fused', float('nan')):9.2f}", flush=True)
            if "fused_float32" in r:
                row["fused_float32_over_fused"] = r["fused_float32"] / r["fused"]
                print(f"{'':<15} float32: fused {r['fused_float32'] * 1e3:.3f} ms, torch.nn "
                      f"{r.get('torch.nn_float32', float('nan')) * 1e3:.3f} ms; fused float32 / fused "
                      f"{args.dtype} {row['fused_float32_over_fused']:.2f}", flush=True)
            key = CELLS[cell][3]
            if key is not None and "torch.nn" in r:  # torch.nn runs this very function
                fastest.setdefault(key + suffix, {})[size] = "fused" if r["fused"] < r["torch.nn"] else "torch"
    if "lstm" in cells:
        for size in args.sizes.split(","):
            r = bench_lengths(size, args.repeat, dtype=dtype, with_reference=not args.no_reference)
            row = {"cell": "lstm_lengths", "size": size, "dtype": args.dtype,
                   **{f"{k}_ms": v * 1e3 for k, v in r.items()}, "torch_over_fused": r["torch.nn"] / r["fused"]}
            if "reference" in r:
                row["reference_over_fused"] = r["reference"] / r["fused"]
            results["rows"].append(row)
            fastest.setdefault(f"lstm{suffix}_lengths", {})[size] = "fused" if r["fused"] < r["torch.nn"] else "torch"
            print(f"{'lstm+len':<10} {size:<4} {row['fused_ms']:9.3f} {row['torch.nn_ms']:9.3f} "
                  f"{row.get('reference_ms', float('nan')):9.3f} {row['torch_over_fused']:11.2f} "
                  f"{row.get('reference_over_fused', float('nan')):9.2f}"
                  "   (torch.nn on a PackedSequence)", flush=True)
    if "lstm" in cells and dtype == torch.float32:  # the fused cells step float32/float64 only
        step_rows(args.repeat, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.write_table:
        table = {"machine": machine, "note": "written by benchmarks/fused_bench.py --write-table: per cell "
                 "and size class, the backend that ran forward+backward faster (fused or torch)",
                 "fastest": fastest, "rows": results["rows"],
                 "lstm_cell_step_us": results.get("lstm_cell_step_us")}
        if args.update:  # keep the other cells' entries, replace the ones measured now
            old = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}
            measured = {(r["cell"], r["size"], r.get("dtype", "float32")) for r in results["rows"]}
            table["fastest"] = {**old.get("fastest", {}), **{k: {**old.get("fastest", {}).get(k, {}), **v}
                                                             for k, v in fastest.items()}}
            table["rows"] = [r for r in old.get("rows", [])
                             if (r["cell"], r["size"], r.get("dtype", "float32")) not in measured] + \
                results["rows"]
            if "lstm_cell_step_us" not in results:
                table["lstm_cell_step_us"] = old.get("lstm_cell_step_us")
        TABLE_PATH.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {TABLE_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
