"""No-grad LSTM and GRU layers on the fused backend: ``lstm_infer`` / ``gru_infer`` (nothing saved, the input
projected inside the op, in chunks of steps above 32 MB) against the path they replaced (the whole-sequence
projection, then ``lstm_fwd`` / ``gru_fwd``, which save the gates of every step) and torch.nn, side by side in one process, plus the projection alone into a
fresh tensor and into a reused one (the cost of a fresh buffer's page faults).

    python benchmarks/infer_ops.py [--threads 2] [--reps 9]

Prints ms (median of the interleaved repeats) and each time / torch.nn's (< 1: faster than torch.nn).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import rnnkit  # noqa: E402
from rnnkit.fused import backend as fb  # noqa: E402

ROWS = [("lstm", 32, 256, 500, 1, True), ("lstm", 1, 1024, 500, 2, True), ("lstm", 128, 64, 50, 1, True),
        ("lstm", 8, 256, 50, 2, True), ("lstm", 1, 64, 50, 2, True), ("lstm", 32, 256, 500, 1, False),
        ("lstm", 128, 256, 200, 1, True), ("gru", 32, 256, 500, 1, True), ("gru", 8, 256, 50, 2, True),
        ("gru", 128, 256, 200, 1, True)]  # (cell, N, H, L, layers, bidirectional)


def timed(fns, reps):
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RNNKIT_AUTO_MEASURE", "0")
    real = fb._inference
    print(f"{args.threads} threads, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    print(f"cell {'N':>4} {'H':>5} {'L':>4} lay dir {'torch.nn':>9} {'infer':>9} {'before':>9}  infer/nn before/nn")
    with torch.no_grad():
        for cell, N, H, L, layers, bidir in ROWS:
            torch.manual_seed(0)
            theirs = getattr(nn, cell.upper())(H, H, layers, bidirectional=bidir)
            ours = getattr(rnnkit, cell.upper())(H, H, layers, bidirectional=bidir, backend="fused")
            ours.load_state_dict(theirs.state_dict())
            x = torch.randn(L, N, H)
            torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=1e-4, atol=1e-5)

            def before():
                fb._inference = lambda *a: False
                try:
                    ours(x)
                finally:
                    fb._inference = real
            t = timed({"nn": lambda: theirs(x), "infer": lambda: ours(x), "before": before}, args.reps)
            print(f"{cell:4s} {N:4d} {H:5d} {L:4d} {layers:3d} {2 if bidir else 1:3d} {t['nn']:9.2f} {t['infer']:9.2f} "
                  f"{t['before']:9.2f}  {t['infer'] / t['nn']:8.2f} {t['before'] / t['nn']:9.2f}", flush=True)
        N, H, L = 32, 256, 500
        x2, w, b = torch.randn(L * N, H), torch.randn(4 * H, H), torch.randn(4 * H)
        out = torch.empty(L * N, 4 * H)
        t = timed({"fresh": lambda: torch.addmm(b, x2, w.t()), "reused": lambda: torch.addmm(b, x2, w.t(), out=out)},
                  args.reps)
        print(f"projection ({L * N}, {4 * H}) = x W^T + b: into a fresh tensor {t['fresh']:.1f} ms, "
              f"into a reused one {t['reused']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
