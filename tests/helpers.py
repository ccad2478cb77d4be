"""Shared test helpers: tolerances, loss weights, gradient collection."""

from __future__ import annotations

import torch

import rnnkit
from rnnkit.backends import BACKENDS

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def runnable_backends():
    """Every registered backend that can run on this machine, plus 'auto'."""
    return [name for name, b in BACKENDS.items() if b.unavailable() is None] + ["auto"]


def weighted_sum(tensors, seed=123):
    """A scalar that depends on every element with a distinct random weight, so
    gradients of every output element are checked (not just their sum)."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for t in tensors:
        w = torch.randn(t.shape, generator=g, dtype=t.dtype)
        total = total + (t * w.to(t.device)).sum()
    return total


def flatten_states(h):
    return list(h) if isinstance(h, tuple) else [h]


def assert_close(a, b, dtype, what=""):
    tol = TOL[dtype]
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


TORCH_NN = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}
RNNKIT = {"LSTM": rnnkit.LSTM, "GRU": rnnkit.GRU, "RNN": rnnkit.RNN}


def with_torch_nn_twin(kind, *args, backend="auto", dtype=torch.float64, twin_dtype=None, seed=0):
    """``(ours, theirs)``: ``rnnkit.<kind>(*args)`` on ``backend`` and ``torch.nn.<kind>(*args)`` (in
    ``twin_dtype``, default ``dtype``) holding the same weights, made after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    ours = getattr(rnnkit, kind)(*args, dtype=dtype, backend=backend)
    theirs = getattr(torch.nn, kind)(*args, dtype=twin_dtype or dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def assert_compiled_matches_eager(f, x, wrt, dtype):
    """``torch.compile(f, fullgraph=True)`` gives ``f``'s value and the gradients of
    ``x`` and every tensor in ``wrt`` (the same ops, traced through their fake and
    autograd registrations)."""
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(allow_rnn=True):  # rnnkit.LSTM is a torch.nn.LSTM: dynamo asks for this
        return _compiled_matches(f, compiled, x, wrt, dtype)


def _compiled_matches(f, compiled, x, wrt, dtype):
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = f(xe)
    ge = torch.autograd.grad(ye, [xe, *wrt])
    yc = compiled(xc)
    gc = torch.autograd.grad(yc, [xc, *wrt])
    assert_close(yc, ye, dtype, "compiled output")
    for a, b in zip(gc, ge):
        assert_close(a, b, dtype, "compiled grad")


def assert_modules_match(fused, ref, x, dtype):
    """``fused(x)`` and ``ref(x)`` (no initial state, no lengths) agree on the
    output, the final states and the gradients of the input and every parameter,
    and ``fused`` ran on the fused backend."""
    results = []
    for m in (fused, ref):
        xi = x.clone().requires_grad_()
        out, h_n = m(xi)
        states = flatten_states(h_n)
        grads = torch.autograd.grad(weighted_sum([out, *states]), [xi, *m.parameters()])
        results.append((out, states, grads))
    assert fused.last_backend == "fused"
    (o1, s1, g1), (o2, s2, g2) = results
    assert_close(o1, o2, dtype, "output")
    for a, b in zip(s1, s2):
        assert_close(a, b, dtype, "final state")
    for a, b in zip(g1, g2):
        assert_close(a, b, dtype, "grad")


def spy_layer_run(monkeypatch):
    """Replaces the fused extension's direct layer entry (``rnnkit.fused.cells.layer_run``) with a counter of its
    calls and of how many it ran (its result not NotImplemented); returns the counts. Loads the extension first."""
    import rnnkit
    from rnnkit.fused import cells as fc
    with torch.no_grad():
        rnnkit.LSTMCell(2, 3)(torch.randn(1, 2))  # loads the extension and looks the entry up
    real = fc.get_layer_run()
    assert real is not None
    counts = {"calls": 0, "ran": 0}

    def entry(*args):
        counts["calls"] += 1
        out = real(*args)
        counts["ran"] += out is not NotImplemented
        return out

    monkeypatch.setattr(fc, "layer_run", entry)
    return counts


def run_compile_check(script: str, timeout: int):
    """Run a Triton compile-check ``script`` (``python -c``) in a process of its own with the kernels compiled
    (``TRITON_INTERPRET`` unset) and this rnnkit importable; returns the ``CompletedProcess``."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(rnnkit.__file__))),
                                         env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
