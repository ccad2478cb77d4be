"""Autocast: every layer and cell, on every backend, runs under ``torch.autocast`` as torch.nn's
do (see rnnkit/_autocast.py).

Oracles: torch.nn's layers and cells under the same autocast (the dtype of the output and of
every final state, their values, the gradients of the input and every parameter), for RNN, LSTM
(oneDNN, projection, packed, ``lengths``, oneDNN off), GRU and the three cells, from float32 and
bfloat16 inputs and states; for the zoo, the same module run outside autocast with its
parameters, input and state cast to the policy's dtype, on the same backend (equal results), or
the reference backend under the same autocast; the parameters' gradients stay float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from rnnkit import _autocast
from rnnkit.backends import why_not
from helpers import flatten_states, runnable_backends, weighted_sum

BF16 = torch.bfloat16
BACKENDS = runnable_backends()
ONE_DTYPE = ("fused", "triton")  # kernels that compute in one dtype: they decline a mixed-precision run


def _autocast_ctx():
    return torch.autocast("cpu", dtype=BF16)


def _mixed(kind, kwargs, inputs) -> bool:
    """Where torch.nn runs ATen's composite cells with autocast on (measured below, through the dtypes
    and values torch.nn gives): GRU and the LSTM/GRU cells always, an LSTM off oneDNN."""
    if kind in ("GRU", "GRUCell", "LSTMCell"):
        return True
    off_onednn = inputs in ("packed", "lengths", "onednn_off", "x_fp16", "empty") or (
        inputs == "x_bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported())  # ATen's use_mkldnn
    return kind == "LSTM" and (bool(kwargs.get("proj_size")) or off_onednn)


LAYER_CASES = [("RNN", {}), ("RNN", dict(nonlinearity="relu", num_layers=2, bidirectional=True)),
               ("GRU", {}), ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True)),
               ("LSTM", {}), ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True)),
               ("LSTM", dict(proj_size=2)), ("LSTM", dict(proj_size=2, num_layers=2, bidirectional=True))]
LAYER_INPUTS = ["plain", "packed", "lengths", "onednn_off", "h0_bf16", "x_bf16", "x_fp16", "empty"]
CELL_INPUTS = ["plain", "onednn_off", "h0_bf16", "x_bf16"]
LENGTHS = [5, 3, 2]


def _twins(kind, kwargs, backend):
    torch.manual_seed(0)
    ours = getattr(rnnkit, kind)(4, 6, backend=backend, **kwargs)
    theirs = getattr(torch.nn, kind)(4, 6, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _tensors(out):
    """An output (a tensor, a PackedSequence, or ``(output, states)``) as a flat list of tensors."""
    if isinstance(out, torch.nn.utils.rnn.PackedSequence):
        return [out.data]
    if isinstance(out, tuple):
        return [t for part in out for t in _tensors(part)]
    return [out]


def _compare(got, want, what, products_differ=False):
    """Same dtypes; values as close as two runs of the same ops (bfloat16: about one rounding of the
    last bit, where a fused bfloat16 kernel rounds in its own order; float32: 1e-5, so a float32 run
    where torch.nn casts its products to bfloat16, 1e-3 away, fails). ``products_differ``: the bfloat16
    matrix products ran on other shapes (the reference backend on a padded batch, torch.nn on the packed
    one), so a product may round one unit apart: float32 results then within 4e-3."""
    assert [t.dtype for t in got] == [t.dtype for t in want], what
    for i, (a, b) in enumerate(zip(got, want)):
        tol = dict(rtol=1.6e-2, atol=8e-3) if b.dtype == BF16 else dict(rtol=1e-5, atol=1e-5)
        if products_differ:
            tol = dict(rtol=1.6e-2, atol=8e-3)
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}, tensor {i}: {m}")


def _close_gradient(a, b, what):
    """Same dtype, and within 2% of torch.nn's gradient in norm: the backward's bfloat16 products round
    in their own order (a bias gradient sums many of them), so elementwise bounds would be loose anyway."""
    assert a.dtype == b.dtype, what
    err = (a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12)
    assert err < 2e-2, f"{what}: relative error {err:.2e}"


def _run_both(ours, theirs, kind, kwargs, inputs, backend):
    """Run both twins under autocast on the case's input; returns (got, want, x_ours, x_theirs) or None
    when torch.nn itself cannot run it here (oneDNN's bfloat16 LSTM is missing on some CPUs)."""
    cell = kind.endswith("Cell")
    batch_first = kwargs.get("batch_first", False)
    x = torch.randn(3, 4) if cell else torch.randn(3, 5, 4) if batch_first else torch.randn(5, 3, 4)
    if inputs == "x_bf16":
        x = x.to(BF16)
    elif inputs == "x_fp16":  # (with a gradient: torch.nn's LSTM takes it off oneDNN)
        x = x.to(torch.float16)
    elif inputs == "empty":  # an empty batch: never oneDNN
        x = x[:0] if batch_first or cell else x[:, :0]
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    args_ours, args_theirs, kw = [x_ours], [x_theirs], {}
    if inputs == "packed":
        args_ours = [pack_padded_sequence(x_ours, LENGTHS, batch_first=batch_first)]
        args_theirs = [pack_padded_sequence(x_theirs, LENGTHS, batch_first=batch_first)]
    elif inputs == "lengths":  # rnnkit's lengths read as torch.nn's packed batch
        kw = dict(lengths=torch.tensor(LENGTHS))
        args_theirs = [pack_padded_sequence(x_theirs, LENGTHS, batch_first=batch_first)]
    elif inputs == "h0_bf16":
        layers = (2 if kwargs.get("bidirectional") else 1) * kwargs.get("num_layers", 1)
        h_size = kwargs.get("proj_size") or 6
        h = torch.randn(3, h_size) if cell else torch.randn(layers, 3, h_size)
        state = (h, torch.randn(*h.shape[:-1], 6)) if kind.startswith("LSTM") else h
        state = tuple(s.to(BF16) for s in state) if isinstance(state, tuple) else state.to(BF16)
        args_ours.append(state)
        args_theirs.append(state)
    with torch.backends.mkldnn.flags(enabled=inputs != "onednn_off"), _autocast_ctx():
        try:
            want = theirs(*args_theirs)
        except RuntimeError as e:
            pytest.skip(f"torch.nn cannot run this under CPU autocast here: {str(e)[:80]}")
        if backend in ONE_DTYPE and _mixed(kind, kwargs, inputs):
            with pytest.raises(ValueError, match="autocast is on"):
                ours(*args_ours, **kw)
            return None
        got = ours(*args_ours, **kw)
    got, want = _tensors(got), _tensors(want)
    if inputs == "lengths":
        got[0] = pack_padded_sequence(got[0], LENGTHS, batch_first=batch_first).data
    return got, want, x_ours, x_theirs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inputs", LAYER_INPUTS)
@pytest.mark.parametrize("kind, kwargs", LAYER_CASES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={w}" for k, w in v.items()) or "default")
def test_layers_match_torch_nn_under_autocast(kind, kwargs, inputs, backend):
    """Every output's dtype, its values and the gradients as torch.nn's under CPU autocast: bfloat16
    throughout where torch.nn's op is on autocast's list (RNN, LSTM on oneDNN); where it runs ATen's
    composite cells (GRU, an LSTM with a projection, packed, or oneDNN off), bfloat16 products and
    states promoted (an LSTM's c float32, a GRU's h bfloat16 only from a bfloat16 h_0), and a pinned
    fused or triton backend refuses with a ValueError. ``auto`` is called once outside autocast first,
    so its kept choice is in place."""
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not available")
    ours, theirs = _twins(kind, kwargs, backend)
    if backend == "auto":
        ours(torch.randn(3, 5, 4) if kwargs.get("batch_first") else torch.randn(5, 3, 4))
    result = _run_both(ours, theirs, kind, kwargs, inputs, backend)
    if result is None:
        return
    got, want, x_ours, x_theirs = result
    _compare(got, want, f"{kind} {inputs} on {ours.last_backend}",
             products_differ=inputs == "lengths" and ours.last_backend == "reference")
    if _mixed(kind, kwargs, inputs):
        assert ours.last_backend in ("torch", "reference")
        weighted_sum([t.float() for t in got]).backward()
        weighted_sum([t.float() for t in want]).backward()
        grads = [(x_ours.grad, x_theirs.grad)] + [(p.grad, q.grad) for p, q in zip(ours.parameters(),
                                                                                 theirs.parameters())]
        for i, (a, b) in enumerate(grads):
            _close_gradient(a, b, f"gradient {i}")
    else:
        weighted_sum([t.float() for t in got]).backward()
        assert all(p.grad.dtype == torch.float32 for p in ours.parameters())


@pytest.mark.parametrize("backend", ["auto", "reference", "torch", "fused"])
@pytest.mark.parametrize("inputs", CELL_INPUTS)
@pytest.mark.parametrize("kind", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cells_match_torch_nn_under_autocast(kind, inputs, backend):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not available")
    ours, theirs = _twins(kind, {}, backend)
    result = _run_both(ours, theirs, kind, {}, inputs, backend)
    if result is None:
        return
    got, want, x_ours, x_theirs = result
    _compare(got, want, f"{kind} {inputs} on {ours.last_backend}")
    weighted_sum([t.float() for t in got]).backward()
    weighted_sum([t.float() for t in want]).backward()
    if _mixed(kind, {}, inputs):
        for a, b in [(x_ours.grad, x_theirs.grad)] + [(p.grad, q.grad) for p, q in zip(ours.parameters(),
                                                                                     theirs.parameters())]:
            _close_gradient(a, b, kind)
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters())


def test_torch_nn_lstm_on_onednn_is_bfloat16_and_off_it_mixed():
    """The measurement behind the LSTM's policy: on oneDNN every tensor comes back bfloat16; with a
    projection the cell state stays float32; with oneDNN off every tensor is float32."""
    theirs = torch.nn.LSTM(4, 6)
    projected = torch.nn.LSTM(4, 6, proj_size=2)
    x = torch.randn(5, 3, 4)
    with _autocast_ctx():
        try:
            on = _tensors(theirs(x))
        except RuntimeError as e:  # oneDNN's bf16 LSTM primitive is missing on this CPU
            pytest.skip(f"torch.nn.LSTM fails under CPU autocast here: {str(e)[:80]}")
        assert [t.dtype for t in on] == [BF16] * 3
        assert [t.dtype for t in _tensors(projected(x))] == [BF16, BF16, torch.float32]
        with torch.backends.mkldnn.flags(enabled=False):
            assert [t.dtype for t in _tensors(theirs(x))] == [torch.float32] * 3


def test_auto_does_not_reuse_a_fused_choice_under_autocast():
    """A GRU that ran fused outside autocast runs torch's op under it (auto's kept choice is not used)."""
    ours, theirs = _twins("GRU", {}, "auto")
    x = torch.randn(5, 3, 4)
    ours(x)
    ours(x)
    with _autocast_ctx():
        got = _tensors(ours(x))
        want = _tensors(theirs(x))
    assert ours.last_backend == "torch"
    _compare(got, want, "GRU after a fused call")
    with _autocast_ctx(), torch.no_grad():
        assert ours.which_backend(x) == "torch"
        ours(x)
    assert ours.last_backend == "torch"


def test_a_float64_mixed_state_is_refused_as_outside_autocast():
    """Under a mixed-precision run float32, bfloat16 and float16 mix (autocast casts them); a float64
    state is still a dtype mistake."""
    gru = rnnkit.GRU(4, 6)
    with _autocast_ctx(), pytest.raises(TypeError, match="h_0 has dtype torch.float64"):
        gru(torch.randn(5, 3, 4), torch.zeros(1, 3, 6, dtype=torch.float64))
    cell = rnnkit.GRUCell(4, 6)
    with _autocast_ctx(), pytest.raises(TypeError, match="h has dtype torch.float64"):
        cell(torch.randn(3, 4), torch.zeros(3, 6, dtype=torch.float64))


def _case(name, backend):
    entry = rnnkit.LAYERS[name]
    torch.manual_seed(0)
    module = entry.make(4, 6)
    x = torch.randn(entry.input_shape(5, 3, 4))
    with _autocast_ctx():
        dtype = _autocast.compute_dtype(module, x, torch.tensor([5, 2, 4]))
    cast = copy.deepcopy(module)
    if dtype is not _autocast.MIXED:
        cast = cast.to(dtype)
    for m in (module, cast):
        m.backend = backend
    if dtype is _autocast.MIXED:
        cast.backend = "reference"  # the oracle of a mixed-precision run: the same ops under the same autocast
    elif backend != "auto" and why_not(backend, cast, x.to(dtype)) is not None:
        pytest.skip(f"{backend} cannot run {name} in {dtype}: {why_not(backend, cast, x.to(dtype))}")
    return module, cast, x, dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(rnnkit.LAYERS))
def test_every_layer_equals_its_policy_oracle(name, backend):
    """Under autocast, with ``lengths``: == the module, input and state cast to the policy's dtype, outside
    autocast; or, for a mixed-precision run (GRU, and LSTM with lengths), == the reference backend under the
    same autocast (a pinned fused or triton backend refuses); the backward reaches the float32 parameters
    in float32."""
    module, cast, x, dtype = _case(name, backend)
    lengths = torch.tensor([5, 2, 4])
    if dtype is _autocast.MIXED:
        with _autocast_ctx():
            if backend in ONE_DTYPE:
                with pytest.raises(ValueError, match="autocast is on"):
                    module(x, lengths=lengths)
                return
            out, h = module(x, lengths=lengths)
            want, h_want = cast(x, lengths=lengths)
        _compare([out, *flatten_states(h)], [want, *flatten_states(h_want)], name)
    else:
        with _autocast_ctx():
            out, h = module(x, lengths=lengths)
        want, h_want = cast(x.to(dtype), lengths=lengths)
        assert out.dtype == dtype
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        for a, b in zip(flatten_states(h), flatten_states(h_want)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    out.float().pow(2).sum().backward()
    for p in module.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32
    if backend != "auto":
        assert module.last_backend == backend


@pytest.mark.parametrize("name", sorted(rnnkit.LAYERS))
def test_every_cell_runs_under_autocast(name):
    entry = rnnkit.LAYERS[name]
    if entry.cell is None:
        pytest.skip("no cell")
    torch.manual_seed(0)
    cell = entry.cell(4, 6, **entry.kwargs)
    x = torch.randn(entry.input_shape(1, 3, 4))[0]
    with _autocast_ctx():
        dtype = _autocast.compute_dtype(cell, x)
        got = flatten_states(cell(x))
        if dtype is _autocast.MIXED:
            oracle = copy.deepcopy(cell)
            oracle.backend = "reference"
            _compare(got, flatten_states(oracle(x)), name)
            return
    want = flatten_states(copy.deepcopy(cell).to(dtype)(x.to(dtype)))
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float64_is_left_alone():
    """Autocast leaves float64 alone: a float64 GRU runs float64, on the fused kernels when pinned."""
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    for backend in ("auto", "fused") if "fused" in BACKENDS else ("auto",):
        m = rnnkit.GRU(4, 6, dtype=torch.float64, backend=backend)
        want, _ = m(x)
        with _autocast_ctx():
            out, _ = m(x)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(rnnkit.LAYERS))
def test_the_cpu_policy_of_every_layer(name):
    """The policy as the module docstring states it: RNN and LSTM (oneDNN) in the lower dtype, GRU and
    LSTM with lengths mixed, the zoo in float32 (checked against torch.nn's dtypes above)."""
    entry = rnnkit.LAYERS[name]
    module = entry.make(4, 6)
    x = torch.randn(entry.input_shape(5, 3, 4))
    lstm = BF16 if _autocast.onednn_lstm(x) else _autocast.MIXED  # oneDNN built and enabled here, or not
    want = {"rnn": (BF16, BF16), "lstm": (lstm, _autocast.MIXED), "gru": (_autocast.MIXED, _autocast.MIXED)}
    with _autocast_ctx():
        got = (_autocast.compute_dtype(module, x), _autocast.compute_dtype(module, x, torch.tensor([5, 2, 4])))
    assert got == want.get(name, (torch.float32, torch.float32))


def test_meta_inputs_under_cpu_autocast_run_as_without_it():
    """Autocast knows no meta device: a meta layer under CPU autocast runs as outside it (shapes only)."""
    gru = rnnkit.GRU(4, 6, device="meta")
    x = torch.randn(5, 3, 4, device="meta")
    want, h_want = gru(x)
    with _autocast_ctx():
        out, h = gru(x)
    assert (out.shape, out.dtype, h.shape, h.dtype) == (want.shape, want.dtype, h_want.shape, h_want.dtype)


class _UnderAutocast(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        with _autocast_ctx():
            return _tensors(self.layer(x))


@pytest.mark.parametrize("how", ["compile", "export"])
@pytest.mark.parametrize("kind, kwargs", [("GRU", {}), ("LSTM", dict(proj_size=2))], ids=["GRU", "LSTM-proj"])
def test_mixed_precision_under_compile_and_export(kind, kwargs, how):
    """torch.compile (fullgraph) and torch.export of a layer called under CPU autocast give torch.nn's eager
    dtypes and values (the mixed-precision run is ordinary ops under autocast)."""
    ours, theirs = _twins(kind, kwargs, "auto")
    x = torch.randn(5, 3, 4)
    want = _UnderAutocast(theirs)(x)
    if how == "compile":
        with torch._dynamo.config.patch(allow_rnn=True):
            got = torch.compile(_UnderAutocast(ours), backend="aot_eager", fullgraph=True)(x)
    else:
        got = torch.export.export(_UnderAutocast(ours), (x,)).module()(x)
    _compare(got, want, f"{kind} {how}")
