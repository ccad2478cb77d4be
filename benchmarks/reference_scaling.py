"""How the reference backend's forward+backward time grows with the sequence length.

    PYTHONPATH=. python benchmarks/reference_scaling.py [--lengths 2000,5000,10000,20000] [--repeat 3]
    PYTHONPATH=. python benchmarks/reference_scaling.py --regularized   # zoneout + recurrent dropout

GRU(8, 32) on ``backend="reference"``, batch 4, float32, one thread; each row is the
fastest of ``--repeat`` calls of ``out.sum().backward()`` after the forward. The
backward of the reference scan should be linear in T: the time per step (last
column) should stay flat as T grows.

Measured 2026-12-01 on the 2-core AMD EPYC KVM guest (torch 2.13.0+cpu, one thread),
while other jobs kept the machine busy (load average 5-8 on 2 cores: the absolute
figures are inflated and noisy, the growth is the point). Seconds for fwd+bwd, one
call each, before and after run back to back at each length:

    T        2,000   5,000   10,000   20,000
    before   2.89    20.5    94.0     not run (an earlier try passed 7.8 min and was stopped)
    after    1.21    2.91    5.42     10.35     (0.60, 0.58, 0.54, 0.52 ms per step)

With ``--regularized`` (2026-12-02, idle, same machine; the zoneout masks of all steps drawn up front, each
step reading its row), fastest of 2-3 calls, three runs: T=4,000 1.78 / 1.91 / 1.56 s (gc off), T=20,000
10.12 / 10.62 / 10.73 s: 5.5-6.9x for 5x the steps, the time per step growing by 12-38% (0.45 -> 0.51 ms)
with the autograd graph's memory, not with an O(T^2) term. Cloning each step's mask row instead gave 2.25 /
10.56 s (4.7x, slower at T=4,000), and the code before the up-front masks 2.35 / 11.18 s (4.8x). Without
regularizers, the same runs: 1.49 / 7.61 s (5.1x).

Before: ``xp[t]`` per step, whose backward (SelectBackward) fills a zero tensor of
``xp``'s full (T, N, G) size at every step, O(T^2) time and memory traffic. After:
``xp.unbind(0)``, one backward node that stacks the T step gradients once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import rnnkit  # noqa: E402


def measure(seq_len: int, repeat: int, batch: int = 4, input_size: int = 8, hidden_size: int = 32,
            regularizers: dict = None) -> float:
    torch.manual_seed(0)
    gru = rnnkit.GRU(input_size, hidden_size, backend="reference", **(regularizers or {}))
    x = torch.randn(seq_len, batch, input_size, requires_grad=True)
    best = float("inf")
    for _ in range(repeat):
        gru.zero_grad(set_to_none=True)
        x.grad = None
        start = time.perf_counter()
        out, _ = gru(x)
        out.sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2000,5000,10000,20000", help="comma-separated sequence lengths")
    parser.add_argument("--repeat", type=int, default=3, help="calls per length; the fastest is reported")
    parser.add_argument("--regularized", action="store_true",
                        help="with zoneout=0.1 and recurrent_dropout=0.25 in training (the runner's per-step masks)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    reg = dict(zoneout=0.1, recurrent_dropout=0.25) if args.regularized else None
    print(f"torch {torch.__version__}, 1 thread; GRU(8, 32) backend='reference', batch 4, float32, fwd+bwd"
          + (f", {reg}" if reg else ""))
    print(f"{'T':>8} {'seconds':>9} {'ms/step':>8}")
    for seq_len in (int(v) for v in args.lengths.split(",")):
        sec = measure(seq_len, args.repeat, regularizers=reg)
        print(f"{seq_len:>8} {sec:>9.3f} {1000 * sec / seq_len:>8.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
