"""backend='auto' against torch.nn over the grid it is held to (issue 13, item 3): LSTM and GRU,
batch 1 to 128, hidden 64 to 1024, length 50 to 500, 1-2 layers, both directions, forward+backward
(training) and forward only (no_grad). Target: auto never more than 5% slower than torch.nn.

Each row builds an rnnkit layer with ``backend="auto"`` and the torch.nn layer of the same weights,
runs each once (auto measures its class on this machine on its first call: that call's time is the
``first ms`` column, calibration included), checks that auto's output equals torch.nn's, then times
the two interleaved (``rnnkit.bench.time_row``: the order rotates every round; a sample is the mean of
back-to-back calls lasting about ``--sample-s``, one call for a longer one), median of the rounds.
``auto/nn`` above 1 means auto is slower. auto measures in a fresh cache folder (``--cache``, default
a temporary one), so the run shows what a new machine gets.

A row over the target is timed again with ``--confirm`` rounds (default 11), same cache (so the same
choice), fresh modules: on a shared 2-core machine, rnnkit pinned to torch's own op scatters by 5-10%
around torch.nn over 5 rounds (the ``torch/nn`` column of ``--both``), as much as the target. The
last line gives both the first pass's worst row and the worst after confirming.

The grid: every (cell, batch, hidden, mode) with one (length, layers, directions) per row, rotated so
that each length, depth and direction appears with every batch and hidden size across the cells and
modes (the full product, 384 rows with calls of minutes at batch 128 / hidden 1024 / length 500 /
2 bidirectional layers, does not fit a run). ``--full`` runs the product up to ``--max-gmac``.

    PYTHONPATH=$PWD python benchmarks/auto_grid.py                    # the grid, about 5-10 min idle
    PYTHONPATH=$PWD python benchmarks/auto_grid.py --json out.json --threads 2
    PYTHONPATH=$PWD python benchmarks/auto_grid.py --both --confirm 11  # pinned columns; rows over re-timed
    PYTHONPATH=$PWD python benchmarks/auto_grid.py --quick             # tiny sizes: a smoke run (tests)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

CELLS = ("lstm", "gru")
BATCHES = (1, 8, 32, 128)
HIDDENS = (64, 256, 1024)
LENGTHS = (50, 500)
LAYERS = (1, 2)
DIRECTIONS = (1, 2)
MODES = ("train", "infer")
SHAPES = list(itertools.product(LENGTHS, LAYERS, DIRECTIONS))  # (length, layers, directions): 8
TARGET = 1.05


def gmac(cell: str, batch: int, hidden: int, length: int, layers: int, dirs: int, mode: str) -> float:
    """Multiply-adds of one call, in billions (input size = hidden size)."""
    gates = {"lstm": 4, "gru": 3}[cell] * hidden
    per_layer = length * batch * gates * 2 * hidden * dirs  # projection + recurrent product
    extra = (layers - 1) * length * batch * gates * (dirs * hidden) * dirs  # wider input of layer 2+
    return (per_layer * layers + extra) * (3 if mode == "train" else 1) / 1e9


def grid(full: bool = False, max_gmac: float = 40.0) -> List[dict]:
    """The rows: see the module docstring. A row over ``max_gmac`` billion multiply-adds per call runs at
    length 50, then with one layer, then in one direction, until it fits (or is the smallest)."""
    rows = []
    k = 0
    for cell, batch, hidden, mode in itertools.product(CELLS, BATCHES, HIDDENS, MODES):
        shapes = SHAPES if full else [SHAPES[k % len(SHAPES)]]
        k += 1 if full else 3  # a stride coprime with 8 spreads the shapes over the sizes and cells
        for length, layers, dirs in shapes:
            row = dict(cell=cell, batch=batch, hidden=hidden, length=length, layers=layers, dirs=dirs, mode=mode)
            for key, small in (("length", min(LENGTHS)), ("layers", 1), ("dirs", 1)):
                if gmac(**row) > max_gmac:  # too long a call: shorter, then shallower, then one direction
                    row[key] = small
            rows.append(row)
    return rows


def quick_grid() -> List[dict]:
    return [dict(cell=c, batch=b, hidden=h, length=6, layers=l, dirs=d, mode=m)
            for c, b, h, l, d, m in [("lstm", 1, 8, 1, 1, "train"), ("gru", 3, 16, 2, 2, "infer"),
                                      ("lstm", 4, 8, 2, 1, "infer"), ("gru", 2, 8, 1, 2, "train")]]


def _name(r: dict) -> str:
    return (f"{r['cell']} {r['mode']} N{r['batch']} H{r['hidden']} L{r['length']} layers {r['layers']} "
            f"dirs {r['dirs']}")


def run_row(row: dict, repeats: int, seed: int = 0, both: bool = False, target_s: float = 0.0) -> dict:
    import rnnkit
    from rnnkit.bench import time_row, _time_calls
    torch.manual_seed(seed)
    cls_nn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[row["cell"]]
    cls_rk = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU}[row["cell"]]
    h = row["hidden"]
    kw = dict(num_layers=row["layers"], bidirectional=row["dirs"] == 2)
    ref = cls_nn(h, h, **kw)
    auto = cls_rk(h, h, backend="auto", **kw)
    auto.load_state_dict(ref.state_dict())
    x = torch.randn(row["length"], row["batch"], h)
    train = row["mode"] == "train"
    xg = x.clone().requires_grad_(train)

    def call(module):
        if train:
            def fn():
                module.zero_grad(set_to_none=True)
                xg.grad = None
                out, _ = module(xg)
                out.sum().backward()
        else:
            def fn():
                with torch.no_grad():
                    module(x)
        return fn

    fns = {"auto": call(auto), "torch.nn": call(ref)}
    first = _time_calls(fns["auto"], 1)  # auto's first call: its class is measured here
    if both:  # the diagnosis: each of auto's candidates pinned, timed in the same rounds
        from rnnkit.backends import why_not
        for name in ("fused", "torch"):
            if why_not(name, auto, x) is not None:  # not here (no compiler): no column
                continue
            pinned = cls_rk(h, h, backend=name, **kw)
            pinned.load_state_dict(ref.state_dict())
            fns[name] = call(pinned)
    # the check: auto computes torch.nn's function (outputs, and the input gradient in training)
    with torch.set_grad_enabled(train):
        a, b = xg.clone().detach().requires_grad_(train), xg.clone().detach().requires_grad_(train)
        out_a, out_b = auto(a)[0], ref(b)[0]
        err = (out_a - out_b).abs().max().item()
        if train:
            out_a.sum().backward(), out_b.sum().backward()
            err = max(err, (a.grad - b.grad).abs().max().item())
    if not err < 1e-3:
        raise AssertionError(f"auto differs from torch.nn by {err:g} on {row}")
    from rnnkit.fused import _build, _ops
    mins, medians = time_row(fns, repeats, target_s)  # a sample: back-to-back calls of about target_s
    pinned = {f"{name}_ms": medians[name] * 1e3 for name in ("fused", "torch") if name in medians}
    serial = _build.load() is None and _ops.load_policy()["serial"]  # the under-load policy, after the rounds
    return {**row, **pinned, "serial": serial, "gmac": gmac(**row), "picked": auto.last_backend, "first_ms": first * 1e3,
            "auto_ms": medians["auto"] * 1e3, "nn_ms": medians["torch.nn"] * 1e3,
            "auto_min_ms": mins["auto"] * 1e3, "nn_min_ms": mins["torch.nn"] * 1e3,
            "ratio": medians["auto"] / medians["torch.nn"], "ratio_min": mins["auto"] / mins["torch.nn"],
            "max_abs_err": err}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per row (median; default 5)")
    p.add_argument("--sample-s", type=float, default=0.1,
                   help="seconds per sample: a call shorter than this is repeated back to back and the mean taken "
                        "(default 0.1; single calls of a few ms scatter by 10-30%% on a shared machine)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--full", action="store_true", help="every (length, layers, directions) of each size")
    p.add_argument("--max-gmac", type=float, default=40.0,
                   help="rows over this many billion multiply-adds per call run at length 50, then with one layer, "
                        "then in one direction (default 40)")
    p.add_argument("--cache", help="auto's cache folder (default: a fresh temporary folder)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--confirm", type=int, default=11,
                   help="rows over the target are timed again with this many rounds (default 11; 0: not)")
    p.add_argument("--both", action="store_true",
                   help="also time rnnkit pinned to backend='fused' and to backend='torch' in the same rounds "
                        "(columns fused/nn and torch/nn: was auto's pick the faster one, what rnnkit's own "
                        "wrapper of torch's op costs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = args.cache or tempfile.mkdtemp(prefix="rnnkit-auto-grid-")
    os.environ["RNNKIT_CACHE_DIR"] = cache
    os.environ["RNNKIT_AUTO_MEASURE"] = "1"
    from rnnkit.backends import BACKENDS
    from rnnkit.bench import cpu_name
    reason = BACKENDS["fused"].unavailable()  # builds the extension now, not inside a row's first call
    if reason is not None:
        print(f"note: the fused backend is unavailable ({reason}): auto runs torch", flush=True)
    rows = quick_grid() if args.quick else grid(args.full, args.max_gmac)
    start = time.perf_counter()
    load0 = os.getloadavg()[0]
    print(f"auto vs torch.nn: {len(rows)} rows, {args.threads} threads, {cpu_name()}, torch {torch.__version__}, "
          f"load {load0:.2f}; auto's cache {cache}", flush=True)
    head = f"{'cell':5} {'mode':5} {'N':>4} {'H':>5} {'L':>4} {'lay':>3} {'dir':>3} {'picked':7} {'first ms':>9} " \
           f"{'auto ms':>9} {'nn ms':>9} {'auto/nn':>8} {'min':>6}"
    print(head, flush=True)
    results = []
    for row in rows:
        r = run_row(row, 2 if args.quick else args.repeats, both=args.both,
                    target_s=0.0 if args.quick else args.sample_s)
        results.append(r)
        flag = "  <-- over 1.05" if r["ratio"] > TARGET else ""
        print(f"{r['cell']:5} {r['mode']:5} {r['batch']:>4} {r['hidden']:>5} {r['length']:>4} {r['layers']:>3} "
              f"{r['dirs']:>3} {r['picked']:7} {r['first_ms']:9.1f} {r['auto_ms']:9.2f} {r['nn_ms']:9.2f} "
              f"{r['ratio']:8.3f} {r['ratio_min']:6.3f}"
              + "".join(f" {name}/nn {r[name + '_ms'] / r['nn_ms']:6.3f}" for name in ("fused", "torch")
                        if name + "_ms" in r) + (" serial" if r["serial"] else "") + flag, flush=True)
    over = [r for r in results if r["ratio"] > TARGET]
    rounds = min(args.confirm, 2) if args.quick else args.confirm
    if over and rounds:
        print(f"timing the {len(over)} rows over {TARGET} again, {rounds} rounds each:", flush=True)
    for r in (over if rounds else []):
        row = {k: r[k] for k in ("cell", "batch", "hidden", "length", "layers", "dirs", "mode")}
        again = run_row(row, rounds, both=args.both, target_s=0.0 if args.quick else args.sample_s)
        r["confirmed"] = {k: again[k] for k in ("picked", "ratio", "ratio_min", "auto_ms", "nn_ms", *(
            f"{name}_ms" for name in ("fused", "torch") if f"{name}_ms" in again))}
        print(f"{r['cell']:5} {r['mode']:5} {r['batch']:>4} {r['hidden']:>5} {r['length']:>4} {r['layers']:>3} "
              f"{r['dirs']:>3} {again['picked']:7} {'':9} {again['auto_ms']:9.2f} {again['nn_ms']:9.2f} "
              f"{again['ratio']:8.3f} {again['ratio_min']:6.3f}"
              + "".join(f" {name}/nn {again[name + '_ms'] / again['nn_ms']:6.3f}" for name in ("fused", "torch")
                        if name + "_ms" in again) + ("  <-- confirmed over" if again["ratio"] > TARGET else ""),
              flush=True)
    seconds = time.perf_counter() - start
    worst = max(results, key=lambda r: r["ratio"])
    load1 = os.getloadavg()[0]
    print(f"worst auto/torch.nn {worst['ratio']:.3f} ({_name(worst)}, picked {worst['picked']}); {len(over)} of "
          f"{len(results)} rows over {TARGET}; median ratio {sorted(r['ratio'] for r in results)[len(results) // 2]:.3f}"
          f"; {seconds:.0f} s; load {load0:.2f} -> {load1:.2f}", flush=True)
    if any("confirmed" in r for r in results):
        def final(r):
            return r["confirmed"]["ratio"] if "confirmed" in r else r["ratio"]
        worst = max(results, key=final)
        still = [r for r in results if final(r) > TARGET]
        print(f"after confirming: worst auto/torch.nn {final(worst):.3f} ({_name(worst)}); {len(still)} of "
              f"{len(results)} rows over {TARGET}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                                   "load_start": load0, "load_end": load1},
                       "seconds": seconds, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
