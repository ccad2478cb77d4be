"""Does the under-load policy (csrc/common.h, "under load") stay parallel on an idle machine?

    PYTHONPATH=$PWD python benchmarks/policy_idle.py [--batch 32] [--hidden 1024] [--steps 50] [--calls 30]

Times an LSTM forward+backward on the fused backend and on torch.nn, interleaved, ``--calls`` times
each, with 2 torch threads, and reads the policy's state (``rnnkit.fused._ops.load_policy()``) after
every fused call: each call that ran serial (or whose sample saw other runnable threads) is printed.
On an idle machine no call should run serial: a serial call of this size takes about twice a
parallel one. Run it on a quiet machine; its figures are the fused / torch.nn ratio of medians and
of minimums.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rnnkit
from rnnkit.fused import _ops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fused = rnnkit.LSTM(args.hidden, args.hidden, backend="fused")
    ref = torch.nn.LSTM(args.hidden, args.hidden)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(args.steps, args.batch, args.hidden, requires_grad=True)

    def call(module):
        module.zero_grad(set_to_none=True)
        out, _ = module(x)
        out.sum().backward()

    call(fused), call(ref)
    times = {"fused": [], "torch.nn": []}
    serial = 0
    for i in range(args.calls):
        for name, module in (("fused", fused), ("torch.nn", ref)):
            start = time.perf_counter()
            call(module)
            times[name].append(time.perf_counter() - start)
            if name == "fused":
                state = _ops.load_policy()
                serial += state["serial"]
                if state["serial"] or state["waited"] or state["last"] > 0:
                    print(f"call {i}: {times[name][-1] * 1e3:.0f} ms, policy {state}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print(f"LSTM N{args.batch} H{args.hidden} T{args.steps} fwd+bwd, {args.threads} threads, {args.calls} calls each: "
          f"fused {med['fused'] * 1e3:.0f} ms, torch.nn {med['torch.nn'] * 1e3:.0f} ms (medians); "
          f"fused/torch.nn {med['fused'] / med['torch.nn']:.3f} (median), {low['fused'] / low['torch.nn']:.3f} (min); "
          f"{serial} of {args.calls} fused calls ran serial")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
