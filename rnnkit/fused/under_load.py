"""Forward+backward of the fused backend against torch.nn, on an idle machine and
on the same machine kept busy by K spinning processes, in one run.

    rnnkit bench --contended                                      # the S and M comparisons, K = 3
    PYTHONPATH=$PWD python benchmarks/under_load.py                # every configuration, K = 3
    PYTHONPATH=$PWD python benchmarks/under_load.py --busy 1 --samples 21 --json out.json
    PYTHONPATH=$PWD python benchmarks/under_load.py --configs rnn_s,gru_s --threads 1
    PYTHONPATH=$PWD python benchmarks/under_load.py --policies auto,parallel   # before/after, one run

"Fast must also mean robust": a kernel that opens a multi-threaded parallel
region for a tiny piece of work waits, at every join, for a thread the OS has
descheduled to run someone else's process (a scheduler time slice, milliseconds).
This script measures exactly that situation: first with no busy processes of its
own ("idle"), then with K pure-Python spin loops started by it ("loaded"; each
bounded in time, and killed when the measurement ends, or when this process dies).

In each phase, every configuration times fused and torch.nn alternately: a
sample is the mean of ``inner`` back-to-back forward+backward calls (``inner``
chosen once, at idle, so a sample lasts about ``--sample-ms``), fused and torch.nn
samples interleaved, and the figure is the median of ``--samples`` samples. The
ratio is torch.nn / fused (above 1: fused is faster). The machine is shared, so
compare the ratios more than the absolute times.

``--policies`` times fused under several under-load policies (csrc/common.h, "under load";
``RNNKIT_FUSED_UNDER_LOAD``), interleaved with the rest: ``auto`` (the default: one thread per op
call while the machine is oversubscribed), ``parallel`` (never: threading by work alone, the
behaviour before) and ``serial`` (always); each extra one is a column ``fused[<policy>]``. The
first is the ``fused`` column. Each phase also reports whether ``auto`` ran serial at its end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import rnnkit

# name -> (family, batch, hidden, length); input size = hidden
CONFIGS = {
    "rnn_s": ("RNN", 1, 32, 10),
    "lstm_s": ("LSTM", 1, 64, 100),
    "gru_s": ("GRU", 4, 64, 50),
    "lstm_m": ("LSTM", 16, 128, 100),
    "gru_m": ("GRU", 16, 128, 100),
    "lstm_l": ("LSTM", 64, 256, 100),
}
# what `rnnkit bench --contended` runs: the batch-1 hidden-32 length-10 RNN of issue 13 and the S and M
# sizes of `rnnkit bench` (batch 1 / hidden 64 and batch 16 / hidden 128, T = 100; GRU S at batch 4, T = 50)
CONTENDED = ("rnn_s", "lstm_s", "gru_s", "lstm_m", "gru_m")
TARGET = 0.8  # torch.nn / fused loaded: fused at most 1.25 times torch.nn's time (issue 13's target)
FAMILIES = {"RNN": (rnnkit.RNN, torch.nn.RNN), "GRU": (rnnkit.GRU, torch.nn.GRU), "LSTM": (rnnkit.LSTM, torch.nn.LSTM)}

# A busy process: a pure Python spin loop that stops by itself after `seconds`, or as
# soon as its parent is gone (so an interrupted benchmark leaves nothing spinning).
SPIN = """
import os, sys, time
parent, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    n += 1
    if n % 200000 == 0 and os.getppid() != parent:
        break
"""


def start_busy(k: int, seconds: float) -> list:
    procs = [subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid()), str(seconds)],
                              stdin=subprocess.DEVNULL) for _ in range(k)]
    time.sleep(0.5)  # let them start spinning
    return procs


def stop_busy(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def make(name: str, seed: int = 0):
    family, batch, hidden, length = CONFIGS[name]
    ours_cls, torch_cls = FAMILIES[family]
    torch.manual_seed(seed)
    fused = ours_cls(hidden, hidden, backend="fused")
    ref = torch_cls(hidden, hidden)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(length, batch, hidden)
    return {"fused": fused, "torch.nn": ref}, x


def fwd_bwd(module, x):
    xi = x.clone().requires_grad_()

    def call():
        module.zero_grad(set_to_none=True)
        out, _ = module(xi)
        out.sum().backward()
    return call


def with_policy(fn, policy: str):
    """fn, run under the under-load policy `policy` (set before each sample, see :func:`sample`)."""
    def call():
        fn()
    call.policy = policy
    return call


def sample(fn, inner: int) -> float:
    policy = getattr(fn, "policy", None)
    if policy is not None:  # once per sample: setting it forgets the policy's samples of the machine
        from . import _ops
        _ops.load_policy(policy)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def calibrate(fns: dict, sample_s: float) -> dict:
    for fn in fns.values():  # warm up (first call builds the packed weights, MKL buffers, ...)
        for _ in range(3):
            fn()
    out = {}
    for k, fn in fns.items():
        t = min(sample(fn, 1) for _ in range(5))
        out[k] = max(1, int(sample_s / max(t, 1e-6)))
    return out


def measure(fns: dict, inner: dict, samples: int, budget_s: float) -> dict:
    """Median seconds per call of each fn; samples interleaved across the fns. Stops early
    (after at least 5 rounds) once ``budget_s`` is spent: a loaded round can take seconds."""
    got = {k: [] for k in fns}
    start = time.perf_counter()
    for i in range(samples):
        order = list(fns) if i % 2 == 0 else list(reversed(list(fns)))
        for k in order:
            got[k].append(sample(fns[k], inner[k]))
        if i + 1 >= 5 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in got.items()}


def cpu_snapshot():
    """(wall, busy jiffies and all jiffies of the whole machine, this process's CPU seconds,
    its waited children's CPU seconds); the machine's part is None off Linux."""
    busy = total = None
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        total, busy = sum(v[:8]), sum(v[:8]) - v[3] - v[4]
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return time.perf_counter(), busy, total, t.user + t.system, t.children_user + t.children_system


def cores_used(a, b) -> dict:
    """Cores kept busy between two snapshots: the whole machine, this process, the busy
    processes it started (children), and everything else (other users of the machine)."""
    wall = max(b[0] - a[0], 1e-9)
    own, kids = (b[3] - a[3]) / wall, (b[4] - a[4]) / wall
    out = {"this_process": own, "busy_processes": kids}
    if a[1] is not None and b[1] is not None and b[2] > a[2]:
        machine = (b[1] - a[1]) / (b[2] - a[2]) * (os.cpu_count() or 1)
        out.update(machine=machine, others=max(0.0, machine - own - kids))
    return out


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run(configs, busy: int, samples: int, sample_ms: float, threads: int, max_busy_s: float,
        budget_s: float = 60.0, progress: bool = True, policies=None) -> dict:
    from . import _ops
    torch.set_num_threads(threads)
    setups = {}
    for name in configs:
        mods, x = make(name)
        fns = {k: fwd_bwd(m, x) for k, m in mods.items()}
        fns["fused"]()
        assert mods["fused"].last_backend == "fused", mods["fused"].last_backend
        if policies:
            base = fns.pop("fused")
            fns = {"fused": with_policy(base, policies[0]),
                   **{f"fused[{p}]": with_policy(base, p) for p in policies[1:]}, **fns}
        setups[name] = fns
    inner = {name: calibrate(fns, sample_ms / 1000) for name, fns in setups.items()}
    result = {"threads": threads, "busy": busy, "samples": samples, "cpus": os.cpu_count(), "policies": policies,
              "torch": torch.__version__, "rnnkit": os.path.dirname(rnnkit.__file__), "rows": {}}
    phases = [("idle", 0), ("loaded", busy)]
    for phase, k in phases:
        load_before = loadavg()
        procs = start_busy(k, max_busy_s) if k else []
        snap = cpu_snapshot()
        try:
            for name, fns in setups.items():
                t = measure(fns, inner[name], samples, budget_s)
                result["rows"].setdefault(name, {})[phase] = {
                    "fused_ms": t["fused"] * 1e3, "torch_ms": t["torch.nn"] * 1e3,
                    **{k[6:-1] + "_ms": v * 1e3 for k, v in t.items() if k.startswith("fused[")}}
                if progress:
                    extra = "".join(f"  {k} {v * 1e3:9.3f} ms" for k, v in t.items() if k.startswith("fused["))
                    print(f"  {phase:6s} {name:7s} fused {t['fused'] * 1e3:9.3f} ms  "
                          f"torch.nn {t['torch.nn'] * 1e3:9.3f} ms{extra}", file=sys.stderr, flush=True)
            if policies:
                _ops.load_policy(policies[0])
            serial = _ops.oversubscribed()  # what the policy decides now
            if _ops.load_policy()["mode"] == "auto":
                result[f"serial_{phase}"] = serial
        finally:
            stop_busy(procs)
        result[f"cores_{phase}"] = cores_used(snap, cpu_snapshot())
        result[f"loadavg_{phase}"] = (load_before, loadavg())
    return result


def format_table(result: dict) -> str:
    policies = result.get("policies") or []
    extra = policies[1:]
    head = f"policy {policies[0]}, " if policies else ""
    lines = [f"{head}threads {result['threads']}, busy processes {result['busy']}, {result['cpus']} cpus, "
             f"median of {result['samples']} samples; ratio = torch.nn / fused",
             ""]
    cols = []
    for phase in ("idle", "loaded"):
        cols += [f"{phase} fused ms", f"{phase} torch.nn ms", f"{phase} ratio"]
        for p in extra:
            cols += [f"{phase} fused[{p}] ms", f"{phase} ratio[{p}]"]
    lines += ["| config | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in result["rows"].items():
        family, batch, hidden, length = CONFIGS[name]
        cells = [f"{family} N={batch} H={hidden} T={length}"]
        for phase in ("idle", "loaded"):
            r = row.get(phase)
            if r is None:
                cells += ["-"] * (3 + 2 * len(extra))
                continue
            cells += [f"{r['fused_ms']:.3f}", f"{r['torch_ms']:.3f}", f"{r['torch_ms'] / r['fused_ms']:.2f}"]
            for p in extra:
                cells += [f"{r[p + '_ms']:.3f}", f"{r['torch_ms'] / r[p + '_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    loaded = {name: row["loaded"] for name, row in result["rows"].items() if "loaded" in row}
    if loaded:
        worst = min(loaded, key=lambda n: loaded[n]["torch_ms"] / loaded[n]["fused_ms"])
        ratio = loaded[worst]["torch_ms"] / loaded[worst]["fused_ms"]
        lines.append("")
        lines.append(f"target (loaded ratio >= {TARGET}, fused at most {1 / TARGET:.2f}x torch.nn): "
                     f"{'met' if ratio >= TARGET else 'not met'} (worst: {worst}, {ratio:.2f})")
    lines.append("")
    lines.append("load average (1 min) before/after: idle %.2f/%.2f, loaded %.2f/%.2f"
                 % (*result["loadavg_idle"], *result["loadavg_loaded"]))
    if "serial_idle" in result:
        lines.append("under-load policy auto (RNNKIT_FUSED_UNDER_LOAD) ran fused on one thread at the end of "
                     "each phase: idle %s, loaded %s" % tuple("yes" if result.get(f"serial_{p}") else "no"
                                                               for p in ("idle", "loaded")))
    for phase in ("idle", "loaded"):
        c = result.get(f"cores_{phase}", {})
        if "machine" in c:
            lines.append(f"{phase} phase: cores busy {c['machine']:.2f} (this process {c['this_process']:.2f}, "
                         f"its busy processes {c['busy_processes']:.2f}, other processes {c['others']:.2f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python benchmarks/under_load.py [options]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--busy", type=int, default=3, help="busy processes in the loaded phase (default 3)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--samples", type=int, default=15, help="samples per backend and phase (median)")
    ap.add_argument("--sample-ms", type=float, default=20.0, help="length of one sample at idle, ms")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    ap.add_argument("--max-busy-s", type=float, default=900.0, help="the busy processes stop by themselves after this")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="per configuration and phase: stop sampling after this (at least 5 samples)")
    ap.add_argument("--policies", default="",
                    help="comma-separated under-load policies to time fused under, interleaved (auto, parallel, "
                         "serial); the first is the 'fused' column (default: as the environment sets it)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    bad = [p for p in policies if p not in ("auto", "parallel", "serial")]
    if bad:
        ap.error(f"--policies: unknown {bad}; known: auto, parallel, serial")
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    result = run(configs, args.busy, args.samples, args.sample_ms, args.threads, args.max_busy_s, args.budget_s,
                 policies=policies or None)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
