"""The fused ops' per-step recurrent product alone: the panel GEMM vs MKL's packed GEMM (the BLAS path:
the few-rows kernel below 4 rows) vs torch.mm, as a step loop runs it (the weight laid out once per
call, then `steps` products; the layout is included, amortized over the steps).

    python benchmarks/recurrent_gemm.py [--threads 1 2] [--rows 1 4 8 ...] [--hidden 64 ...] [--reps 5]
    python benchmarks/recurrent_gemm.py --layers [--batch 1 8 32 128] [--hidden 64 256 512 1024] [--reps 5]

Shapes: LSTM (cols, k) = (4H, H) and GRU (3H, H), forward (trans: h W_hh^T) and backward (no trans:
dG W_hh, (cols, k) = (H, 4H) / (H, 3H)). Prints microseconds per product (median of the repeats,
interleaved: every variant once per repeat; --stat min for a loaded machine) and blas/panel (> 1: the panel GEMM is faster). The
under-load policy is forced to 'parallel' so that 2 threads mean 2 threads; the load average is printed.

--layers: whole layers end to end, T=100, 2 threads (the first --threads), side by side in one process:
torch.nn vs the fused backend with the BLAS product ("before": recurrent_kernel('blas')) and with the
rule ("after"), no_grad forward (inf) and forward+backward (trn); ms (median of the interleaved
repeats) and the ratios fused/torch.nn (< 1: fused faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import rnnkit  # noqa: F401,E402
from rnnkit.fused import _build, _ops  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--cells", nargs="+", default=["lstm", "gru"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stat", default="median", choices=["median", "min"])
    ap.add_argument("--no-mm", action="store_true", help="skip torch.mm")
    ap.add_argument("--layers", action="store_true", help="whole layers vs torch.nn instead of the product")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    reason = _build.load()
    if reason:
        raise SystemExit(f"fused kernels unavailable: {reason}")
    _ops.load_policy("parallel")
    dt = getattr(torch, args.dtype)
    print(f"load average {os.getloadavg()}, torch {torch.__version__}, {args.dtype}", flush=True)
    if args.layers:
        layers(args, dt)
    else:
        product(args, dt)
    _ops.load_policy("env")
    _ops.recurrent_kernel("rule")
    print(f"load average {os.getloadavg()}", flush=True)


def layers(args, dt) -> None:
    stat = statistics.median if args.stat == "median" else min
    torch.set_num_threads(args.threads[0])
    print(f"threads {args.threads[0]}, T={args.steps}; ms, {args.stat} of {args.reps}; ratios fused/torch.nn", flush=True)
    print(f"{'cell':>4} {'N':>4} {'H':>5} {'mode':>4} {'nn_ms':>8} {'blas_ms':>8} {'rule_ms':>8} "
          f"{'blas/nn':>7} {'rule/nn':>7} {'rule/blas':>9}", flush=True)
    for cell in [c.upper() for c in args.cells]:
        for H in args.hidden:
            for N in args.batch:
                torch.manual_seed(0)
                nn = getattr(torch.nn, cell)(H, H, dtype=dt)
                fused = getattr(rnnkit, cell)(H, H, backend="fused", dtype=dt)
                fused.load_state_dict(nn.state_dict())
                x = torch.randn(args.steps, N, H, dtype=dt)
                xg = x.clone().requires_grad_()

                def inf(m):
                    with torch.no_grad():
                        m(x)

                def trn(m):
                    m(xg)[0].sum().backward()

                def kernel(mode, f):
                    def run():
                        _ops.recurrent_kernel(mode)
                        f(fused)
                    return run
                for name, f in (("inf", inf), ("trn", trn)):
                    variants = {"nn": lambda: f(nn), "blas": kernel("blas", f), "rule": kernel("rule", f)}
                    ts = {v: [] for v in variants}
                    for g in variants.values():
                        g()
                    for _ in range(args.reps):
                        for v, g in variants.items():
                            s = time.perf_counter()
                            g()
                            ts[v].append((time.perf_counter() - s) * 1e3)
                    m = {v: stat(t) for v, t in ts.items()}
                    print(f"{cell:>4} {N:>4} {H:>5} {name:>4} {m['nn']:>8.2f} {m['blas']:>8.2f} {m['rule']:>8.2f} "
                          f"{m['blas'] / m['nn']:>7.2f} {m['rule'] / m['nn']:>7.2f} {m['rule'] / m['blas']:>9.2f}",
                          flush=True)


def product(args, dt) -> None:
    stat = statistics.median if args.stat == "median" else min
    print(f"{'thr':>3} {'cell':>4} {'dir':>3} {'rows':>4} {'H':>5} {'cols':>5} {'k':>5} {'steps':>5} "
          f"{'blas_us':>9} {'panel_us':>9} {'mm_us':>9} {'blas/panel':>10} {'mm/panel':>8}", flush=True)
    for nt in args.threads:
        torch.set_num_threads(nt)
        for cell in args.cells:
            gates = {"lstm": 4, "gru": 3}[cell]
            for H in args.hidden:
                for trans in (True, False):
                    cols, k = (gates * H, H) if trans else (H, gates * H)
                    w = torch.randn(cols, k, dtype=dt) * 0.05 if trans else torch.randn(k, cols, dtype=dt) * 0.05
                    wt = w.t() if trans else w
                    for rows in args.rows:
                        a = torch.randn(rows, k, dtype=dt)
                        c = torch.empty(rows, cols, dtype=dt)
                        steps = int(min(100, max(10, 2e8 / (rows * cols * k))))

                        def run_mm():
                            for _ in range(steps):
                                torch.mm(a, wt, out=c)
                        variants = {"blas": lambda: _ops.recurrent_mm(a, w, c, trans, 0.0, 1, steps),
                                    "panel": lambda: _ops.recurrent_mm(a, w, c, trans, 0.0, 2, steps)}
                        if not args.no_mm:
                            variants["mm"] = run_mm
                        ts = {name: [] for name in variants}
                        for f in variants.values():
                            f()
                        for _ in range(args.reps):
                            for name, f in variants.items():
                                s = time.perf_counter()
                                f()
                                ts[name].append((time.perf_counter() - s) / steps * 1e6)
                        m = {name: stat(v) for name, v in ts.items()}
                        mm = m.get("mm", float("nan"))
                        print(f"{nt:>3} {cell:>4} {'fwd' if trans else 'bwd':>3} {rows:>4} {H:>5} {cols:>5} {k:>5} "
                              f"{steps:>5} {m['blas']:>9.1f} {m['panel']:>9.1f} {mm:>9.1f} "
                              f"{m['blas'] / m['panel']:>10.2f} {mm / m['panel']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
