"""rnnkit against torch.nn under CPU autocast (bfloat16): forward+backward time, side by side.

    PYTHONPATH=. python benchmarks/autocast_cpu.py [--repeats 7] [--threads 1]

Under ``torch.autocast("cpu", torch.bfloat16)`` rnnkit runs each layer as torch.nn does
(``rnnkit/_autocast.py``): RNN and the LSTM on oneDNN in bfloat16 (rnnkit's fused bfloat16 kernels
where ``auto`` picks them), GRU and an LSTM with ``proj_size`` with autocast left on (torch's op, the
one torch.nn runs, so about torch.nn's time). Each repeat times both once, interleaved; the median
of the repeats. Batch 16, input 64, hidden 128, 100 steps, ``out.float().sum().backward()``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import rnnkit  # noqa: E402

CASES = [("RNN", {}), ("GRU", {}), ("LSTM", {}), ("LSTM", dict(proj_size=32))]


def _step(module, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)[0]
    out.float().sum().backward()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3, help="calls per timing")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU autocast bfloat16, "
          f"batch 16, 64 -> 128, 100 steps, forward+backward; median of {args.repeats}")
    print(f"{'layer':>18} {'rnnkit ms':>10} {'torch.nn ms':>12} {'ratio':>6}  backend")
    for kind, kwargs in CASES:
        torch.manual_seed(0)
        ours = getattr(rnnkit, kind)(64, 128, **kwargs)
        theirs = getattr(torch.nn, kind)(64, 128, **kwargs)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(100, 16, 64, requires_grad=True)
        for m in (ours, theirs):  # warm up (and auto's first choice)
            _step(m, x)
        times = {"rnnkit": [], "torch.nn": []}
        for _ in range(args.repeats):
            for name, m in (("rnnkit", ours), ("torch.nn", theirs)):
                start = time.perf_counter()
                for _ in range(args.calls):
                    _step(m, x)
                times[name].append((time.perf_counter() - start) / args.calls)
        a, b = (sorted(times[k])[len(times[k]) // 2] for k in ("rnnkit", "torch.nn"))
        label = kind + (f"(proj {kwargs['proj_size']})" if kwargs else "")
        print(f"{label:>18} {a * 1e3:10.2f} {b * 1e3:12.2f} {a / b:6.2f}  {ours.last_backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
