"""Forward+backward timing of the fused backend against torch.nn and the reference
backend, float32, 2 threads, T=100, in one process, interleaved, min-of-N.

    PYTHONPATH=$PWD python benchmarks/fused_bench.py                 # print the table
    PYTHONPATH=$PWD python benchmarks/fused_bench.py --write-table   # also write rnnkit/fused/auto_table.json
    PYTHONPATH=$PWD python benchmarks/fused_bench.py --json out.json --cells lstm,gru --sizes S,M

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


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make(cell: str, size: str, seed: int = 0):
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
    x = torch.randn(T, batch, inp)
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


def bench_cell(cell: str, size: str, repeat: int, with_reference: bool = True) -> dict:
    mods, x = make(cell, size)
    fns = {name: step_fn(m, x) for name, m in mods.items() if with_reference or name != "reference"}
    return race(fns, repeat)


def bench_lengths(size: str, repeat: int) -> dict:
    """LSTM with variable lengths: fused on padded+lengths vs torch.nn on a PackedSequence."""
    mods, x = make("lstm", size)
    batch = x.shape[1]
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(T // 2, T + 1, (batch,), generator=g)
    lengths[0] = T
    fns = {"fused": step_fn(mods["fused"], x, lengths=lengths),
           "torch.nn": step_fn(mods["torch.nn"], x, lengths=lengths, packed=True),
           "reference": step_fn(mods["reference"], x, lengths=lengths)}
    return race(fns, repeat)


def bench_step(repeat: int, hidden: int = 64, inp: int = 32) -> dict:
    """One LSTMCell step at batch 1, state in and out, inference (the streaming case)."""
    torch.manual_seed(0)
    ours = rnnkit.LSTMCell(inp, hidden)
    theirs = torch.nn.LSTMCell(inp, hidden)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, inp)
    state = (torch.zeros(1, hidden), torch.zeros(1, hidden))

    def mk(cell):
        def run():
            with torch.no_grad():
                for _ in range(100):
                    cell(x, state)
        return run
    best = race({"fused": mk(ours), "torch.nn": mk(theirs)}, repeat)
    return {k: v / 100 for k, v in best.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--sizes", default="S,M,L")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference backend")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    ap.add_argument("--write-table", action="store_true", help=f"write auto's table to {TABLE_PATH}")
    ap.add_argument("--update", action="store_true", help="with --write-table: replace only the cells measured now")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reason = rnnkit.BACKENDS["fused"].unavailable()
    if reason:
        print(f"fused backend unavailable: {reason}", file=sys.stderr)
        return 1
    machine = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
               "python": platform.python_version(), "cores_visible": os.cpu_count()}
    print(f"# {machine['cpu']}, torch {machine['torch']}, {args.threads} threads, T={T}, float32, fwd+bwd, "
          f"min of {args.repeat}")
    results = {"machine": machine, "T": T, "sizes": SIZES, "rows": []}
    warm_until = time.perf_counter() + 2.0  # settle the thread pools and allocator before the first figure
    mods, x = make("rnn_tanh", "S")
    warm = [step_fn(m, x) for m in mods.values()]
    while time.perf_counter() < warm_until:
        for fn in warm:
            fn()
    header = f"{'cell':<10} {'size':<4} {'fused ms':>9} {'torch ms':>9} {'ref ms':>9} {'torch/fused':>11} {'ref/fused':>9}"
    print(header)
    fastest = {}
    for cell in args.cells.split(","):
        for size in args.sizes.split(","):
            r = bench_cell(cell, size, args.repeat, with_reference=not args.no_reference)
            row = {"cell": cell, "size": size, **{f"{k}_ms": v * 1e3 for k, v in r.items()}}
            if "torch.nn" in r:
                row["torch_over_fused"] = r["torch.nn"] / r["fused"]
            if "reference" in r:
                row["reference_over_fused"] = r["reference"] / r["fused"]
            results["rows"].append(row)
            ref = f"{row.get('reference_ms', float('nan')):9.3f}"
            print(f"{cell:<10} {size:<4} {row['fused_ms']:9.3f} {row.get('torch.nn_ms', float('nan')):9.3f} {ref} "
                  f"{row.get('torch_over_fused', float('nan')):11.2f} "
                  f"{row.get('reference_over_fused', float('nan')):9.2f}", flush=True)
            key = CELLS[cell][3]
            if key is not None and "torch.nn" in r:  # torch.nn runs this very function
                fastest.setdefault(key, {})[size] = "fused" if r["fused"] < r["torch.nn"] else "torch"
    if "lstm" in args.cells.split(","):
        for size in args.sizes.split(","):
            r = bench_lengths(size, args.repeat)
            row = {"cell": "lstm_lengths", "size": size, **{f"{k}_ms": v * 1e3 for k, v in r.items()},
                   "torch_over_fused": r["torch.nn"] / r["fused"], "reference_over_fused": r["reference"] / r["fused"]}
            results["rows"].append(row)
            fastest.setdefault("lstm_lengths", {})[size] = "fused" if r["fused"] < r["torch.nn"] else "torch"
            print(f"{'lstm+len':<10} {size:<4} {row['fused_ms']:9.3f} {row['torch.nn_ms']:9.3f} "
                  f"{row['reference_ms']:9.3f} {row['torch_over_fused']:11.2f} {row['reference_over_fused']:9.2f}"
                  "   (torch.nn on a PackedSequence)", flush=True)
        r = bench_step(args.repeat)
        results["lstm_cell_step_us"] = {k: v * 1e6 for k, v in r.items()}
        results["rows"].append({"cell": "lstm_cell_step", "size": "S", "fused_ms": r["fused"] * 1e3,
                                "torch.nn_ms": r["torch.nn"] * 1e3, "torch_over_fused": r["torch.nn"] / r["fused"]})
        print(f"LSTMCell step, batch 1, H_in 32, H 64 (inference): fused {r['fused']*1e6:.1f} us, "
              f"torch.nn {r['torch.nn']*1e6:.1f} us, ratio {r['torch.nn']/r['fused']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.write_table:
        table = {"machine": machine, "note": "written by benchmarks/fused_bench.py --write-table: per cell "
                 "and size class, the backend that ran forward+backward faster (fused or torch)",
                 "fastest": fastest, "rows": results["rows"],
                 "lstm_cell_step_us": results.get("lstm_cell_step_us")}
        if args.update:  # keep the other cells' entries, replace the ones measured now
            old = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}
            measured = {(r["cell"], r["size"]) for r in results["rows"]}
            table["fastest"] = {**old.get("fastest", {}), **{k: {**old.get("fastest", {}).get(k, {}), **v}
                                                             for k, v in fastest.items()}}
            table["rows"] = [r for r in old.get("rows", []) if (r["cell"], r["size"]) not in measured] + \
                results["rows"]
            if "lstm_cell_step_us" not in results:
                table["lstm_cell_step_us"] = old.get("lstm_cell_step_us")
        TABLE_PATH.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {TABLE_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
