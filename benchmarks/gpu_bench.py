"""GPU timing of the triton backend against torch (cuDNN) and the reference loop, side by side.

Forward and forward+backward, CUDA events, in one process; in each round every backend runs
back to back (interleaved), and each figure is the median over ``--repeat`` rounds.

    PYTHONPATH=$PWD python benchmarks/gpu_bench.py --json gpu.json                 # the whole run (< 7 min)
    PYTHONPATH=$PWD python benchmarks/gpu_bench.py --json gpu.json --write-table   # + auto's table for this GPU
    PYTHONPATH=$PWD python benchmarks/gpu_bench.py --dry-run --json dry.json       # tiny sizes, interpreter, CPU

Configurations (issue 12, item 4):

* FlashRNN's setting: LSTM, batch 16, length 1024, hidden 768, bfloat16 and float16;
* a grid: LSTM, GRU, LayerNormLSTM x batch 16/64 x length 100/1000 x hidden 64/256/1024, float32...
  bfloat16 (``--dtype``), with and without ``lengths`` (uniform in [L/2, L]; torch then packs).

The reference loop runs only at length 100 (at 1000 it would take minutes; its per-step cost does not
depend on the length). LayerNormLSTM has no torch op: its ``torch`` column is torch.nn.LSTM of the same
size (the yardstick the issue's targets use), marked ``yardstick``. Anything that does not fit the time
budget (``--budget-s``, 400 s by default) is listed under ``skipped``, never guessed.
``--dry-run`` sets TRITON_INTERPRET=1 before triton is imported and runs the same code on CPU tensors at
tiny sizes (the tests run it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU tensors through Triton's interpreter")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--write-table", action="store_true",
                    help="write this GPU's torch-vs-triton choices into rnnkit/triton/auto_table.json")
    ap.add_argument("--repeat", type=int, default=5, help="rounds per configuration (median)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop starting new configurations after this")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the grid (FlashRNN's setting runs bfloat16 and float16)")
    ap.add_argument("--cells", default="lstm,gru,layernorm_lstm")
    return ap.parse_args(argv)


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

import rnnkit  # noqa: E402

CELLS = {"lstm": (rnnkit.LSTM, torch.nn.LSTM), "gru": (rnnkit.GRU, torch.nn.GRU),
         "layernorm_lstm": (rnnkit.LayerNormLSTM, torch.nn.LSTM)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def configs(args):
    """``(label, cell, dtype, batch, seq, hidden, lengths)`` in the order they run."""
    cells = [c for c in args.cells.split(",") if c]
    if args.dry_run:
        out = [("flashrnn", "lstm", "bfloat16", 2, 3, 8, False)]
        out += [("grid", c, "float32", 2, 3, 8, ln) for c in cells for ln in (False, True)]
        return out
    out = [("flashrnn", "lstm", dt, 16, 1024, 768, False) for dt in ("bfloat16", "float16")]
    for seq in (100, 1000):
        for hidden in (64, 256, 1024):
            for batch in (16, 64):
                for cell in cells:
                    for ln in (False, True):
                        out.append(("grid", cell, args.dtype, batch, seq, hidden, ln))
    return out


class Timer:
    """CUDA events on the GPU, perf_counter (after a sync) elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def build(cell, backend, dtype, device, hidden, input_size):
    ours, theirs = CELLS[cell]
    if backend == "yardstick":
        return theirs(input_size, hidden).to(device, dtype)
    return ours(input_size, hidden, backend=backend).to(device, dtype)


def run_one(module, x, lengths, backward):
    def fn():
        xi = x.requires_grad_(backward) if backward else x
        if isinstance(module, rnnkit.RecurrentBase):
            out, _ = module(xi, lengths=lengths) if lengths is not None else module(xi)
        else:
            out, _ = module(xi)
        if backward:
            out.float().sum().backward()
    return fn


def main(args) -> int:
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device (use --dry-run to check the script on the CPU)", file=sys.stderr)
        return 2
    repeat = 1 if args.dry_run else args.repeat
    timer = Timer(device)
    started = time.perf_counter()
    rows, skipped = [], []
    gen = torch.Generator().manual_seed(0)
    for label, cell, dtname, batch, seq, hidden, with_lengths in configs(args):
        if time.perf_counter() - started > args.budget_s:
            skipped.append({"label": label, "cell": cell, "dtype": dtname, "batch": batch, "seq": seq,
                            "hidden": hidden, "lengths": with_lengths, "why": "time budget"})
            continue
        dtype = DTYPES[dtname]
        input_size = hidden
        x = torch.randn(seq, batch, input_size, generator=gen).to(device, dtype)
        lengths = None
        if with_lengths:
            lengths = torch.randint(seq // 2 + 1, seq + 1, (batch,), generator=gen)
            lengths[0] = seq
        backends = ["triton", "torch" if cell != "layernorm_lstm" else "yardstick"]
        if seq <= 100 or args.dry_run:
            backends.append("reference")
        modules = {}
        for b in backends:
            try:
                modules[b] = build(cell, b, dtype, device, hidden, input_size)
            except (ValueError, RuntimeError) as err:
                skipped.append({"label": label, "cell": cell, "backend": b, "why": str(err)})
        if with_lengths and "yardstick" in modules:
            del modules["yardstick"]  # torch.nn.LSTM takes no lengths: no like-for-like yardstick
        times = {b: {"fwd": [], "fwdbwd": []} for b in modules}
        for b, m in modules.items():  # warm-up (compiles the kernels), not timed
            with torch.no_grad():
                run_one(m, x, lengths, False)()
            run_one(m, x.detach().clone(), lengths, True)()
        for _ in range(repeat):
            for b, m in modules.items():
                with torch.no_grad():
                    times[b]["fwd"].append(timer(run_one(m, x, lengths, False)))
                times[b]["fwdbwd"].append(timer(run_one(m, x.detach().clone(), lengths, True)))
        for b in modules:
            row = {"label": label, "cell": cell, "dtype": dtname, "batch": batch, "seq": seq, "hidden": hidden,
                   "lengths": with_lengths, "backend": b,
                   "fwd_ms": statistics.median(times[b]["fwd"]), "fwdbwd_ms": statistics.median(times[b]["fwdbwd"])}
            if b == "triton":
                from rnnkit.triton import _common
                row["driver"] = _common.DRIVERS[_common.driver_for(hidden)]
            rows.append(row)
        tri = next(r for r in rows[-len(modules):] if r["backend"] == "triton") if "triton" in modules else None
        for r in rows[-len(modules):]:
            if tri is not None and r is not tri:
                r["over_triton_fwdbwd"] = r["fwdbwd_ms"] / tri["fwdbwd_ms"]
            print(f"{label:8} {cell:15} {dtname:9} N={batch:<3} L={seq:<5} H={hidden:<5} "
                  f"{'lengths' if with_lengths else '       '} {r['backend']:9} fwd {r['fwd_ms']:9.3f} ms  "
                  f"fwd+bwd {r['fwdbwd_ms']:9.3f} ms" +
                  (f"  ({r['over_triton_fwdbwd']:.2f}x triton)" if "over_triton_fwdbwd" in r else ""),
                  flush=True)
    result = {
        "machine": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                    "dry_run": args.dry_run, "repeat": repeat},
        "rows": rows, "skipped": skipped, "seconds": time.perf_counter() - started,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.write_table and not args.dry_run:
        write_table(result)
    return 0


def write_table(result) -> None:
    """This GPU's choices into rnnkit/triton/auto_table.json: per family (``_lengths`` with lengths)
    and size class ``b<batch>_h<hidden>``, the faster of torch and triton on forward+backward at the
    longest measured length (only where both ran the same function: no yardstick rows)."""
    from rnnkit.triton.backend import TABLE_PATH, load_table
    table = load_table()
    table.setdefault("gpus", {})
    gpu = table["gpus"].setdefault(result["machine"]["device"], {})
    best = {}
    for r in result["rows"]:
        if r["label"] != "grid" or r["backend"] not in ("torch", "triton"):
            continue
        key = (r["cell"] + ("_lengths" if r["lengths"] else ""), f"b{r['batch']}_h{r['hidden']}")
        best.setdefault(key, {}).setdefault(r["seq"], {})[r["backend"]] = r["fwdbwd_ms"]
    for (row, col), by_seq in best.items():
        times = by_seq[max(by_seq)]
        if len(times) == 2:
            gpu.setdefault(row, {})[col] = min(times, key=times.get)
    TABLE_PATH.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main(ARGS))
