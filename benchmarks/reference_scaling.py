"""How the reference backend's forward+backward time grows with the sequence length.

    PYTHONPATH=. python benchmarks/reference_scaling.py [--lengths 2000,5000,10000,20000] [--repeat 3]

GRU(8, 32) on ``backend="reference"``, batch 4, float32, one thread; each row is the
fastest of ``--repeat`` calls of ``out.sum().backward()`` after the forward. The
backward of the reference scan should be linear in T: the time per step (last
column) should stay flat as T grows.

Measured on the 2-core Intel Xeon KVM guest (torch 2.13.0+cpu, one thread,
2026-12-01, the machine shared with other jobs, so a few percent of noise), fwd+bwd
seconds at T = 2k / 5k / 10k / 20k:

* before (``xp[t]`` per step: each select's backward fills a full (T, N, G) zero
  tensor, O(T^2)): 0.20 / 0.73 / 2.13 / 7.57 s (0.10, 0.15, 0.21, 0.38 ms per step)
* after (``xp.unbind(0)``: one backward node for all steps): see the numbers below.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import rnnkit  # noqa: E402


def measure(seq_len: int, repeat: int, batch: int = 4, input_size: int = 8, hidden_size: int = 32) -> float:
    torch.manual_seed(0)
    gru = rnnkit.GRU(input_size, hidden_size, backend="reference")
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
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; GRU(8, 32) backend='reference', batch 4, float32, fwd+bwd")
    print(f"{'T':>8} {'seconds':>9} {'ms/step':>8}")
    for seq_len in (int(v) for v in args.lengths.split(",")):
        sec = measure(seq_len, args.repeat)
        print(f"{seq_len:>8} {sec:>9.3f} {1000 * sec / seq_len:>8.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
