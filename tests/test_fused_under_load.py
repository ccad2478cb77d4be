"""The fused kernels under load (csrc/common.h, "under load"): every op call decides once, at its
start, whether the machine is oversubscribed (the runnable threads of other processes plus torch's
threads exceed the cores), and then runs the whole call on the calling thread.

* the decision logic, on faked samples (the ``load_policy`` hook): others + team against the
  cores, torch's thread count, the cores this process may use, the two forced modes, the
  environment variable ``RNNKIT_FUSED_UNDER_LOAD`` and its error;
* the real sampler: with more busy processes than cores it decides serial;
* results: whole layers (RNN, LSTM, LSTM with projection, GRU, peephole, LayerNorm LSTM; float32
  or float64) at a size above the threading thresholds (per-step GEMMs of 1 Mi multiply-adds, the
  LSTM row split, an 8 Mi multiply-add projection), forced serial and forced parallel: outputs and
  gradients agree with each other and with the reference backend (the oracle).
That a serial call opens no parallel region is counted in tests/test_fused_threads.py (LD_PRELOAD).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import rnnkit
from rnnkit.backends import BACKENDS

REASON = BACKENDS["fused"].unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")


@pytest.fixture
def policy():
    from rnnkit.fused import _ops
    threads = torch.get_num_threads()
    yield _ops
    torch.set_num_threads(threads)
    _ops.load_policy("env")


@pytest.mark.parametrize("others, cpus, threads, serial", [
    (0, 2, 2, False),    # idle 2-core machine: keep both threads
    (3, 2, 2, True),     # 3 busy processes on 2 cores (issue 13's case)
    (1, 2, 2, True),     # one busy neighbour: a team of 2 would share a core with it
    (0.4, 2, 2, False),  # a smoothed transient: below the margin (0.5)
    (3, 8, 2, False),    # 8 cores: room for the team
    (7, 8, 2, True),
    (3, 2, 1, False),    # torch on one thread: nothing to decide
    (0, 1, 2, True),     # more torch threads than usable cores: oversubscribed by itself
])
def test_decision_on_faked_samples(policy, others, cpus, threads, serial):
    torch.set_num_threads(threads)
    policy.load_policy("auto", fake_others=others, fake_cpus=cpus)
    assert policy.oversubscribed() is serial
    state = policy.load_policy()
    assert state["mode"] == "auto" and state["serial"] is serial
    if threads > 1:  # (on one thread there is nothing to decide, and nothing is sampled)
        assert state["others"] == pytest.approx(others) and state["online"] == cpus and state["usable"] == cpus


def test_others_are_the_least_of_the_last_three_samples(policy):
    """Threads runnable only now and then (kernel threads during a large call, a sample racing this
    process's own threads) never turn calls serial, and a burst of them does not keep them serial:
    the count that decides is the least of the last 3 samples, so a busy neighbour (runnable in every
    sample) turns calls serial from its third sample, and one idle sample turns them back."""
    torch.set_num_threads(2)
    policy.load_policy("auto", fake_others=0, fake_cpus=2)

    def sample(others):
        policy.load_policy(fake_others=others)  # the next op call samples this, the window is kept
        serial = policy.oversubscribed()
        state = policy.load_policy()
        assert state["last"] == others and state["serial"] is serial
        return serial, state["others"]

    assert sample(0) == (False, 0)
    # sporadic threads (the pattern that held an exponential average at 0.25-0.3): never serial
    assert [sample(v)[0] for v in (1, 0, 1, 1, 0, 2, 0, 1)] == [False] * 8
    assert sample(0) == (False, 0)
    # a neighbour runnable in every sample: serial from the third
    assert [sample(1) for _ in range(3)] == [(False, 0), (False, 0), (True, 1)]
    assert sample(3) == (True, 1)
    assert sample(0) == (False, 0)  # it stopped: parallel at once


def test_sampled_at_most_every_half_second(policy):
    torch.set_num_threads(2)
    first = policy.load_policy("auto", fake_others=0, fake_cpus=2)["samples"]
    for _ in range(50):
        policy.oversubscribed()
    assert policy.load_policy()["samples"] - first == 1  # one sample for 50 calls (well within 0.5 s)


@pytest.mark.parametrize("mode, others, serial", [("serial", 0, True), ("parallel", 5, False)])
def test_forced_modes(policy, mode, others, serial):
    torch.set_num_threads(2)
    policy.load_policy(mode, fake_others=others, fake_cpus=2)
    assert policy.oversubscribed() is serial


@pytest.mark.parametrize("value, mode", [("serial", "serial"), ("1", "serial"), ("parallel", "parallel"),
                                         ("0", "parallel"), ("auto", "auto"), ("", "auto")])
def test_environment_variable(policy, monkeypatch, value, mode):
    monkeypatch.setenv("RNNKIT_FUSED_UNDER_LOAD", value)
    policy.load_policy("env")
    policy.oversubscribed()  # the first call reads it
    assert policy.load_policy()["mode"] == mode


def test_environment_variable_invalid(policy, monkeypatch):
    monkeypatch.setenv("RNNKIT_FUSED_UNDER_LOAD", "sometimes")
    policy.load_policy("env")
    layer = rnnkit.LSTM(4, 4, backend="fused")
    with pytest.raises(ValueError, match=r"RNNKIT_FUSED_UNDER_LOAD='sometimes': expected 'auto'.*'serial'.*'parallel'"):
        layer(torch.randn(3, 2, 4))
    monkeypatch.delenv("RNNKIT_FUSED_UNDER_LOAD")
    policy.load_policy("env")
    layer(torch.randn(3, 2, 4))  # read again: fine


def test_load_policy_invalid_mode(policy):
    with pytest.raises(ValueError, match=r"load_policy: mode='sometimes', expected .*'auto', 'serial' or 'parallel'"):
        policy.load_policy("sometimes")


SPIN = "import time\nend = time.monotonic() + 20\nwhile time.monotonic() < end: pass\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="samples /proc")
@pytest.mark.skipif((os.cpu_count() or 1) > 8, reason="needs more busy processes than cores")
def test_real_sample_sees_busy_processes(policy):
    torch.set_num_threads(2)
    k = (os.cpu_count() or 1) + 1
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(k)]
    try:
        time.sleep(0.3)
        policy.load_policy("auto")
        serial = policy.oversubscribed()
        state = policy.load_policy()
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
    assert state["online"] == os.cpu_count() and state["usable"] == len(os.sched_getaffinity(0))
    assert state["others"] >= k - 0.5, state  # every spinning process is runnable
    assert serial, state


# (batch, hidden, steps, projection size): per-step GEMMs of 1 Mi multiply-adds, the LSTM's row split
# on, the input projection above 2^22 multiply-adds (ATen's threaded addmm when not serial)
N, H, L = 16, 128, 3
LAYERS = {
    "rnn": lambda: rnnkit.RNN(H, H),
    "lstm": lambda: rnnkit.LSTM(H, H),
    "lstm_proj": lambda: rnnkit.LSTM(H, H, proj_size=64),
    "gru": lambda: rnnkit.GRU(H, H),
    "peephole": lambda: rnnkit.PeepholeLSTM(H, H),
    "ln_lstm": lambda: rnnkit.LayerNormLSTM(H, H),
}


def _run(layer, x, backend):
    layer.backend = backend
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    out, _ = layer(xi)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    assert layer.last_backend == backend
    return [out.detach(), xi.grad] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("name, dtype", [("lstm", torch.float32), ("lstm", torch.float64), ("gru", torch.float32),
                                         ("rnn", torch.float64), ("lstm_proj", torch.float32),
                                         ("peephole", torch.float64), ("ln_lstm", torch.float32)])
def test_serial_and_parallel_results_agree(policy, name, dtype):
    torch.manual_seed(0)
    layer = LAYERS[name]().to(dtype)
    x = torch.randn(L, N, H, dtype=dtype)
    torch.set_num_threads(1)  # the oracle on one thread (its per-step ATen GEMMs crawl on a loaded machine)
    ref = _run(layer, x, "reference")
    torch.set_num_threads(2)
    policy.load_policy("serial")
    serial = _run(layer, x, "fused")
    policy.load_policy("parallel")
    parallel = _run(layer, x, "fused")
    # float32 against the oracle: sums over 48 rows of (L, N) in another order (weight gradients)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    close = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for i, (r, s, p) in enumerate(zip(ref, serial, parallel)):
        torch.testing.assert_close(s, r, **tol, msg=lambda m: f"serial vs reference, tensor {i}: {m}")
        torch.testing.assert_close(p, r, **tol, msg=lambda m: f"parallel vs reference, tensor {i}: {m}")
        torch.testing.assert_close(s, p, **close, msg=lambda m: f"serial vs parallel, tensor {i}: {m}")


def test_benchmark_policies_columns_and_errors(capsys):
    """benchmarks/under_load.py --policies: one column pair per extra policy, the decision per phase,
    and an unknown policy refused by name (no timing: a made-up result)."""
    from rnnkit.fused import under_load
    row = {"fused_ms": 2.0, "torch_ms": 4.0, "parallel_ms": 8.0}
    result = {"threads": 2, "busy": 3, "samples": 5, "cpus": 2, "policies": ["auto", "parallel"],
              "rows": {"lstm_m": {"idle": row, "loaded": row}}, "loadavg_idle": (1.0, 1.0),
              "loadavg_loaded": (4.0, 4.0), "serial_idle": False, "serial_loaded": True}
    table = under_load.format_table(result)
    assert "| idle fused[parallel] ms | idle ratio[parallel] |" in table
    assert "| LSTM N=16 H=128 T=100 | 2.000 | 4.000 | 2.00 | 8.000 | 0.50 |" in table
    assert "ran fused on one thread at the end of each phase: idle no, loaded yes" in table
    with pytest.raises(SystemExit) as e:
        under_load.main(["--policies", "auto,sometimes"])
    assert e.value.code == 2
    assert "--policies: unknown ['sometimes']; known: auto, parallel, serial" in capsys.readouterr().err
