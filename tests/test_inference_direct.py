"""The layers' direct inference entry (the fused extension's ``layer_run``: the input projection and
the time loop of the inference-only kernel in one C++ call, for a plain no-grad call of a one-layer,
one-direction RNN/LSTM/GRU of any length).

Oracles: torch.nn's layers on the same weights (outputs and final states, float32 1e-5 and float64
1e-10) and, where torch.nn has no equivalent call, rnnkit's reference backend; a spy on the entry
says which path ran. No speed is asserted."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.backends import BACKENDS
from rnnkit.fused import cells as fc
from helpers import assert_close, flatten_states, spy_layer_run

REASON = BACKENDS["fused"].unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")

LAYERS = {  # name -> (rnnkit layer, torch.nn layer, kwargs)
    "lstm": (rnnkit.LSTM, torch.nn.LSTM, {}),
    "gru": (rnnkit.GRU, torch.nn.GRU, {}),
    "rnn_tanh": (rnnkit.RNN, torch.nn.RNN, {}),
    "rnn_relu": (rnnkit.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}
H_IN = 13


def make(name, hidden, dtype=torch.float32, **kw):
    ours_cls, torch_cls, extra = LAYERS[name]
    torch.manual_seed(0)
    theirs = torch_cls(H_IN, hidden, dtype=dtype, **extra, **kw)
    ours = ours_cls(H_IN, hidden, dtype=dtype, **extra, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def state(name, n, hidden, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    s = tuple(torch.randn(1, n, hidden, generator=g, dtype=dtype) for _ in range(2 if name == "lstm" else 1))
    return s if len(s) > 1 else s[0]


def outputs(result):
    out, h = result
    return [out, *flatten_states(h)]


@pytest.fixture
def spy(monkeypatch):
    """Counts the direct layer entry's calls and how many it ran (not NotImplemented)."""
    return spy_layer_run(monkeypatch)


# (N, H, L, batch_first, h0 given, bias): N < 4 (the small GEMV) and N >= 4 (BLAS); H on and off the float32
# (8) and float64 (4) vector widths; L 1 (the cell step), 2 and more (the projection, then the time loop)
CASES = [(1, 8, 5, False, True, True), (3, 17, 4, True, False, False), (4, 7, 3, False, False, True),
         (9, 16, 6, True, True, True), (2, 9, 1, True, True, True), (5, 33, 1, False, False, False),
         (1, 3, 2, False, False, True)]


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,hidden,seq_len,batch_first,given,bias", CASES,
                         ids=[f"N{c[0]}-H{c[1]}-L{c[2]}{'-bf' if c[3] else ''}{'-h0' if c[4] else ''}"
                              f"{'' if c[5] else '-nobias'}" for c in CASES])
def test_direct_layer_matches_torch_nn(spy, name, dtype, n, hidden, seq_len, batch_first, given, bias):
    ours, theirs = make(name, hidden, dtype=dtype, batch_first=batch_first, bias=bias)
    x = torch.randn((n, seq_len, H_IN) if batch_first else (seq_len, n, H_IN), dtype=dtype)
    hx = state(name, n, hidden, dtype=dtype) if given else None
    with torch.no_grad():
        got, want = outputs(ours(x, hx)), outputs(theirs(x, hx))
    assert spy == {"calls": 1, "ran": 1}
    assert ours.last_backend == "fused"
    for u, v in zip(got, want):
        assert u.shape == v.shape and u.dtype == v.dtype
        assert_close(u, v, dtype, f"{name}")
        assert not u.requires_grad
    assert got[0].stride() == want[0].stride()  # batch_first: the transposed view of a time-major output, as torch.nn
    inputs = [x, *(flatten_states(hx) if hx is not None else [])]
    ptrs = [u.data_ptr() for u in got]
    assert len(set(ptrs)) == len(ptrs) and not set(ptrs) & {t.data_ptr() for t in inputs}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("n,hidden,batch_first", [(8, 256, False), (8, 256, True), (6, 200, True), (1, 512, False)])
def test_projection_in_chunks_of_steps(spy, name, n, hidden, batch_first):
    """Over 2^23 elements, the kernel projects the input in chunks of steps (common.h, project_chunk:
    2^18 elements of N G each, at least 256 rows), each chunk just before its steps: lengths over that
    size, crossing many chunk boundaries and ending in a partial chunk, both layouts (batch_first: a
    row's steps are contiguous, projected per row), against torch.nn."""
    per_step = n * {"lstm": 4, "gru": 3}.get(name, 1) * hidden
    chunk = max(2 ** 18 // per_step, -(-256 // n))
    seq_len = (2 ** 23 // per_step // chunk + 1) * chunk + chunk // 2 + 1
    _, theirs = make(name, hidden, batch_first=batch_first)
    ours = LAYERS[name][0](H_IN, hidden, batch_first=batch_first, backend="fused", **LAYERS[name][2])
    ours.load_state_dict(theirs.state_dict())  # backend="fused": auto leaves a long LSTM call to its choice
    x = torch.randn((n, seq_len, H_IN) if batch_first else (seq_len, n, H_IN)) * 0.5
    with torch.no_grad():
        got, want = outputs(ours(x)), outputs(theirs(x))
    assert spy == {"calls": 1, "ran": 1}
    for u, v in zip(got, want):
        assert_close(u, v, torch.float32, f"{name}")


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("n", [1, 3])
def test_small_batch_product_split_over_threads(spy, name, n):
    """A batch of 1-3 with a product over the serial threshold (kSerialStepMacs, 2^17) splits W_hh's rows
    over threads (cell.cpp, layer_infer_raw): it equals torch.nn, and one thread's result bit for bit
    (each output row is computed by one thread either way). Hidden sizes with G * H over 2^17 and G not a
    multiple of the block of 8 rows, H not a multiple of the vector width."""
    hidden = {"lstm": 203, "gru": 211}.get(name, 403)
    ours, theirs = make(name, hidden)
    x = torch.randn(6, n, H_IN)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2):
            torch.set_num_threads(t)
            with torch.no_grad():
                results.append(outputs(ours(x)))
        with torch.no_grad():
            want = outputs(theirs(x))
    finally:
        torch.set_num_threads(threads)
    assert spy == {"calls": 2, "ran": 2}
    for one, two, ref in zip(*results, want):
        assert torch.equal(one, two)
        assert_close(two, ref, torch.float32, name)


def test_inference_mode_and_frozen_parameters(spy):
    """torch.inference_mode, and grad mode on with nothing that needs a gradient, run the direct entry."""
    ours, theirs = make("gru", 10)
    x = torch.randn(6, 2, H_IN)
    with torch.inference_mode():
        got, want = outputs(ours(x)), outputs(theirs(x))
    for p in ours.parameters():
        p.requires_grad_(False)
    got2 = outputs(ours(x))
    assert spy["ran"] == 2
    for u, u2, v in zip(got, got2, want):
        assert_close(u, v, torch.float32, "inference_mode")
        assert_close(u2, v, torch.float32, "frozen")


def test_streaming_equals_one_call(spy):
    """A sequence fed in chunks (state carried) gives the one call's outputs and final state."""
    ours, _ = make("lstm", 12)
    x = torch.randn(9, 3, H_IN)
    with torch.no_grad():
        want_out, want_state = ours(x)
        hx, outs = None, []
        for chunk in (x[:1], x[1:5], x[5:]):
            out, hx = ours(chunk.contiguous(), hx)
            outs.append(out)
    assert spy["ran"] == 4
    assert_close(torch.cat(outs), want_out, torch.float32, "chunked output")
    for u, v in zip(hx, want_state):
        assert_close(u, v, torch.float32, "chunked state")


def test_nonfinite_values_propagate_as_torch_nn():
    ours, theirs = make("lstm", 9)
    x = torch.randn(4, 2, H_IN)
    x[1, 0, 3] = float("nan")
    x[2, 1, 0] = float("inf")
    with torch.no_grad():
        got, want = outputs(ours(x)), outputs(theirs(x))
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5, equal_nan=True)


# ------------------------------------------------------------------ declined: the next path answers, same results

def _reference(module, *args):
    backend = module.backend
    module.backend = "reference"
    try:
        return module(*args)
    finally:
        module.backend = backend


@pytest.mark.parametrize("case", ["grad", "autocast", "trace", "compile", "noncontiguous_input", "noncontiguous_h0",
                                  "unbatched", "list_hx", "tensor_subclass", "backend_torch", "disabled_env"])
def test_declined_calls_equal_torch_nn(spy, monkeypatch, case):
    ours, theirs = make("lstm", 10)
    x = torch.randn(5, 3, H_IN)
    hx = state("lstm", 3, 10)
    if case == "noncontiguous_input":
        x = torch.randn(3, 5, H_IN).transpose(0, 1)
    elif case == "noncontiguous_h0":
        hx = (torch.randn(1, 10, 3).transpose(1, 2), hx[1])
        assert not hx[0].is_contiguous()
    elif case == "unbatched":
        x, hx = x[:, 0], (hx[0][:, 0], hx[1][:, 0])
    elif case == "list_hx":
        hx = list(hx)
    elif case == "tensor_subclass":
        class Sub(torch.Tensor):
            pass
        x = x.as_subclass(Sub)
    elif case == "backend_torch":
        ours.backend = "torch"
    elif case == "disabled_env":
        monkeypatch.setenv("RNNKIT_DISABLE_FUSED", "1")
    grad = case == "grad"
    with torch.set_grad_enabled(grad):
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):  # torch.nn.LSTM's oneDNN op refuses float32 states
                got, want = ours(x, hx), _reference(ours, x, hx)
            for u, v in zip(outputs(got), outputs(want)):
                assert u.dtype == v.dtype == torch.bfloat16
                torch.testing.assert_close(u.float(), v.float(), rtol=0.03, atol=0.03)
            assert spy["ran"] == 0
            return
        if case == "trace":
            traced = torch.jit.trace(ours, (x, hx), check_trace=False)
            got = traced(x, hx)
        elif case == "compile":  # what forward asks (real torch.compile runs: test_fused.py, test_module_behaviour.py)
            from rnnkit.fused import cells as fused_cells
            monkeypatch.setattr(fused_cells, "_compiling", lambda: True)
            got = ours(x, hx)
        else:
            got = ours(x, hx)
        want = theirs(torch.Tensor(x) if case == "tensor_subclass" else x, hx)
    assert spy["ran"] == 0, case
    for u, v in zip(outputs(got), outputs(want)):
        assert_close(u.detach(), v.detach(), torch.float32, case)
    if grad:
        outputs(got)[0].sum().backward()
        assert ours.weight_hh_l0.grad is not None


def test_reason_says_why_not():
    ours, _ = make("gru", 10)
    with torch.no_grad():
        ours(torch.randn(2, 1, H_IN))
    reason = fc.get_layer_run() and fc._build._state["module"].layer_run_reason
    args = (1, torch.randn(4, 2, H_IN), None, ours._parameters, H_IN, 10, False)
    with torch.no_grad():
        assert reason(*args) is None
    assert reason(*args) == "a gradient is needed"
    with torch.no_grad():
        assert reason(1, torch.randn(4, 2, 5), None, ours._parameters, H_IN, 10, False) == \
            "input's last axis is not input_size"
        assert reason(1, torch.randn(0, 2, H_IN), None, ours._parameters, H_IN, 10, False) == "empty sequence"
        assert reason(1, torch.randn(4, 2, H_IN), torch.randn(1, 3, 10), ours._parameters, H_IN, 10, False) == \
            "a state's shape"
        assert reason(1, torch.randn(4, 2, H_IN), None, {}, H_IN, 10, False) == \
            "weight_ih_l0/weight_hh_l0 missing or not Tensors"
        assert reason(1, torch.randn(4, 2, H_IN), None, ours._parameters, H_IN, 10, 1) == "batch_first is not a bool"
        assert reason(*args, 1.0) == "lstm_macs_limit is not an int"
        assert reason(*args, 0, 0).startswith("expected 7 or 8 arguments")


def test_which_backend_names_the_direct_path():
    ours, _ = make("lstm", 10)
    x = torch.randn(4, 2, H_IN)
    with torch.no_grad():
        ours(x)
        assert ours.which_backend(x) == "fused" == ours.last_backend


@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_auto_defers_a_large_lstm_sequence(spy, backend):
    """auto's rule: an LSTM sequence with N * 4H * H >= AUTO_DIRECT_LSTM_MACS goes to select (the measured
    choice, torch or fused; fused is then the direct kernel too); backend='fused' always runs the kernel.
    One step always runs the kernel. Whatever ran, last_backend and which_backend name it."""
    from rnnkit import layers
    hidden = 64
    ours, theirs = make("lstm", hidden, batch_first=True)
    ours.backend = backend
    n = -(-layers.AUTO_DIRECT_LSTM_MACS // (4 * hidden * hidden))  # the smallest batch at the bound
    reason = fc._build._state["module"].layer_run_reason
    with torch.no_grad():  # the entry applies the rule (auto's limit) at the bound, not one below, nor for one step
        for batch, seq_len, limit, declined in [(n, 3, layers.AUTO_DIRECT_LSTM_MACS, True),
                                                (n - 1, 3, layers.AUTO_DIRECT_LSTM_MACS, False),
                                                (n, 1, layers.AUTO_DIRECT_LSTM_MACS, False), (n, 3, 0, False)]:
            got = reason(0, torch.randn(batch, seq_len, H_IN), None, ours._parameters, H_IN, hidden, True, limit)
            assert got == ("auto's rule: an LSTM sequence at or above lstm_macs_limit multiply-adds per step"
                           if declined else None), (batch, seq_len, limit)
    assert ours._direct_limit() == (layers.AUTO_DIRECT_LSTM_MACS if backend == "auto" else 0)
    for seq_len in (3, 1):
        x = torch.randn(n, seq_len, H_IN)
        with torch.no_grad():
            before = spy["ran"]
            got, want = outputs(ours(x)), outputs(theirs(x))
            assert ours.last_backend == ours.which_backend(x)
        ran = spy["ran"] - before
        if backend == "fused" or seq_len == 1:
            assert ran == 1 and ours.last_backend == "fused"
        else:
            assert ran == (ours.last_backend == "fused")
        for u, v in zip(got, want):
            assert_close(u, v, torch.float32, f"{backend} L{seq_len}")


# ------------------------------------------------------------------ the one-step call (streaming's per-step call)

STEP_LAYERS = ["lstm", "gru", "rnn_tanh"]


@pytest.mark.parametrize("name", STEP_LAYERS)
def test_step_runs_module_hooks(spy, name):
    """nn.Module.__call__'s hooks run around the direct step as around any forward: a forward pre-hook
    (which replaces the input), a forward hook with kwargs (which replaces the output) and a global
    forward hook; the step still runs the direct entry and equals torch.nn on the hooked input."""
    ours, theirs = make(name, 10)
    x, hx = torch.randn(1, 2, H_IN), state(name, 2, 10)
    seen = []
    ours.register_forward_pre_hook(lambda m, args: (args[0] * 2, *args[1:]))
    ours.register_forward_hook(lambda m, args, kwargs, out: (out[0] + 1, out[1]), with_kwargs=True)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(type(m)))
    try:
        with torch.no_grad():
            got = outputs(ours(x, hx))
            want = outputs(theirs(x * 2, hx))
    finally:
        handle.remove()
    assert spy == {"calls": 1, "ran": 1} and ours.last_backend == "fused"
    assert seen == [type(ours), type(theirs)]
    assert_close(got[0], want[0] + 1, torch.float32, "hooked output")
    for u, v in zip(got[1:], want[1:]):
        assert_close(u, v, torch.float32, "state")


@pytest.mark.parametrize("name", STEP_LAYERS)
def test_step_last_backend_follows_the_path(spy, name):
    """last_backend says which path ran, call after call: the direct step ("fused"), a call that needs a
    gradient (select's choice, which which_backend names), the direct step again."""
    ours, theirs = make(name, 10)
    x, hx = torch.randn(1, 3, H_IN), state(name, 3, 10)
    with torch.no_grad():
        ours(x, hx)
        assert ours.last_backend == "fused" == ours.which_backend(x)
    got = outputs(ours(x, hx))  # grad mode, parameters need a gradient: the full path
    assert ours.last_backend == ours.which_backend(x) and got[0].requires_grad
    with torch.no_grad():
        ours(x, hx)
    assert ours.last_backend == "fused" and spy["ran"] == 2
    for u, v in zip(got, outputs(theirs(x, hx))):
        assert_close(u.detach(), v.detach(), torch.float32, name)


def test_direct_kind_follows_the_attributes(spy):
    """forward reads _direct_kind (the cached _plain_kind): setting an attribute it depends on, train()/eval(),
    a deep copy and a pickle round trip keep it equal to _plain_kind, so a regularizer switched on after
    construction is never skipped."""
    import copy
    import pickle
    ours, _ = make("lstm", 10)
    x = torch.randn(1, 2, H_IN)

    def ran_direct():
        before = spy["ran"]
        with torch.no_grad():
            ours(x)
        assert ours._direct_kind == ours._plain_kind
        return spy["ran"] - before == 1

    assert ran_direct()
    ours.zoneout = 0.3  # changes the function in eval too: the reference backend runs it
    assert not ran_direct()
    ours.zoneout = 0.0
    ours.zoneout_cell = 0.2
    assert not ran_direct()
    ours.zoneout_cell = 0.0
    assert ran_direct()
    ours.eval()
    ours.weight_drop = 0.5  # training only
    assert ran_direct()
    ours.train()
    assert not ran_direct()
    ours.eval()
    ours.weight_drop = 0.0
    ours.recurrent_dropout = 0.2
    assert ran_direct()
    ours.train()
    assert not ran_direct()
    ours.recurrent_dropout = 0.0
    assert ran_direct()
    ours.zoneout = 0.1
    for other in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert other._direct_kind is None is other._plain_kind
        other.zoneout = 0.0
        assert other._direct_kind == 0 == other._plain_kind


def test_direct_kind_equals_plain_kind_for_every_layer():
    """Every registered layer, constructed, in train and eval mode: the cache equals its definition."""
    from rnnkit.registry import LAYERS as REGISTRY
    for entry in REGISTRY.values():
        for kw in ({}, {"num_layers": 2}):
            m = entry.make(4, 6, **kw)
            for mode in (True, False):
                m.train(mode)
                assert m._direct_kind == m._plain_kind, (entry.name, kw, mode)


@pytest.mark.parametrize("name,case", [(name, case) for name in ("lstm", "gru")
                                       for case in ("feature", "h_shape", "h_rank", "c_shape", "dtype", "rank4")
                                       if case != "c_shape" or name == "lstm"])
def test_step_errors_are_torch_nns(spy, name, case):
    """A bad one-step call (right after a good one) raises what torch.nn raises: an instance of torch.nn's
    exception class whose message starts with torch.nn's words; the direct entry declined it."""
    ours, theirs = make(name, 10)
    x, hx = torch.randn(1, 2, H_IN), state(name, 2, 10)
    with torch.no_grad():
        ours(x, hx)
    h = hx[0] if name == "lstm" else hx
    if case == "feature":
        x = torch.randn(1, 2, 4)
    elif case == "h_shape":
        h = torch.randn(1, 3, 10)
    elif case == "h_rank":
        h = torch.randn(2, 10)
    elif case == "c_shape":
        hx = (hx[0], torch.randn(1, 2, 9))
    elif case == "dtype":
        x = x.double()
    elif case == "rank4":
        x = x[..., None]
    if name == "lstm":
        hx = (h, hx[1])
    else:
        hx = h
    with torch.no_grad():
        with pytest.raises(Exception) as want:
            theirs(x, hx)
        with pytest.raises(type(want.value)) as got:
            ours(x, hx)
    assert str(got.value).startswith(str(want.value).strip()), (str(got.value), str(want.value))
    assert spy == {"calls": 2, "ran": 1}
